"""Trainer -> engine: put the learner's new weights into the inference engine.

The path is chosen once, when the run starts (`make_weight_sync`), from the config:

    local backend                 "copy": pause between decode steps, `copy_` every
                                  parameter in place, bump the version, resume — requests
                                  in flight continue with the new weights and tag their
                                  next tokens with the new version (decision 7)
    sglang, weight_update=tensor  CUDA IPC handles through update_weights_from_tensor
    sglang, weight_update=disk    save safetensors, update_weights_from_disk
    sglang, weight_update=distributed  broadcast from the trainer's rank 0 through an
                                  open `WeightGroup` (engine/sglang/weight_group.py)

each inside pause/continue. A combination that cannot work is a `ConfigError` naming the
keys at start, never a fallback discovered at the first step.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from areal_lite.config import ConfigError
from areal_lite.engine.base import Engine
from areal_lite.models import named_weights

if TYPE_CHECKING:
    from areal_lite.config import RolloutConfig
    from areal_lite.engine.sglang.weight_group import WeightGroup

__all__ = ["WeightSync", "make_weight_sync", "swap_weights", "weight_update_mode"]

WeightSync = Callable[[torch.nn.Module, int], Awaitable[float]]  # (model, version) -> s paused


def weight_update_mode(rollout: RolloutConfig) -> str:
    """The one weight-update path of a run: "copy" (local engine) or the SGLang mode."""
    return "copy" if rollout.backend == "local" else rollout.sglang.weight_update


def make_weight_sync(rollout: RolloutConfig, engine: Engine, *, scratch_dir: Path,
                     group: WeightGroup | None = None) -> WeightSync:
    """The run's weight-update function, checked against the engine it will drive."""
    mode = weight_update_mode(rollout)
    if mode == "disk" and not hasattr(engine, "update_weights_from_disk"):
        raise ConfigError(f"rollout.sglang.weight_update = 'disk' needs an engine that loads "
                          f"weights from disk; {type(engine).__name__} does not "
                          f"(rollout.backend = {rollout.backend!r})")
    if mode == "distributed" and group is None:
        raise ConfigError("rollout.sglang.weight_update = 'distributed' needs an open "
                          "weight-update group (WeightGroup(engine, cfg.rollout.sglang)); "
                          "Trainer opens it when rollout.backend = 'sglang'")

    async def sync(model: torch.nn.Module, version: int) -> float:
        return await swap_weights(engine, model, version, mode=mode,
                                  scratch_dir=scratch_dir, group=group)

    return sync


async def swap_weights(engine: Engine, model: torch.nn.Module, version: int, *,
                       mode: str = "copy", scratch_dir: Path | None = None,
                       group: WeightGroup | None = None) -> float:
    """Install `model`'s weights as `version` by `mode`; returns the seconds generation
    was paused. "copy" and "tensor" both go through `engine.update_weights` (the local
    engine copies in place; the SGLang client sends CUDA IPC handles)."""
    if mode == "distributed":
        if group is None:
            raise ValueError("weight_update = 'distributed' needs an open weight-update group: "
                             "pass group=WeightGroup(engine, cfg.rollout.sglang) after "
                             "`await group.open()` (Trainer does this when rollout.backend = "
                             "'sglang'), or use weight_update = 'disk'")
        if group.engine is not engine:
            raise ValueError("the weight-update group belongs to another engine")
        return await _paused(engine, lambda: group.update(model, version))
    if mode == "disk":
        if scratch_dir is None or not hasattr(engine, "update_weights_from_disk"):
            raise ValueError(f"disk weight sync needs a scratch directory and an engine with "
                             f"update_weights_from_disk ({type(engine).__name__})")
        path = scratch_dir / f"weights_v{version}"
        await asyncio.to_thread(_save, model, path)  # before the pause: generation goes on
        try:
            return await _paused(engine, lambda: engine.update_weights_from_disk(str(path), version))
        finally:
            await asyncio.to_thread(shutil.rmtree, path, ignore_errors=True)
    if mode not in ("copy", "tensor"):
        raise ValueError(f"unknown weight-update mode {mode!r}")
    # before the pause and off the loop: from an FSDP2 model (train/ranks.py) this
    # gathers every sharded parameter, a collective with the other learner ranks
    named = await asyncio.to_thread(named_weights, model)
    return await _paused(engine, lambda: engine.update_weights(named, version))


async def _paused(engine: Engine, update: Callable[[], Awaitable[None]]) -> float:
    """Run `update` with generation paused; returns the seconds it was paused."""
    start = time.perf_counter()
    await engine.pause()
    try:
        await update()
    finally:
        await engine.resume()
    return time.perf_counter() - start


def _save(model: torch.nn.Module, path: Path) -> None:
    model.save_pretrained(path, safe_serialization=True)
