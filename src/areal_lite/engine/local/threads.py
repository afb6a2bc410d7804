"""Local engine stage, CPU side: how the engine's step thread and the learner share cores.

In a colocated CPU run the engine's decode steps (its step thread) and the learner's
forward/backward (a worker thread) both run parallel torch ops, and each OS thread has
its own OpenMP pool of `torch.get_num_threads()` workers. When both run at once on N
cores, 2N workers contend for N cores: a parallel region ends only when its slowest
worker does, so a worker descheduled by the other side stalls the whole op, and libgomp
stops spinning once pools outnumber cores, so every later op also pays wake-ups.

`CoreSplit` gives the two sides disjoint shares while the learner runs: the engine's
step thread gets `engine` threads and the learner `learner = num_cores - engine`;
`run_learner` sets both (the engine's between two steps, on its own thread) and gives
the engine every core back when the update ends, so generation alone (synchronous RL,
or the wait for a batch) is not slowed. It is off by default (`rollout.local.engine_threads = -1`): when generation is
much cheaper than the update (2 cores, SmolLM2, 8 x 8 samples: ~28 s vs ~90 s), the
engine finishes the next batch early in the update and then idles while the learner
is held to its share, so a split can lengthen the step; measure with
`benchmarks/vs_trl.py --areal-override rollout.local.engine_threads=0` first.
A split only makes sense when the two overlap:
`plan_split` returns None (torch defaults, nothing changed) for synchronous RL, on
CUDA, or with a single core.

torch keeps the count per OS thread, but a thread that has not yet run a parallel op
takes the value the last `set_num_threads` call in any thread left; `set_thread_count`
reads the count first, which fixes the calling thread's own before it changes it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

__all__ = ["CoreSplit", "plan_split", "run_learner", "set_thread_count"]

T = TypeVar("T")


def set_thread_count(n: int) -> int:
    """Give the calling thread `n` torch intra-op threads; return its previous count."""
    before = torch.get_num_threads()  # initializes this thread's own count first
    if n != before:
        torch.set_num_threads(n)
    return before


@dataclass(frozen=True, slots=True)
class CoreSplit:
    """Torch threads of each side while the learner runs (engine + learner == num_cores)."""

    num_cores: int  # the engine's count when the learner is idle
    engine: int  # the engine's step thread during an update, >= 1
    learner: int  # the learner's thread during an update, >= 1


def plan_split(engine_threads: int, *, overlapped: bool, device: str,
               num_cores: int | None = None) -> CoreSplit | None:
    """The split for `rollout.local.engine_threads` (-1 = off, 0 = auto: 1 thread for
    the engine, the rest for the learner, as the update is most of a step's work) of
    `num_cores` torch threads (default: the calling thread's count).

    None when nothing should change: off, synchronous RL (`overlapped` False: the two
    never run at once), a CUDA device, or a single core. Raises ValueError naming the key
    when the engine would leave the learner no thread.
    """
    if engine_threads < -1:
        raise ValueError(f"rollout.local.engine_threads must be -1 (off), 0 (auto) or >= 1, "
                         f"got {engine_threads}")
    if num_cores is None:
        num_cores = torch.get_num_threads()
    if engine_threads == -1 or not overlapped or device != "cpu" or num_cores < 2:
        return None
    engine = engine_threads or 1
    if engine >= num_cores:
        raise ValueError(f"rollout.local.engine_threads = {engine} leaves the learner no "
                         f"thread of the {num_cores} torch threads; use at most "
                         f"{num_cores - 1}, or 0 (auto)")
    return CoreSplit(num_cores=num_cores, engine=engine, learner=num_cores - engine)


def _with_count(n: int, fn: Callable[..., T], args: tuple, kwargs: dict) -> T:
    set_thread_count(n)
    return fn(*args, **kwargs)


async def run_learner(split: CoreSplit | None, engine: Any, fn: Callable[..., T],
                      *args: Any, **kwargs: Any) -> T:
    """`await asyncio.to_thread(fn, *args, **kwargs)` with the cores split as `split` says
    while it runs (`engine` is a started `LocalEngine`); `split` None changes nothing."""
    if split is None:
        return await asyncio.to_thread(fn, *args, **kwargs)
    await engine.run_on_step_thread(set_thread_count, split.engine)
    try:
        return await asyncio.to_thread(_with_count, split.learner, fn, args, kwargs)
    finally:
        task = asyncio.current_task()
        if task is None or not task.cancelling():  # cancelled: the engine is closing anyway
            await engine.run_on_step_thread(set_thread_count, split.num_cores)
