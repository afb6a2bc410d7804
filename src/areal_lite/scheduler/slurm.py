"""Scheduler stage, Slurm: `scheduler.type = "slurm"` turns `areal-lite train` into one
batch job of `scheduler.nodes` nodes, submitted with `sbatch`.

The job's nodes (`scontrol show hostnames $SLURM_JOB_NODELIST`) are split as the config
says: the first `scheduler.inference_nodes` run an SGLang server each
(`python -m sglang.launch_server`, whose URLs replace rollout.sglang.urls), the rest run
the trainer: one `torchrun` per node (`scheduler.train_processes` ranks each) with its
c10d rendezvous on the first trainer node, `rdzv_port`. Rank 0 owns the rollout side.
Inside the job `SLURM_JOB_ID` is set, so the same `areal-lite train` trains instead of
submitting again. The run directory must be on a filesystem every node sees (the ranks
write their checkpoint shards into it).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from areal_lite.config import ConfigError, ExperimentConfig, run_path
from areal_lite.scheduler.local import launch_config

__all__ = ["SERVER_PORT", "in_slurm_job", "render_sbatch", "submit"]

SERVER_PORT = 30000  # each inference node's SGLang server listens here


def in_slurm_job() -> bool:
    return "SLURM_JOB_ID" in os.environ


def render_sbatch(cfg: ExperimentConfig, config: Path) -> str:
    """The batch script for `cfg`; `config` is the TOML every process reads."""
    s = cfg.scheduler
    if s.inference_nodes >= s.nodes:  # checked here: a rule only the Slurm layout has
        raise ConfigError(f"scheduler.inference_nodes = {s.inference_nodes} leaves no trainer "
                          f"node of scheduler.nodes = {s.nodes}")
    run_dir = run_path(cfg).resolve()
    py = shlex.quote(sys.executable)
    head = [f"#SBATCH --job-name={cfg.experiment_name}-{cfg.trial_name}",
            f"#SBATCH --nodes={s.nodes}", "#SBATCH --ntasks-per-node=1",
            f"#SBATCH --output={run_dir}/slurm-%j.out"]
    head += [f"#SBATCH --partition={s.partition}"] * bool(s.partition)
    head += [f"#SBATCH --time={s.time_limit}"] * bool(s.time_limit)
    head += [f"#SBATCH --gpus-per-node={s.gpus_per_node}"] * bool(s.gpus_per_node)
    head += [f"#SBATCH {arg}" for arg in s.sbatch_args]
    train_nodes = s.nodes - s.inference_nodes
    if train_nodes == 1:
        rdzv = "--standalone"
    else:
        rdzv = (f'--nnodes={train_nodes} --rdzv-backend=c10d --rdzv-id="$SLURM_JOB_ID" '
                f'--rdzv-endpoint="${{trainers[0]}}:{s.rdzv_port}"')
    lines = [
        "#!/bin/bash", *head, "# written by `areal-lite train` (scheduler.type = slurm)",
        "set -euo pipefail",
        f"cd {shlex.quote(os.getcwd())}",
        f'export PYTHONPATH={shlex.quote(os.getcwd())}"${{PYTHONPATH:+:$PYTHONPATH}}"',
        'mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")',
        f'inference=("${{nodes[@]:0:{s.inference_nodes}}}")',
        f'trainers=("${{nodes[@]:{s.inference_nodes}}}")',
        "overrides=()",
    ]
    if s.inference_nodes:
        lines += _server_lines(cfg, py)
    lines += [
        f'srun --nodes={train_nodes} --ntasks-per-node=1 --nodelist="$(IFS=,; echo '
        f'"${{trainers[*]}}")" {py} -m torch.distributed.run '
        f"--nproc-per-node={s.train_processes} {rdzv} "
        f'-m areal_lite.cli train {shlex.quote(str(config))} "${{overrides[@]}}"',
    ]
    return "\n".join(lines) + "\n"


def _server_lines(cfg: ExperimentConfig, py: str) -> list[str]:
    """Start one SGLang server per inference node and wait until each answers /health."""
    tp = cfg.rollout.sglang.tp_size
    model = shlex.quote(cfg.actor.path)
    return [
        'urls=""',
        'for node in "${inference[@]}"; do',
        f'    srun --nodes=1 --ntasks=1 --nodelist="$node" {py} -m sglang.launch_server '
        f"--model-path {model} --tp-size {tp} --host 0.0.0.0 --port {SERVER_PORT} &",
        f'    urls="${{urls:+$urls,}}\\"http://$node:{SERVER_PORT}\\""',
        "done",
        f'{py} -c "import sys, time, urllib.request as u\n'
        "for url in sys.argv[1:]:\n"
        "    for _ in range(1800):\n"
        "        try: u.urlopen(url + '/health', timeout=5); break\n"
        "        except OSError: time.sleep(1)\n"
        '    else: sys.exit(url + \' never became healthy\')" '
        f'$(for n in "${{inference[@]}}"; do echo "http://$n:{SERVER_PORT}"; done)',
        'overrides+=(rollout.backend=sglang "rollout.sglang.urls=[$urls]")',
    ]


def submit(cfg: ExperimentConfig, workflow: Any = None, *, dry_run: bool = False
           ) -> tuple[str, str]:
    """Write the launch config and batch script under the run directory, then `sbatch`
    it. Returns (job id, log path); with `dry_run`, ("", script) and nothing is submitted."""
    config = launch_config(cfg, workflow).resolve()
    script = render_sbatch(cfg, config)
    if dry_run:
        return "", script
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise ConfigError("scheduler.type = 'slurm' needs Slurm's `sbatch` on PATH, and it "
                          "is not there; submit from a Slurm login node, or set "
                          "scheduler.type = 'local' to train on this machine")
    path = config.parent / "job.sbatch"
    path.write_text(script)
    out = subprocess.run([sbatch, "--parsable", str(path)], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"sbatch {path} failed ({out.returncode}): {out.stderr.strip()}")
    job = re.split(r"[;\s]", out.stdout.strip())[0]
    return job, str(run_path(cfg).resolve() / f"slurm-{job}.out")


def submit_or_describe(cfg: ExperimentConfig, *, dry_run: bool) -> str | None:
    """What `areal-lite train` does before training here: under scheduler.type = slurm
    (outside a job) submit, or with `dry_run` describe; returns the text to print, or
    None when this process should train."""
    if cfg.scheduler.type == "slurm" and not in_slurm_job():
        job, text = submit(cfg, dry_run=dry_run)
        return text if dry_run else f"submitted Slurm job {job}; logs: {text}"
    if not dry_run:
        return None
    if cfg.scheduler.train_processes > 1:
        from areal_lite.scheduler.local import torchrun_args

        cmd = [*torchrun_args(cfg.scheduler.train_processes), "-m", "areal_lite.cli", "train",
               str(run_path(cfg) / "launch.toml")]
        return "would run: " + shlex.join(cmd)
    return "would train in this process (scheduler.type = local, train_processes = 1)"
