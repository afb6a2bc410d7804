"""The recipe: rollouts -> advantages -> policy update -> weight swap -> metrics/eval/ckpt.

`Trainer(cfg).train(workflow="pkg.mod.Agent")` (or `areal-lite train config.toml`)
runs the whole loop in one process: the rollout side (engine, proxy, agents) on the
event loop, the learner's forward/backward in a worker thread so rollouts keep going
while the policy trains (asynchronous RL, bounded by rollout.max_head_offpolicyness).

Supervision: the producer (and every group task it starts) and the step loop live in
one `asyncio.TaskGroup`. An exception that escapes the episode boundary (a bug in the
controller, an engine error past its retries) cancels the rest, aborting the engine
requests in flight and freeing their sessions, and `train()` raises that exception
with its own traceback instead of waiting forever for a batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from areal_lite.config import ExperimentConfig, run_path
from areal_lite.config_toml import config_to_toml, load_config, validate_config
from areal_lite.data.prompts import PromptStream, load_dataset_rows
from areal_lite.engine.local.threads import CoreSplit, plan_split, run_learner
from areal_lite.engine.sglang.weight_group import WeightGroup
from areal_lite.engine.stats import EngineStats, engine_metrics
from areal_lite.metrics import MetricsLogger
from areal_lite.rollout.controller import EpisodeResult, GroupResult, RolloutController
from areal_lite.rollout.online import OnlineProducer
from areal_lite.rollout.producer import GroupProducer
from areal_lite.rollout.stack import RolloutStack, open_rollout, resolve_device
from areal_lite.runtime import learner_heap, limit_malloc_growth, run_async
from areal_lite.train.algorithms import overlong_penalty
from areal_lite.train.checkpoint import (
    load_latest_checkpoint,
    restore_rng,
    save_checkpoint,
)
from areal_lite.train.distributed import Leader
from areal_lite.train.learner import Learner
from areal_lite.train.ranks import (
    follow,
    launched_rank,
    make_learner,
    restore_learner,
    under_torchrun,
)
from areal_lite.train.weight_sync import WeightSync, make_weight_sync
from areal_lite.types import Sample

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Run:
    """The parts of one run, built once by `atrain` and handed to every stage."""

    stack: RolloutStack
    learner: Learner | Leader  # Leader: rank 0 of scheduler.train_processes FSDP2 ranks
    model: Any  # the learner's torch.nn.Module (fp32 master weights), or its ShardedWeights
    prompts: PromptStream
    producer: GroupProducer | OnlineProducer  # OnlineProducer: rollout.agent.mode = "online"
    metrics: MetricsLogger
    sync: WeightSync  # (model, version) -> seconds generation was paused
    eval_rows: list[dict]
    cores: CoreSplit | None  # engine/learner torch threads during updates (CPU, async)


class Trainer:
    """Owns one training run, described by an `ExperimentConfig` (or a TOML path)."""

    def __init__(self, config: ExperimentConfig | str | Path, overrides: list[str] = ()) -> None:
        self.cfg = (validate_config(config) if isinstance(config, ExperimentConfig)
                    else load_config(config, overrides))
        self.run_dir = run_path(self.cfg)
        self.version = 0  # weight version in the engine
        self.step = 0  # RL steps done
        self._engine_mark: tuple[EngineStats, float] | None = None  # totals at the last step

    def train(self, workflow: Any = None) -> dict[str, float]:
        """Run the loop to `trainer.total_steps`; returns the last step's metrics."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass  # no loop running: the normal case (run outside this handler, so errors
            # raised while training carry no "no running event loop" context)
        else:
            raise RuntimeError("Trainer.train() was called inside an event loop; "
                               "use `await trainer.atrain(workflow)` there")
        rank = launched_rank()
        if self.cfg.scheduler.type == "slurm" and not under_torchrun():
            from areal_lite.scheduler.slurm import in_slurm_job, submit

            if not in_slurm_job():  # the job runs this same train() on its nodes
                job, logs = submit(self.cfg, workflow)
                log.info("submitted Slurm job %s; logs: %s", job, logs)
                return {}
        if not under_torchrun() and self.cfg.scheduler.train_processes > 1:
            from areal_lite.scheduler.local import launch_torchrun

            launch_torchrun(self.cfg, workflow)  # this process waits; the ranks train
            return {}
        if rank:  # a learner rank > 0: no rollout side, trains what rank 0 sends
            follow(self.cfg, resolve_device(self.cfg.actor.device))
            return {}
        return run_async(self.atrain(workflow))

    async def atrain(self, workflow: Any = None) -> dict[str, float]:
        """`train` for callers already inside an event loop."""
        try:
            return await self._atrain(workflow)
        except BaseExceptionGroup as group:
            failure: BaseException = group
            while isinstance(failure, BaseExceptionGroup) and len(failure.exceptions) == 1:
                failure = failure.exceptions[0]  # the supervisors' one failure, unwrapped
            if failure is group:
                raise
            raise failure from None

    async def _atrain(self, workflow: Any) -> dict[str, float]:
        cfg = self.cfg
        limit_malloc_growth()  # engine + learner threads fragment glibc arenas otherwise
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.toml").write_text(config_to_toml(cfg))
        async with open_rollout(cfg, workflow) as stack, contextlib.AsyncExitStack() as exits:
            run = await self._open_run(stack, exits)
            async with asyncio.TaskGroup() as tasks:
                producing = tasks.create_task(run.producer.run(), name="group-producer")
                watching = None  # a launched server that cannot come back ends the run
                if stack.servers is not None:
                    watching = tasks.create_task(stack.servers.wait_failure(), name="servers")
                try:
                    last = await self._loop(run)
                finally:
                    producing.cancel()  # every running group is cancelled with it
                    if watching is not None:
                        watching.cancel()
            run.metrics.plot()
            return last

    async def _open_run(self, stack: RolloutStack, exits: contextlib.AsyncExitStack) -> _Run:
        cfg = self.cfg
        learner, model = await asyncio.to_thread(self._make_learner, stack.model_dir)
        if isinstance(learner, Leader):
            exits.callback(learner.stop)  # the other ranks leave their command loop
        group = None
        if cfg.rollout.backend == "sglang" and cfg.rollout.sglang.weight_update == "distributed":
            group = await exits.enter_async_context(
                WeightGroup(stack.engine, cfg.rollout.sglang))  # the servers join it now
        sync = make_weight_sync(cfg.rollout, stack.engine, scratch_dir=self.run_dir, group=group)
        prompts = PromptStream(load_dataset_rows(cfg.data.train, split="train", seed=cfg.seed),
                               batch_size=cfg.rollout.batch_size, seed=cfg.seed)
        eval_rows = self._eval_rows()
        await self._resume(learner, model, prompts, sync)
        producer: GroupProducer | OnlineProducer
        if cfg.rollout.agent.mode == "online":  # episodes come from outside (rollout/online.py)
            producer = OnlineProducer(stack.proxy, cfg.rollout, run_dir=self.run_dir,
                                      version=lambda: self.version,
                                      consumed=self.step * cfg.rollout.batch_size)
        else:
            producer = GroupProducer(stack.controller, prompts, batch_size=cfg.rollout.batch_size,
                                     group_size=cfg.rollout.group_size,
                                     max_head_offpolicyness=cfg.rollout.max_head_offpolicyness,
                                     version=lambda: self.version,
                                     consumed=self.step * cfg.rollout.batch_size,
                                     max_failures_frac=cfg.rollout.max_episode_failures_frac)
        metrics = exits.enter_context(MetricsLogger(self.run_dir, cfg.metrics, start_step=self.step))
        self._engine_metrics(stack.engine)  # mark the start
        cores = None if cfg.rollout.backend != "local" else plan_split(
            cfg.rollout.local.engine_threads,
            overlapped=cfg.rollout.max_head_offpolicyness > 0, device=learner.device.type)
        return _Run(stack=stack, learner=learner, model=model, prompts=prompts,
                    producer=producer, metrics=metrics, sync=sync, eval_rows=eval_rows,
                    cores=cores)

    async def _loop(self, run: _Run) -> dict[str, float]:
        """Steps to total_steps, with evals and checkpoints on their schedules."""
        t = self.cfg.trainer
        last: dict[str, float] = {}
        if self.step == 0 and t.eval_every and run.eval_rows:
            last = await self._evaluate(run.stack.controller, run.eval_rows)
            run.metrics.log(0, last)
        while self.step < t.total_steps:
            last = await self._step(run)
            if t.eval_every and run.eval_rows and (
                    self.step % t.eval_every == 0 or self.step == t.total_steps):
                evals = await self._evaluate(run.stack.controller, run.eval_rows)
                run.metrics.log(self.step, evals)
                last.update(evals)
                run.metrics.plot()
            if self.step == t.total_steps or (t.save_every and self.step % t.save_every == 0):
                await self._save(run)
        return last

    # --- one RL step -----------------------------------------------------------------

    async def _step(self, run: _Run) -> dict[str, float]:
        t0 = time.perf_counter()
        groups, start_versions = await run.producer.next_batch()
        t1 = time.perf_counter()
        samples = [self._shape_rewards(g.samples) for g in groups]
        # the update's activations from the heap. Synchronous RL: every size (the engine is
        # idle, nothing else fragments the heap meanwhile); asynchronous: up to 64 MiB (a
        # micro-batch's activations, not its logits), as the engine's allocations share
        # the heap and a high bound let a colocated run's peak RSS grow by gigabytes
        sync = self.cfg.rollout.max_head_offpolicyness == 0
        with learner_heap(512 << 20 if sync else 64 << 20):
            stats = await run_learner(run.cores, run.stack.engine, run.learner.train_step,
                                      samples, current_version=self.version)
        t2 = time.perf_counter()
        paused_s = await run.sync(run.model, self.version + 1)
        self.version += 1
        self.step += 1
        await run.producer.notify()
        row = {**{f"train/{k}": v for k, v in stats.items()},
               **_rollout_metrics(groups, run.stack.controller, run.producer),
               "reward/mean": _mean([ep.reward for g in groups for ep in g.episodes
                                     if ep.reward is not None]),
               "rollout/staleness": stats.get("staleness", 0.0),
               "rollout/start_version_lag": self.version - 1 - _mean(start_versions),
               "perf/tokens_per_s": stats.get("tokens_per_s", 0.0),
               "time/generation_s": t1 - t0, "time/update_s": t2 - t1,
               "time/weight_swap_s": paused_s, "time/step_s": time.perf_counter() - t0,
               "version": float(self.version)}
        row.update(self._engine_metrics(run.stack.engine))
        if run.stack.servers is not None:  # restarts, sessions moved, aborts (SGLang)
            row.update(run.stack.servers.metrics())
        run.metrics.log(self.step, row)
        run.metrics.progress(self.step, self.cfg.trainer.total_steps, row)
        return row

    def _engine_metrics(self, engine) -> dict[str, float]:
        """The engine's work since the previous call (engine/stats.py): every token it
        generated since the last step's metrics, evaluation included.
        """
        stats = engine.stats
        now = time.perf_counter()
        mark, self._engine_mark = self._engine_mark, (stats, now)
        return engine_metrics(mark[0], stats, now - mark[1]) if mark else {}

    def _shape_rewards(self, samples: list[Sample]) -> list[Sample]:
        algo, max_new = self.cfg.algorithm, self.cfg.rollout.sampling.max_new_tokens
        if not algo.overlong_buffer_len:
            return samples
        for s in samples:  # the limit the request had (an agent's max_tokens), if known
            s.reward += overlong_penalty(_last_span(s.loss_mask), s.max_new_tokens or max_new,
                                         algo.overlong_buffer_len, algo.overlong_penalty_factor)
            for sp in s.spans:  # tree export: each completion's own length and limit
                sp.reward += overlong_penalty(sp.end - sp.start, sp.max_new_tokens or max_new,
                                              algo.overlong_buffer_len,
                                              algo.overlong_penalty_factor)
        return samples

    async def _evaluate(self, controller: RolloutController, rows: list[dict]) -> dict[str, float]:
        """Greedy pass over the eval rows through the same workflow. Accuracy is per
        episode: the mean of each episode's score (its reward; with dict rewards the best
        completion's, so a problem solved on the third try counts 1); failed ones 0."""
        start = time.perf_counter()
        episodes = await asyncio.gather(*(controller.run_episode(r, greedy=True) for r in rows))
        rewards = [ep.score if ep.score is not None else 0.0 for ep in episodes]
        return {"eval/accuracy": _mean(rewards), "eval/num_failed": float(sum(e.failed for e in episodes)),
                **_turn_accuracy(episodes, self.cfg.trainer.eval_solved_reward),
                "eval/time_s": time.perf_counter() - start}

    # --- model, checkpoints ----------------------------------------------------------

    def _make_learner(self, model_dir: str) -> tuple[Learner | Leader, Any]:
        learner, model, self.tokenizer = make_learner(
            self.cfg, model_dir, resolve_device(self.cfg.actor.device))  # train/ranks.py
        return learner, model

    async def _resume(self, learner: Learner, model, prompts: PromptStream,
                      sync: WeightSync) -> None:
        found = await asyncio.to_thread(load_latest_checkpoint, self.run_dir)
        if found is None:
            return
        path, state = found
        await asyncio.to_thread(restore_learner, learner, path, state)  # train/ranks.py
        prompts.load_state_dict(state["extra"]["data"])
        restore_rng(state)
        self.step = int(state["step"])
        self.version = int(state["extra"]["version"])
        await sync(model, self.version)
        log.info("resumed from %s at step %d (weight version %d)", path, self.step, self.version)

    async def _save(self, run: _Run) -> None:
        extra = {"data": run.prompts.state_dict(unfinished=run.producer.unfinished()),
                 "version": self.version}
        path = await asyncio.to_thread(
            save_checkpoint, self.run_dir, self.step, model=run.model, tokenizer=self.tokenizer,
            learner_state=run.learner.state_dict(), extra_state=extra,
            keep=self.cfg.trainer.keep_checkpoints,
            write_sharded=run.learner.save_sharded if isinstance(run.learner, Leader) else None)
        log.info("saved checkpoint %s", path)

    def _eval_rows(self) -> list[dict]:
        cfg = self.cfg
        if not cfg.data.eval or not cfg.trainer.eval_every:
            return []
        if cfg.rollout.agent.mode == "online" and not cfg.workflow:
            return []  # no workflow here to evaluate with: the agents live outside
        rows = load_dataset_rows(cfg.data.eval, split="eval", seed=cfg.seed)
        return rows[: cfg.trainer.max_eval_prompts] if cfg.trainer.max_eval_prompts else rows


