"""End to end with 2 learner processes (FSDP2, gloo, CPU): `areal-lite train` (run as
a subprocess with a time limit) starts torchrun itself; rank 0 runs the rollout side (local engine, or a fake SGLang server in
its own process), both ranks train; checkpoints are sharded + HF, and a second run
resumes from them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from areal_lite.config import run_path
from areal_lite.config_toml import config_to_toml, loads_config
from areal_lite.train.checkpoint import SHARDED_DIR, load_latest_checkpoint

TESTS = Path(__file__).parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def workflow_on_path(monkeypatch):
    """The ranks import this checkout's package and `sample_agents` (tests/)."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS.parent / "src"), str(TESTS)]))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def cfg_for(model_dir, run_dir, *extra):
    return loads_config("", [
        f"actor.path={model_dir}", f"run_dir={run_dir}", "workflow=sample_agents.LengthRewardAgent",
        "rollout.batch_size=2", "rollout.group_size=3", "rollout.sampling.max_new_tokens=6",
        "data.train=arithmetic:10", "data.eval=", "trainer.eval_every=0", "train.lr=1e-3",
        "metrics.progress=false", "metrics.plots=false", "scheduler.train_processes=2",
        "trainer.save_every=1", *extra])


def train(cfg, tmp_path: Path, timeout_s: float = 300) -> Path:
    """`areal-lite train` on `cfg` in its own process group (killed whole on timeout)."""
    config = tmp_path / "config.toml"
    config.write_text(config_to_toml(cfg))
    proc = subprocess.Popen([sys.executable, "-m", "areal_lite.cli", "train", str(config)],
                            start_new_session=True)
    try:
        assert proc.wait(timeout=timeout_s) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return run_path(cfg)


def train_rows(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "train/loss" in r]


def drawn_not_trained(state: dict) -> int:
    """Prompts the stream handed out minus those recorded as unfinished: with no group
    rejected, exactly the prompts trained (batch_size per step) if none is trained twice
    or skipped."""
    data = state["extra"]["data"]
    return data["epoch"] * data["num_rows"] + data["position"] - len(data["unfinished"])


def test_two_processes_killed_and_resumed(tiny_model_dir, tmp_path):
    """Kill the whole 2-rank run (SIGKILL) once a checkpoint is down, resume it: the
    sharded state loads, training goes on from the checkpoint's step, and the prompt
    stream neither repeats nor skips a prompt across the kill."""
    cfg = cfg_for(tiny_model_dir, tmp_path, "trainer.total_steps=50", "data.train=arithmetic:40")
    config = tmp_path / "config.toml"
    config.write_text(config_to_toml(cfg))
    run_dir = run_path(cfg)
    proc = subprocess.Popen([sys.executable, "-m", "areal_lite.cli", "train", str(config)],
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        # the run says it has a checkpoint only through the `latest` file: poll it
        while not (run_dir / "checkpoints" / "latest").is_file():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    path, state = load_latest_checkpoint(run_dir)
    k = state["step"]
    assert (path / SHARDED_DIR / ".metadata").is_file()  # torch.distributed.checkpoint
    AutoModelForCausalLM.from_pretrained(path)  # HF weights from rank 0
    assert drawn_not_trained(state) == 2 * k

    train(cfg_for(tiny_model_dir, tmp_path, f"trainer.total_steps={k + 2}",
                  "data.train=arithmetic:40"), tmp_path)
    steps = [r["step"] for r in train_rows(run_dir)]
    assert steps[:k] == list(range(1, k + 1))  # the killed run's steps, then ...
    assert steps[-2:] == [k + 1, k + 2]  # ... the resumed ones (k+1 twice if it was
    assert set(steps[k:]) == {k + 1, k + 2}  # logged but not saved before the kill)
    _, state = load_latest_checkpoint(run_dir)
    assert state["step"] == k + 2 and state["learner"]["step"] == k + 2
    assert state["extra"]["version"] == k + 2
    assert drawn_not_trained(state) == 2 * (k + 2)  # none twice, none skipped

    # the sharded checkpoint of 2 ranks resumes in 1 process too (DCP reshards)
    train(cfg_for(tiny_model_dir, tmp_path, f"trainer.total_steps={k + 3}",
                  "data.train=arithmetic:40", "scheduler.train_processes=1"), tmp_path)
    _, state = load_latest_checkpoint(run_dir)
    assert state["step"] == k + 3 and state["learner"]["step"] == k + 3
    assert drawn_not_trained(state) == 2 * (k + 3)


def test_two_processes_with_a_fake_sglang_server(tiny_model_dir, tiny_tokenizer, tmp_path):
    with subprocess.Popen([sys.executable, str(Path(__file__).parent / "fake_sglang_proc.py"),
                           str(len(tiny_tokenizer))], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True) as server:
        try:
            url = server.stdout.readline().strip()
            assert url.startswith("http://"), url
            run_dir = train(cfg_for(tiny_model_dir, tmp_path, "trainer.total_steps=2",
                                    "rollout.backend=sglang", f'rollout.sglang.urls=["{url}"]',
                                    "rollout.sglang.weight_update=disk"), tmp_path)
        finally:
            server.stdin.close()  # the server's cue to stop
            server.wait(timeout=30)
    rows = train_rows(run_dir)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["train/num_tokens"] > 0 for r in rows)
    assert all(r["time/weight_swap_s"] > 0 for r in rows)  # disk updates from the shards
