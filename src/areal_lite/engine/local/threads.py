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
or the wait for a batch) is not slowed. Before every micro-batch the learner's
`Rebalancer` takes all `num_cores` threads while the engine has nothing to decode (it
finished what it may run ahead), so a split never holds the learner to its share next
to an idle core. Measured on 2 cores (a VM without AMX): matmul loops shaped like the
two sides ran at 54% (learner) + 34% (engine) of their solo speeds with 2 threads each,
at 53% + 70% with 1 each (benchmarks/core_split.py); the word-problem recipe's updates
took 58 s instead of 67 s on average with the engine still keeping ahead, and the
asynchronous step of benchmarks/vs_trl.py 62 s (73-81 s in three earlier runs without).
It is on by default (`rollout.local.engine_threads = 0`: one thread for the engine;
-1 turns it off).
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

__all__ = ["CoreSplit", "Rebalancer", "plan_split", "run_learner", "set_thread_count"]

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


class Rebalancer:
    """The learner's `on_microbatch` hook under a split: before each micro-batch, on the
    learner's own thread, the learner's share of threads while `engine_busy()` is true,
    all `num_cores` while it is false (the engine finished the batches it may run ahead
    and would leave a core idle). Counts the micro-batches and the all-core ones."""

    def __init__(self, split: CoreSplit, engine_busy: Callable[[], bool]) -> None:
        self.split, self.engine_busy = split, engine_busy
        self.calls = self.all_cores = 0

    def __call__(self) -> None:
        busy = self.engine_busy()
        set_thread_count(self.split.learner if busy else self.split.num_cores)
        self.calls += 1
        self.all_cores += not busy


def _with_count(n: int, fn: Callable[..., T], args: tuple, kwargs: dict) -> T:
    set_thread_count(n)
    return fn(*args, **kwargs)


async def run_learner(split: CoreSplit | None, engine: Any, fn: Callable[..., T],
                      *args: Any, **kwargs: Any) -> T:
    """`await asyncio.to_thread(fn, *args, **kwargs)` with the cores split as `split` says
    while it runs (`engine` is a started `LocalEngine`); `split` None changes nothing.

    Under a split `fn` also gets `on_microbatch=` a `Rebalancer` (a learner's
    `train_step` takes it), so the learner takes every core back whenever the engine is
    idle; a dict result gains "learner_all_cores_frac", the share of micro-batches that
    ran on all cores."""
    if split is None:
        return await asyncio.to_thread(fn, *args, **kwargs)
    await engine.run_on_step_thread(set_thread_count, split.engine)
    rebalance = Rebalancer(split, engine.has_work)
    try:
        result = await asyncio.to_thread(_with_count, split.learner, fn, args,
                                         {**kwargs, "on_microbatch": rebalance})
        if isinstance(result, dict):
            result["learner_all_cores_frac"] = rebalance.all_cores / max(rebalance.calls, 1)
        return result
    finally:
        task = asyncio.current_task()
        if task is None or not task.cancelling():  # cancelled: the engine is closing anyway
            await engine.run_on_step_thread(set_thread_count, split.num_cores)