def _rollout_metrics(groups: list[GroupResult], controller: RolloutController,
                     producer: GroupProducer | OnlineProducer) -> dict[str, float]:
    episodes = [ep for g in groups for ep in g.episodes]
    return {"rollout/episodes_failed": float(sum(ep.failed for ep in episodes)),
            "rollout/episodes_total_failed": float(controller.stats.num_failed),
            "rollout/pool_restarts": float(controller.stats.pool_restarts),
            "rollout/groups_rejected": float(producer.num_rejected),
            "rollout/batches_dropped": float(producer.num_batches_dropped),
            "rollout/completions_per_episode": _mean([ep.num_completions for ep in episodes]),
            "cache/prefix_breaks": float(controller.proxy.sessions.num_prefix_breaks)}


def _turn_accuracy(episodes: list[EpisodeResult], solved_reward: float) -> dict[str, float]:
    """First-try and solved-within-3 accuracy from each episode's per-turn raw rewards.

    An episode's turns are its completions in the order they were made (individual
    export: one sample each, in insertion order; tree export: the spans, in path order,
    which is the order they were made for a chain of turns); a turn is solved when its
    raw reward is >= `solved_reward`, and a failed episode solves nothing. With concat
    export the per-turn rewards are not in the samples, so nothing is reported.
    """
    if any(len(s.completion_ids) != 1 and not s.spans for ep in episodes for s in ep.samples):
        return {}
    turns = [[r >= solved_reward for s in ep.samples
              for r in ([sp.raw_reward for sp in s.spans] if s.spans else [s.raw_reward])]
             for ep in episodes]
    return {"eval/first_try": _mean([bool(t) and t[0] for t in turns]),
            "eval/within_3": _mean([any(t[:3]) for t in turns]),
            "eval/turns": _mean([len(t) for t in turns])}


def _last_span(mask: list[int]) -> int:
    """Length of the last run of 1s (the final completion's sampled tokens)."""
    n = 0
    for m in reversed(mask):
        if m:
            n += 1
        elif n:
            break
    return n


def _mean(xs) -> float:
    xs = list(xs)
    return float(sum(xs) / len(xs)) if xs else 0.0
