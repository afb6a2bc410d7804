"""Benchmark: how a learner and an engine sharing the CPU cores slow each other down.

Two threads of torch work shaped like the two sides of an asynchronous CPU run on the
135M model (width 576, MLP 1536): a "learner" doing forward+backward over 1024-token
micro-batches, and an "engine" doing decode-sized matmuls (64 rows). Each runs alone
with every core first (its solo speed), then both at once, either with every core each
(the default: 2N OpenMP workers on N cores) or with the cores split between them (what
`rollout.local.engine_threads` does during an update, engine/local/threads.py). Prints
one JSON line per setting, each side's speed as a fraction of its solo speed, and their
sum (1.0 = no work lost to sharing):

    {"measure": "core_split", "setting", "threads", "learner_frac", "engine_frac", "sum"}

Usage::

    python benchmarks/core_split.py              # ~30 s on 2 cores
    python benchmarks/core_split.py --seconds 3  # shorter, noisier
"""

from __future__ import annotations

import argparse
import json
import threading
import time

import torch

from areal_lite.engine.local.threads import set_thread_count


def _learner_work():
    layers = torch.nn.Sequential(*[torch.nn.Linear(576, 1536), torch.nn.Linear(1536, 576)] * 6)
    x = torch.randn(1024, 576, requires_grad=True)
    return lambda: layers(x).sum().backward()


def _engine_work():
    weights = [torch.randn(576, 1536), torch.randn(1536, 576)] * 15
    h0 = torch.randn(64, 576)

    def step() -> None:
        h = h0
        for up, down in zip(weights[::2], weights[1::2], strict=True):
            h = (h @ up).relu() @ down
    return step


def _rate(work, threads: int, seconds: float, out: dict, key: str) -> None:
    """Run `work` on this thread with `threads` torch threads for `seconds`: calls/s."""
    set_thread_count(threads)  # this thread's own count, as the trainer sets each side's
    work()  # warm-up: this thread's OpenMP pool
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        work()
        n += 1
    out[key] = n / (time.perf_counter() - start)


def _together(learner_threads: int, engine_threads: int, seconds: float) -> dict:
    out: dict[str, float] = {}
    sides = [threading.Thread(target=_rate, args=(_learner_work(), learner_threads, seconds,
                                                   out, "learner")),
             threading.Thread(target=_rate, args=(_engine_work(), engine_threads, seconds,
                                                   out, "engine"))]
    for t in sides:
        t.start()
    for t in sides:
        t.join()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=6.0, help="per measurement")
    parser.add_argument("--cores", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    cores = args.cores
    solo: dict[str, float] = {}
    for key, work in (("learner", _learner_work()), ("engine", _engine_work())):
        t = threading.Thread(target=_rate, args=(work, cores, args.seconds, solo, key))
        t.start()
        t.join()
    settings = {"shared": (cores, cores)}
    if cores >= 2:
        settings["split"] = (cores - 1, 1)  # engine_threads = 0: 1 for the engine
    for name, (lt, et) in settings.items():
        got = _together(lt, et, args.seconds)
        fl, fe = got["learner"] / solo["learner"], got["engine"] / solo["engine"]
        print(json.dumps({"measure": "core_split", "setting": name,
                          "threads": {"learner": lt, "engine": et},
                          "learner_frac": round(fl, 3), "engine_frac": round(fe, 3),
                          "sum": round(fl + fe, 3)}), flush=True)


if __name__ == "__main__":
    main()
