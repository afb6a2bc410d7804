"""Trainer -> engine: put the learner's new weights into the inference engine.

Local engine (colocated, same process): pause between decode steps, `copy_` every
parameter in place, bump the version, resume — requests in flight continue with the
new weights and tag their next tokens with the new version (decision 7).
SGLang: "tensor" (colocated GPUs: CUDA IPC handles through update_weights_from_tensor),
"disk" (save safetensors, update_weights_from_disk) or "distributed" (broadcast from
the trainer's rank 0 through an open `weight_group.WeightGroup`), each inside
pause/continue.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from areal_lite.engine.base import Engine

if TYPE_CHECKING:
    from areal_lite.weight_group import WeightGroup


def named_weights(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The model's parameters and persistent buffers by state-dict name, detached."""
    return [(name, t.detach()) for name, t in model.state_dict(keep_vars=True).items()]


async def swap_weights(engine: Engine, model: torch.nn.Module, version: int, *,
                       mode: str = "tensor", scratch_dir: Path | None = None,
                       group: WeightGroup | None = None) -> float:
    """Install `model`'s weights as `version`; returns the seconds generation was paused.

    mode "distributed" needs `group`, an open WeightGroup over `engine`'s servers.
    """
    if mode == "distributed":
        if group is None:
            raise ValueError("weight_update = 'distributed' needs an open weight-update group: "
                             "pass group=WeightGroup(engine, cfg.rollout.sglang) after "
                             "`await group.open()` (Trainer does this when rollout.backend = "
                             "'sglang'), or use weight_update = 'disk'")
        if group.engine is not engine:
            raise ValueError("the weight-update group belongs to another engine")
        return await _paused(engine, lambda: group.update(model, version))
    if mode == "disk" and hasattr(engine, "update_weights_from_disk"):
        assert scratch_dir is not None, "disk weight sync needs a scratch directory"
        path = scratch_dir / f"weights_v{version}"
        await asyncio.to_thread(_save, model, path)  # before the pause: generation goes on
        try:
            return await _paused(engine, lambda: engine.update_weights_from_disk(str(path), version))
        finally:
            await asyncio.to_thread(shutil.rmtree, path, ignore_errors=True)
    return await _paused(engine, lambda: engine.update_weights(named_weights(model), version))


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
