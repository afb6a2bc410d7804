"""End to end: `areal-lite train` on the tiny model with launched fake SGLang servers, one
SIGKILLed mid-training and kept down for 15 s (the restart backoff). The run finishes
every step, counts the restart, and leaves no server process behind (checked by PID)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

FAKE = [sys.executable, "-m", "areal_lite.testing.fake_sglang.launch_server"]
TESTS = Path(__file__).resolve().parents[1]
DOWN_S = 15.0  # restart_backoff_s: how long the killed server stays down


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _wait_for_step(proc: subprocess.Popen, metrics: Path, step: int, timeout_s: float) -> None:
    """Poll the run's metrics file (another process writes it) until `step` is logged."""
    deadline = time.monotonic() + timeout_s
    while not any(r.get("step", 0) >= step and "train/loss" in r for r in _rows(metrics)):
        assert proc.poll() is None, f"the run exited early with {proc.returncode}"
        assert time.monotonic() < deadline, f"no step {step} within {timeout_s}s"
        time.sleep(0.2)


def run_and_kill(tmp_path: Path, tiny_model_dir, num_servers: int, total_steps: int,
                 latency_s: float = 0.02):
    config = tmp_path / "run.toml"
    config.write_text(f"""
workflow = "sample_agents.LengthRewardAgent"
run_dir = "{tmp_path}"
experiment_name = "e2e"
trial_name = "t"
seed = 3
[actor]
path = "{tiny_model_dir}"
device = "cpu"
[rollout]
backend = "sglang"
batch_size = 2
group_size = 3
max_head_offpolicyness = 1
[rollout.sampling]
max_new_tokens = 6
[rollout.sglang]
launch = true
launch_command = {json.dumps(FAKE)}
num_servers = {num_servers}
base_port = 0
weight_update = "disk"
restart_backoff_s = {DOWN_S}
outage_timeout_s = 90.0
launch_timeout_s = 60.0
server_args = ["--fake-latency-s", "{latency_s}"]
[data]
train = "arithmetic:200"
[trainer]
total_steps = {total_steps}
eval_every = 0
save_every = 0
[train]
lr = 1e-3
[metrics]
progress = false
plots = false
""")
    run_dir = tmp_path / "e2e" / "t"  # run_dir / experiment_name / trial_name
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(TESTS.parent / "src"), str(TESTS), os.environ.get("PYTHONPATH", "")])}
    log = open(tmp_path / "train.log", "w")
    with log, subprocess.Popen([sys.executable, "-m", "areal_lite.cli", "train", str(config)],
                               stdout=log, stderr=subprocess.STDOUT, env=env) as proc:
        try:
            metrics = run_dir / "metrics.jsonl"
            _wait_for_step(proc, metrics, 1, timeout_s=120)
            servers = json.loads((run_dir / "servers" / "servers.json").read_text())
            victim = servers[0]["pid"]
            os.kill(victim, signal.SIGKILL)
            killed_at = time.monotonic()
            proc.wait(timeout=180)
        finally:
            proc.kill()
    output = (tmp_path / "train.log").read_text()
    assert proc.returncode == 0, output[-3000:]
    manifest = json.loads((run_dir / "servers" / "servers.json").read_text())
    pids = [victim] + [m["pid"] for m in manifest]
    assert not any(alive(p) for p in pids), "a server outlived the run"
    steps = [r for r in _rows(run_dir / "metrics.jsonl") if "train/loss" in r]
    return steps, manifest, time.monotonic() - killed_at, output


@pytest.mark.slow
def test_two_servers_one_killed_for_15s_the_run_finishes(tiny_model_dir, tmp_path):
    # 0.2 s per token: ~0.8 s per step, so the killed server is back (after ~17 s) in time
    steps, manifest, _, output = run_and_kill(tmp_path, tiny_model_dir, 2, total_steps=30,
                                              latency_s=0.2)
    assert [r["step"] for r in steps] == list(range(1, 31))
    last = steps[-1]
    assert last["servers/restarts"] == 1 and last["servers/down"] == 0
    assert "is back (restart 1)" in output
    # training went on with one server while the other was down (whether a session bound
    # to the killed server asked again, an affinity miss, depends on timing: the miss
    # itself is tested in test_sglang_launch.py::test_sessions_move_off_a_dead_server)
    assert any(r["servers/down"] == 1 for r in steps[1:-1])
    assert "rollout/episodes_total_failed" in last  # failed episodes are counted (if any)
    assert last["servers/aborted_requests"] == 0  # no aborted output was trained on
    assert "exited with code -9; restarting it" in output


@pytest.mark.slow
def test_a_single_server_killed_for_15s_the_run_waits_and_finishes(tiny_model_dir, tmp_path):
    # 0.2 s per token: the steps after the first cannot all finish before the kill lands
    # (with a fast fake, 3 tiny steps could be done by the time step 1 is read)
    steps, manifest, after_kill_s, output = run_and_kill(tmp_path, tiny_model_dir, 1,
                                                         total_steps=6, latency_s=0.2)
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    assert after_kill_s >= DOWN_S  # nothing could run until the server was back
    last = steps[-1]
    assert last["servers/restarts"] == 1 and last["servers/down"] == 0
    assert manifest[0]["starts"] == 2
    assert "is back (restart 1)" in output
    assert last["servers/aborted_requests"] == 0
