"""Scheduler stage, this machine: start the learner as `scheduler.train_processes`
processes under torchrun (`python -m torch.distributed.run`), each running the same
`areal-lite train` on the resolved config; rank 0 owns the rollout side.

The config is written to `{run_dir}/launch.toml` (workflow included), so every rank
reads the same values. The workflow must be a dotted path: an object cannot cross into
the new processes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from areal_lite.config import ConfigError, ExperimentConfig, run_path
from areal_lite.config_toml import config_to_toml

__all__ = ["launch_config", "launch_torchrun", "torchrun_args"]


def launch_config(cfg: ExperimentConfig, workflow: Any = None) -> Path:
    """Write the config every rank reads to `{run_dir}/launch.toml`; returns its path."""
    import msgspec

    if workflow is not None and not isinstance(workflow, str):
        raise ConfigError(f"scheduler.train_processes = {cfg.scheduler.train_processes} (or "
                          f"scheduler.type = 'slurm') starts new processes: name the workflow "
                          f"by a dotted path (workflow = 'pkg.mod.Class'), not a "
                          f"{type(workflow).__name__} object")
    if workflow is not None:
        cfg = msgspec.structs.replace(cfg, workflow=workflow)
    path = run_path(cfg) / "launch.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(config_to_toml(cfg))
    return path


def torchrun_args(nproc: int, *, nnodes: str = "1", rdzv: str = "") -> list[str]:
    """`python -m torch.distributed.run ...` up to the module: standalone on one node,
    else c10d rendezvous at `rdzv` (host:port)."""
    base = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}"]
    if nnodes == "1":
        return [*base, "--standalone"]
    return [*base, f"--nnodes={nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv}"]


def launch_torchrun(cfg: ExperimentConfig, workflow: Any = None) -> int:
    """Run the whole training as torchrun processes here; returns when they end.
    Raises RuntimeError naming the exit status when a rank failed."""
    config = launch_config(cfg, workflow)
    cmd = [*torchrun_args(cfg.scheduler.train_processes), "-m", "areal_lite.cli", "train",
           str(config)]
    # the workflow's dotted path is resolved from where the user started
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in [os.getcwd(), os.environ.get("PYTHONPATH", "")] if p)}
    code = subprocess.run(cmd, env=env).returncode
    if code:
        raise RuntimeError(f"the learner processes failed (torchrun exit status {code}); "
                           f"every rank's traceback is above, the command was {' '.join(cmd)}")
    return code
