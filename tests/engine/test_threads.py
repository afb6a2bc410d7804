"""How the engine's step thread and the learner split the CPU cores (engine/local/threads.py)."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from areal_lite.engine.local.engine import LocalEngine
from areal_lite.engine.local.threads import (
    CoreSplit,
    Rebalancer,
    plan_split,
    run_learner,
    set_thread_count,
)
from areal_lite.models import load_causal_lm
from areal_lite.types import GenerateRequest, SamplingParams


def test_plan_split_only_when_the_two_sides_overlap_on_a_cpu():
    assert plan_split(0, overlapped=True, device="cpu", num_cores=2) == CoreSplit(2, 1, 1)
    assert plan_split(3, overlapped=True, device="cpu", num_cores=8) == CoreSplit(8, 3, 5)
    assert plan_split(0, overlapped=False, device="cpu", num_cores=8) is None  # sync RL
    assert plan_split(-1, overlapped=True, device="cpu", num_cores=8) is None  # off
    assert plan_split(0, overlapped=True, device="cuda", num_cores=8) is None
    assert plan_split(0, overlapped=True, device="cpu", num_cores=1) is None
    with pytest.raises(ValueError, match="rollout.local.engine_threads = 2 leaves the learner"):
        plan_split(2, overlapped=True, device="cpu", num_cores=2)
    with pytest.raises(ValueError, match="rollout.local.engine_threads must be"):
        plan_split(-2, overlapped=True, device="cpu", num_cores=2)


def test_the_split_is_on_by_default():
    """Default config: one decode thread during an asynchronous CPU update (measured on
    2 cores); -1 turns it off."""
    from areal_lite.config_toml import loads_config

    cfg = loads_config("", [])
    assert cfg.rollout.local.engine_threads == 0
    assert plan_split(cfg.rollout.local.engine_threads, overlapped=True, device="cpu",
                      num_cores=2) == CoreSplit(2, 1, 1)
    off = loads_config("", ["rollout.local.engine_threads=-1"])
    assert plan_split(off.rollout.local.engine_threads, overlapped=True, device="cpu",
                      num_cores=2) is None


def test_thread_counts_are_per_thread():
    seen = {}

    def worker(name: str, n: int, ready: threading.Barrier) -> None:
        set_thread_count(n)
        ready.wait()  # both have set theirs before either reads
        seen[name] = torch.get_num_threads()

    ready = threading.Barrier(2)
    threads = [threading.Thread(target=worker, args=(name, n, ready))
               for name, n in (("a", 1), ("b", 3))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == {"a": 1, "b": 3}


async def test_run_learner_splits_while_it_runs_and_gives_the_engine_its_cores_back(
        tiny_model_dir):
    model = load_causal_lm(tiny_model_dir, device="cpu", dtype="float32")
    split = CoreSplit(num_cores=3, engine=1, learner=2)
    async with LocalEngine(model) as engine:
        started, release = threading.Event(), threading.Event()
        during = {}

        def update(x: int, *, y: int, on_microbatch) -> dict:
            during["learner"] = torch.get_num_threads()
            on_microbatch()  # the engine has nothing to do: the learner takes every core
            during["idle"] = torch.get_num_threads()
            started.set()
            release.wait(30)
            return {"sum": x + y}

        task = asyncio.create_task(run_learner(split, engine, update, 1, y=2))
        await asyncio.to_thread(started.wait, 30)
        during["engine"] = await engine.run_on_step_thread(torch.get_num_threads)
        release.set()
        assert await task == {"sum": 3, "learner_all_cores_frac": 1.0}
        assert during == {"learner": 2, "idle": 3, "engine": 1}
        assert await engine.run_on_step_thread(torch.get_num_threads) == 3  # given back
        out = await engine.generate(GenerateRequest(  # and it still generates
            rid="r", input_ids=[5, 6, 7], sampling=SamplingParams(max_new_tokens=3,
                                                                  temperature=0.0)))
        assert len(out.output_ids) >= 1


async def test_run_learner_without_a_split_is_a_plain_worker_thread():
    main = threading.get_ident()
    other = await run_learner(None, object(), threading.get_ident)
    assert other != main


def test_rebalancer_gives_the_learner_every_core_only_while_the_engine_is_idle():
    busy = [True, False, False, True]
    seen = []

    def learner() -> None:
        r = Rebalancer(CoreSplit(num_cores=4, engine=1, learner=3), lambda: busy.pop(0))
        for _ in range(4):
            r()
            seen.append(torch.get_num_threads())
        seen.append((r.calls, r.all_cores))

    t = threading.Thread(target=learner)  # its own thread: counts are per thread
    t.start()
    t.join()
    assert seen == [3, 4, 4, 3, (4, 2)]


async def test_engine_has_work_while_a_request_is_decoded(tiny_model_dir):
    model = load_causal_lm(tiny_model_dir, device="cpu", dtype="float32")
    async with LocalEngine(model) as engine:
        assert not engine.has_work()
        task = asyncio.create_task(engine.generate(GenerateRequest(
            rid="r", input_ids=[5, 6, 7], sampling=SamplingParams(max_new_tokens=64,
                                                                  temperature=1.0,
                                                                  ignore_eos=True))))
        await asyncio.sleep(0)
        assert engine.has_work()
        await task
        assert not engine.has_work()
