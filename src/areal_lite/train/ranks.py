"""Trainer stage, process roles: build the learner for this process and, under torchrun,
give rank 0 a learner handle (`Leader`) and a weight view, and run the other ranks.

`Trainer` calls `make_learner` whatever the process count. With
`scheduler.train_processes = 1` it is the plain single-process `Learner`. Under torchrun
(WORLD_SIZE > 1) rank 0 gets a `Leader` (each call first broadcast to the followers)
and a `ShardedWeights` view that the weight-update path and checkpoints use as "the
model": its `state_dict()` is the full weights, gathered one parameter at a time, and
`save_pretrained` writes them from rank 0 only. Ranks > 0 run `follow(cfg)`: load the
same model, shard it, and obey rank 0 until it says stop.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from areal_lite.config import ConfigError, ExperimentConfig
from areal_lite.train.checkpoint import SHARDED_DIR
from areal_lite.train.distributed import (
    Dist,
    Leader,
    init_dist,
    load_sharded,
    serve_followers,
)
from areal_lite.train.learner import Learner

__all__ = ["ShardedWeights", "check_processes", "follow", "launched_rank", "make_learner",
           "restore_learner", "under_torchrun"]


def under_torchrun() -> bool:
    """Started by torchrun (or anything that sets its rendezvous variables)."""
    return "TORCHELASTIC_RUN_ID" in os.environ or "WORLD_SIZE" in os.environ


def launched_rank() -> int | None:
    """This process's rank when torchrun started several learner processes, else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    return int(os.environ["RANK"])


def check_processes(cfg: ExperimentConfig, device: str) -> None:
    """Fail at start when the process layout cannot work on this machine."""
    n = cfg.scheduler.train_processes
    if device == "cuda" and n > torch.cuda.device_count():
        raise ConfigError(f"scheduler.train_processes = {n} but this node has "
                          f"{torch.cuda.device_count()} CUDA device(s); use at most that many "
                          f"(one learner process per GPU) or actor.device = 'cpu'")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if under_torchrun() and world % n:
        raise ConfigError(f"torchrun started {world} processes, not a multiple of "
                          f"scheduler.train_processes = {n}; start it with --nproc-per-node {n}")


class ShardedWeights:
    """The sharded policy as the weight-update path and `save_checkpoint` see a model."""

    def __init__(self, leader: Leader) -> None:
        self.leader = leader

    def state_dict(self, keep_vars: bool = False) -> dict[str, torch.Tensor]:
        return dict(self.leader.full_weights())

    def save_pretrained(self, path, **kwargs) -> None:
        self.leader.learner.model.save_pretrained(path, state_dict=self.state_dict(), **kwargs)


def make_learner(cfg: ExperimentConfig, model_dir: str, device: str
                 ) -> tuple[Learner | Leader, Any, Any]:
    """(learner, model-for-export, tokenizer) of this process. On rank 0 of several, the
    learner is a `Leader` and the model a `ShardedWeights` view; the followers are sent
    `model_dir` here and start building their own shard."""
    check_processes(cfg, device)
    d = init_dist(device) if launched_rank() is not None else None
    if d is not None:
        d.broadcast(model_dir)
    learner, tokenizer = _build(cfg, model_dir, device, d)
    if d is None:
        return learner, learner.model, tokenizer
    leader = Leader(learner, d)
    return leader, ShardedWeights(leader), tokenizer


def follow(cfg: ExperimentConfig, device: str) -> None:
    """Ranks > 0: wait for rank 0's model directory, build the same learner, serve."""
    d = init_dist(device)
    try:
        model_dir = d.broadcast()
        learner, _ = _build(cfg, model_dir, device, d)
        serve_followers(learner, d)
    finally:
        torch.distributed.destroy_process_group()


def restore_learner(learner: Learner | Leader, path: Path, state: dict) -> None:
    """Load a checkpoint's weights and optimizer state into this run's learner. Sharded
    checkpoints load at any process count (one process reads every rank's shards);
    one written by a single process resumes only with one."""
    sharded, step = Path(path) / SHARDED_DIR, int(state["step"])
    if isinstance(learner, Leader):
        if not sharded.is_dir():
            raise ConfigError(f"{path} was written by one learner process (no {SHARDED_DIR}/); "
                              f"resume it with scheduler.train_processes = 1")
        learner.load_sharded(sharded, step)
    elif sharded.is_dir():
        load_sharded(learner.model, learner.optimizer, sharded)
        learner.step = step
    else:
        from safetensors.torch import load_file

        weights: dict = {}
        for shard in sorted(Path(path).glob("*.safetensors")):
            weights.update(load_file(str(shard)))
        learner.model.load_state_dict(weights, strict=False)
        learner.load_state_dict(state["learner"])


def _build(cfg: ExperimentConfig, model_dir: str, device: str, d: Dist | None):
    from areal_lite.models import load_causal_lm, load_tokenizer

    if d is not None:
        device = str(d.device)
    model = load_causal_lm(model_dir, device=device, dtype="float32")
    tokenizer = load_tokenizer(model_dir)
    ref = None
    if cfg.algorithm.kl_coef > 0:  # frozen, forward only: a full replica on each rank
        ref = load_causal_lm(model_dir, device=device, dtype=cfg.actor.dtype).eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    learner = Learner(model, cfg=cfg.train, algo=cfg.algorithm, device=device,
                      gradient_checkpointing=cfg.actor.gradient_checkpointing, ref_model=ref,
                      pad_token_id=pad, max_new_tokens=cfg.rollout.sampling.max_new_tokens,
                      dist=d)
    return learner, tokenizer

