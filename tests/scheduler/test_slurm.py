"""Tests for scheduler/: the Slurm batch script (--dry-run, checked by bash -n), the
config rules that fail at start naming keys, and a real job on a single-node Slurm
(Debian's munge + slurmctld + slurmd on loopback, started by .ci/slurm-up)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from areal_lite.cli import main
from areal_lite.config import ConfigError
from areal_lite.config_toml import config_to_toml, loads_config
from areal_lite.train.ranks import check_processes

ROOT = Path(__file__).parents[2]


def write_config(tmp_path: Path, *overrides: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(config_to_toml(loads_config("", [f"run_dir={tmp_path / 'runs'}",
                                                     *overrides])))
    return path


def test_dry_run_prints_a_valid_batch_script(tmp_path, capsys):
    config = write_config(tmp_path, "scheduler.type=slurm", "scheduler.nodes=3",
                          "scheduler.inference_nodes=1", "scheduler.train_processes=8",
                          "scheduler.partition=gpu", "scheduler.gpus_per_node=8",
                          'scheduler.sbatch_args=["--account=rl"]')
    assert main(["train", str(config), "--dry-run"]) == 0
    script = capsys.readouterr().out
    for line in ("#SBATCH --nodes=3", "#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --account=rl", "--nproc-per-node=8", "--nnodes=2",
                 "--rdzv-backend=c10d", "sglang.launch_server"):
        assert line in script, line
    assert "launch.toml" in script
    check = subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True)
    assert check.returncode == 0, check.stderr
    assert not list((tmp_path / "runs").rglob("job.sbatch"))  # nothing submitted


def test_dry_run_local_names_the_torchrun_command(tmp_path, capsys):
    config = write_config(tmp_path, "scheduler.train_processes=2")
    assert main(["train", str(config), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "torch.distributed.run" in out and "--nproc-per-node=2" in out


def test_slurm_without_sbatch_fails_at_start_naming_the_key(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    config = write_config(tmp_path, "scheduler.type=slurm")
    assert main(["train", str(config)]) == 2
    assert "scheduler.type = 'slurm' needs Slurm's `sbatch`" in capsys.readouterr().err


def test_nodes_with_the_local_scheduler_fails_naming_the_keys():
    with pytest.raises(ConfigError, match=r"scheduler\.nodes must be 1 when scheduler\.type"):
        loads_config("", ["scheduler.nodes=2"])


def test_no_trainer_node_left_fails_at_start_naming_the_keys(tmp_path, capsys):
    config = write_config(tmp_path, "scheduler.type=slurm", "scheduler.nodes=2",
                          "scheduler.inference_nodes=2")
    assert main(["train", str(config), "--dry-run"]) == 2
    assert ("scheduler.inference_nodes = 2 leaves no trainer node of scheduler.nodes = 2"
            in capsys.readouterr().err)


def test_more_processes_than_gpus_fails_naming_the_key():
    import torch

    n = torch.cuda.device_count() + 1
    with pytest.raises(ConfigError, match=f"scheduler.train_processes = {n} but this node has"):
        check_processes(loads_config("", [f"scheduler.train_processes={n}"]), "cuda")


# ------------------------------------------------------------------ a real Slurm job

@pytest.fixture(scope="module")
def slurm():
    """Start the single-node Slurm (.ci/run installs it); skip, saying why, without it."""
    if shutil.which("sbatch") is None or shutil.which("slurmctld") is None:
        pytest.skip("Slurm is not installed (sbatch/slurmctld missing): run .ci/slurm-up as "
                    "root, or .ci/run, which installs Debian's slurmctld, slurmd and munge")
    up = subprocess.run([str(ROOT / ".ci" / "slurm-up"), "--no-install"], capture_output=True,
                        text=True, timeout=120)
    if up.returncode:
        pytest.skip(f"the local Slurm could not be started: {up.stderr.strip()}")


def job_state(job: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True,
                         text=True).stdout
    found = re.search(r"JobState=(\w+)", out)
    return found.group(1) if found else "UNKNOWN"


@pytest.mark.slow
def test_a_slurm_job_trains_to_completion_and_its_checkpoint_loads(slurm, tiny_model_dir,
                                                                    tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")]))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    config = write_config(
        tmp_path, f"actor.path={tiny_model_dir}", "workflow=sample_agents.LengthRewardAgent",
        "rollout.batch_size=2", "rollout.group_size=2", "rollout.sampling.max_new_tokens=4",
        "data.train=arithmetic:8", "data.eval=", "trainer.eval_every=0", "trainer.total_steps=1",
        "metrics.progress=false", "metrics.plots=false", "scheduler.type=slurm",
        "scheduler.train_processes=2", "scheduler.time_limit=00:10:00")
    out = subprocess.run([sys.executable, "-m", "areal_lite.cli", "train", str(config)],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    found = re.search(r"submitted Slurm job (\d+); logs: (\S+)", out)
    assert found, out
    job, logs = found.groups()
    deadline = time.monotonic() + 400
    # Slurm reports a job's end only through its state: poll the controller
    while (state := job_state(job)) in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING"):
        assert time.monotonic() < deadline, f"job {job} still {state}; log: {logs}"
        time.sleep(1.0)
    log_text = Path(logs).read_text() if Path(logs).exists() else "(no log)"
    assert state == "COMPLETED", f"job {job} ended {state}:\n{log_text[-3000:]}"
    ckpt = tmp_path / "runs" / "areal-lite" / "trial0" / "checkpoints" / "step_1"
    assert (ckpt / "sharded" / ".metadata").is_file()
    AutoModelForCausalLM.from_pretrained(ckpt)
