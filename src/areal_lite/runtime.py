"""Process runtime, below both the CLI and the trainer: the event loop and host memory.

`run_async` runs a coroutine on uvloop when it is installed (asyncio otherwise).

`tune_gc` keeps the cyclic garbage collector's cost per request from growing with the
number of live sessions: it freezes the start-up objects (torch, transformers, the
tokenizer: they live for the whole run) out of every collection, and collects the young
generation every 50,000 allocations instead of 700, so the collections that walk all
live requests' objects run far less often. Measured with 2,048 in-process agents (the
in-process `proxy` benchmark, shared 2-core box): GC CPU 4.6 s -> 1.3 s for the same
run, about 1.1 -> 0.4 ms per chat call.

`limit_malloc_growth` keeps a long colocated CPU run's memory bounded under glibc malloc.
Torch on the CPU allocates and frees large tensors from several threads at once (the
engine's step thread, the learner's thread, the event loop). glibc gives busy threads
their own arenas and, after the first large free, raises its mmap threshold on its own,
so later large tensors come from arenas, and what is freed there stays mapped and
fragmented. Measured on the 2-core box: the embedded GSM8K example grew to 24 GiB and
was OOM-killed within five minutes; with a fixed 1 MiB mmap threshold and two arenas it
stays at 4-6 GiB at the same speed. `limit_malloc_growth` sets both through `mallopt`
(the same effect as MALLOC_MMAP_THRESHOLD_ / MALLOC_ARENA_MAX in the environment, which
win when the user sets them).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import sys
from collections.abc import Coroutine, Iterator
from typing import Any

M_MMAP_THRESHOLD = -3  # glibc malloc.h
M_ARENA_MAX = -8

def tune_gc() -> None:
    """Call once after start-up: objects alive now move to the GC's permanent generation
    (`gc.freeze`); later ones are collected as usual, on larger thresholds."""
    import gc

    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 50)


def run_async(main: Coroutine[Any, Any, Any]) -> Any:
    """Run `main` on uvloop when it is installed, else on the default asyncio loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


_ENV = {"MALLOC_MMAP_THRESHOLD_": M_MMAP_THRESHOLD, "MALLOC_ARENA_MAX": M_ARENA_MAX}


_limited: dict[str, int] = {}  # what limit_malloc_growth set (mmap_threshold), if it did


def limit_malloc_growth(mmap_threshold: int = 1 << 20, arena_max: int = 2) -> bool:
    """Apply the settings on Linux/glibc; False (nothing done) elsewhere."""
    if not sys.platform.startswith("linux") or not _is_glibc():
        return False
    libc = ctypes.CDLL(None)
    wanted = {M_MMAP_THRESHOLD: mmap_threshold, M_ARENA_MAX: arena_max}
    for env, option in _ENV.items():
        if env in os.environ:  # the user's explicit choice stays
            wanted.pop(option)
    done = all(libc.mallopt(option, value) == 1 for option, value in wanted.items())
    if done and M_MMAP_THRESHOLD in wanted:
        _limited["mmap_threshold"] = mmap_threshold
    return done


@contextlib.contextmanager
def learner_heap(mmap_threshold: int = 512 << 20) -> Iterator[None]:
    """While a learner update runs: a high mmap threshold, so its large activations are
    reused from the heap instead of being mapped, page-faulted and unmapped on every
    allocation (~20% of a SmolLM2 update on the 2-core box: 49 -> 41 s, same process,
    alternating); afterwards the threshold `limit_malloc_growth` set comes back and
    `malloc_trim` returns the freed heap to the system, which keeps the bound on memory.
    Does nothing unless `limit_malloc_growth` set the threshold."""
    if "mmap_threshold" not in _limited:
        yield
        return
    libc = ctypes.CDLL(None)
    libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold)
    try:
        yield
    finally:
        libc.mallopt(M_MMAP_THRESHOLD, _limited["mmap_threshold"])
        libc.malloc_trim(0)


def _is_glibc() -> bool:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION") is not None
    except (ValueError, OSError):
        return False
