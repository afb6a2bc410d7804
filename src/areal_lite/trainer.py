"""The recipe: rollouts -> advantages -> policy update -> weight swap -> metrics/eval/ckpt.

`Trainer(cfg).train(workflow="pkg.mod.Agent")` (or `areal-lite train config.toml`)
runs the whole loop in one process: the rollout side (engine, proxy, agents) on the
event loop, the learner's forward/backward in a worker thread so rollouts keep going
while the policy trains (asynchronous RL, bounded by rollout.max_head_offpolicyness).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path
from typing import Any

from areal_lite.algorithms import overlong_penalty
from areal_lite.checkpoint import load_latest_checkpoint, restore_rng, save_checkpoint
from areal_lite.config import ExperimentConfig, run_path
from areal_lite.config_toml import config_to_toml, load_config, validate_config
from areal_lite.data import PromptStream, load_dataset_rows
from areal_lite.engine.stats import EngineStats, engine_metrics
from areal_lite.hostmem import limit_malloc_growth
from areal_lite.learner import Learner
from areal_lite.metrics import MetricsLogger
from areal_lite.producer import GroupProducer
from areal_lite.rollout import GroupResult, RolloutController
from areal_lite.stack import open_rollout, resolve_device
from areal_lite.types import Sample
from areal_lite.weight_group import WeightGroup
from areal_lite.weight_sync import swap_weights

log = logging.getLogger(__name__)


class Trainer:
    """Owns one training run, described by an `ExperimentConfig` (or a TOML path)."""

    def __init__(self, config: ExperimentConfig | str | Path, overrides: list[str] = ()) -> None:
        self.cfg = (validate_config(config) if isinstance(config, ExperimentConfig)
                    else load_config(config, overrides))
        self.run_dir = run_path(self.cfg)
        self.version = 0  # weight version in the engine
        self.step = 0  # RL steps done
        self.weight_group: WeightGroup | None = None  # open while training, "distributed" only
        self._engine_mark: tuple[EngineStats, float] | None = None  # totals at the last step

    def train(self, workflow: Any = None) -> dict[str, float]:
        """Run the loop to `trainer.total_steps`; returns the last step's metrics."""
        from areal_lite.cli import run_async

        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return run_async(self.atrain(workflow))
        raise RuntimeError("Trainer.train() was called inside an event loop; "
                           "use `await trainer.atrain(workflow)` there")

    async def atrain(self, workflow: Any = None) -> dict[str, float]:
        cfg = self.cfg
        limit_malloc_growth()  # engine + learner threads fragment glibc arenas otherwise
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.toml").write_text(config_to_toml(cfg))
        async with open_rollout(cfg, workflow) as stack, contextlib.AsyncExitStack() as exits:
            learner, model = await asyncio.to_thread(self._make_learner, stack.model_dir)
            sglang = cfg.rollout.sglang
            if cfg.rollout.backend == "sglang" and sglang.weight_update == "distributed":
                self.weight_group = await exits.enter_async_context(
                    WeightGroup(stack.engine, sglang))  # the servers join it now
            prompts = PromptStream(load_dataset_rows(cfg.data.train, split="train", seed=cfg.seed),
                                   batch_size=cfg.rollout.batch_size, seed=cfg.seed)
            eval_rows = self._eval_rows()
            await self._resume(stack, learner, model, prompts)
            producer = GroupProducer(stack.controller, prompts, batch_size=cfg.rollout.batch_size,
                                     group_size=cfg.rollout.group_size,
                                     max_head_offpolicyness=cfg.rollout.max_head_offpolicyness,
                                     version=lambda: self.version,
                                     consumed=self.step * cfg.rollout.batch_size)
            metrics = exits.enter_context(MetricsLogger(self.run_dir, cfg.metrics,
                                                        start_step=self.step))
            self._engine_metrics(stack.engine)  # mark the start
            producing = asyncio.create_task(producer.run())
            exits.push_async_callback(_cancel, producing)
            last: dict[str, float] = {}
            if self.step == 0 and cfg.trainer.eval_every and eval_rows:
                last = await self._evaluate(stack.controller, eval_rows)
                metrics.log(0, last)
            while self.step < cfg.trainer.total_steps:
                last = await self._step(stack, learner, model, producer, metrics)
                if cfg.trainer.eval_every and eval_rows and (
                        self.step % cfg.trainer.eval_every == 0 or self.step == cfg.trainer.total_steps):
                    evals = await self._evaluate(stack.controller, eval_rows)
                    metrics.log(self.step, evals)
                    last.update(evals)
                    metrics.plot()
                if self.step == cfg.trainer.total_steps or (
                        cfg.trainer.save_every and self.step % cfg.trainer.save_every == 0):
                    await self._save(stack, learner, model, prompts, producer)
            metrics.plot()
            return last

    # --- one RL step -----------------------------------------------------------------

    async def _step(self, stack, learner: Learner, model, producer: GroupProducer,
                    metrics: MetricsLogger) -> dict[str, float]:
        cfg = self.cfg
        t0 = time.perf_counter()
        groups, start_versions = await producer.next_batch()
        t1 = time.perf_counter()
        samples = [self._shape_rewards(g.samples) for g in groups]
        stats = await asyncio.to_thread(learner.train_step, samples, current_version=self.version)
        t2 = time.perf_counter()
        paused_s = await self._swap(stack, model, self.version + 1)
        self.version += 1
        self.step += 1
        await producer.notify()
        row = {**{f"train/{k}": v for k, v in stats.items()},
               **_rollout_metrics(groups, stack.controller, producer),
               "reward/mean": _mean([ep.reward for g in groups for ep in g.episodes
                                     if ep.reward is not None]),
               "rollout/staleness": stats.get("staleness", 0.0),
               "rollout/start_version_lag": self.version - 1 - _mean(start_versions),
               "perf/tokens_per_s": stats.get("tokens_per_s", 0.0),
               "time/generation_s": t1 - t0, "time/update_s": t2 - t1,
               "time/weight_swap_s": paused_s, "time/step_s": time.perf_counter() - t0,
               "version": float(self.version)}
        row.update(self._engine_metrics(stack.engine))
        metrics.log(self.step, row)
        metrics.progress(self.step, cfg.trainer.total_steps, row)
        return row

    def _engine_metrics(self, engine) -> dict[str, float]:
        """The engine's work since the previous call (engine/stats.py): every token it
        generated since the last step's metrics, evaluation included. {} for an engine
        that keeps no totals."""
        stats = getattr(engine, "stats", None)
        if not isinstance(stats, EngineStats):
            return {}
        now = time.perf_counter()
        mark, self._engine_mark = self._engine_mark, (stats, now)
        return engine_metrics(mark[0], stats, now - mark[1]) if mark else {}

    def _shape_rewards(self, samples: list[Sample]) -> list[Sample]:
        algo, max_new = self.cfg.algorithm, self.cfg.rollout.sampling.max_new_tokens
        if not algo.overlong_buffer_len:
            return samples
        for s in samples:
            s.reward += overlong_penalty(_last_span(s.loss_mask), max_new,
                                         algo.overlong_buffer_len, algo.overlong_penalty_factor)
        return samples

    async def _evaluate(self, controller: RolloutController, rows: list[dict]) -> dict[str, float]:
        """Greedy pass over the eval rows through the same workflow; reward mean = accuracy."""
        start = time.perf_counter()
        episodes = await asyncio.gather(*(controller.run_episode(r, greedy=True) for r in rows))
        rewards = [ep.reward if ep.reward is not None else 0.0 for ep in episodes]
        return {"eval/accuracy": _mean(rewards), "eval/num_failed": float(sum(e.failed for e in episodes)),
                "eval/time_s": time.perf_counter() - start}

    # --- model, checkpoints ----------------------------------------------------------

    def _make_learner(self, model_dir: str) -> tuple[Learner, Any]:
        from areal_lite.models import load_causal_lm, load_tokenizer

        cfg = self.cfg
        device = resolve_device(cfg.actor.device)
        model = load_causal_lm(model_dir, device=device, dtype="float32")
        tokenizer = load_tokenizer(model_dir)
        self.tokenizer = tokenizer
        ref = None
        if cfg.algorithm.kl_coef > 0:
            ref = load_causal_lm(model_dir, device=device, dtype=cfg.actor.dtype).eval()
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        learner = Learner(model, cfg=cfg.train, algo=cfg.algorithm, device=device,
                          gradient_checkpointing=cfg.actor.gradient_checkpointing, ref_model=ref,
                          pad_token_id=pad, max_new_tokens=cfg.rollout.sampling.max_new_tokens)
        return learner, model

    async def _resume(self, stack, learner: Learner, model, prompts: PromptStream) -> None:
        found = await asyncio.to_thread(load_latest_checkpoint, self.run_dir)
        if found is None:
            return
        path, state = found
        from safetensors.torch import load_file

        weights: dict = {}
        for shard in sorted(path.glob("*.safetensors")):
            weights.update(load_file(str(shard)))
        model.load_state_dict(weights, strict=False)
        learner.load_state_dict(state["learner"])
        prompts.load_state_dict(state["extra"]["data"])
        restore_rng(state)
        self.step = int(state["step"])
        self.version = int(state["extra"]["version"])
        await self._swap(stack, model, self.version)
        log.info("resumed from %s at step %d (weight version %d)", path, self.step, self.version)

    async def _swap(self, stack, model, version: int) -> float:
        """Install `model`'s weights in the engine the configured way; seconds paused."""
        r = self.cfg.rollout
        return await swap_weights(stack.engine, model, version,
                                  mode=r.sglang.weight_update if r.backend == "sglang" else "tensor",
                                  scratch_dir=self.run_dir, group=self.weight_group)

    async def _save(self, stack, learner: Learner, model, prompts: PromptStream,
                    producer: GroupProducer) -> None:
        extra = {"data": prompts.state_dict(unfinished=producer.unfinished()),
                 "version": self.version}
        path = await asyncio.to_thread(
            save_checkpoint, self.run_dir, self.step, model=model, tokenizer=self.tokenizer,
            learner_state=learner.state_dict(), extra_state=extra,
            keep=self.cfg.trainer.keep_checkpoints)
        log.info("saved checkpoint %s", path)

    def _eval_rows(self) -> list[dict]:
        cfg = self.cfg
        if not cfg.data.eval or not cfg.trainer.eval_every:
            return []
        rows = load_dataset_rows(cfg.data.eval, split="eval", seed=cfg.seed)
        return rows[: cfg.trainer.max_eval_prompts] if cfg.trainer.max_eval_prompts else rows


def _rollout_metrics(groups: list[GroupResult], controller: RolloutController,
                     producer: GroupProducer) -> dict[str, float]:
    episodes = [ep for g in groups for ep in g.episodes]
    return {"rollout/episodes_failed": float(sum(ep.failed for ep in episodes)),
            "rollout/episodes_total_failed": float(controller.stats.num_failed),
            "rollout/groups_rejected": float(producer.num_rejected),
            "rollout/completions_per_episode": _mean([ep.num_completions for ep in episodes]),
            "cache/prefix_breaks": float(controller.proxy.sessions.num_prefix_breaks)}


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


async def _cancel(task: asyncio.Task) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
