"""Trainer stage, model side: groups of samples -> logprobs -> one optimizer update.

`algorithms.py` owns the maths (advantages, losses) and `logprobs.py` the per-token
logprobs and micro-batch splitting; this module owns the model, the optimizer and the
updates. One `train_step` reads::

    groups  -> (dynamic filtering) -> advantages per unit -> per token
            -> proximal logprobs (recomputed with the current weights, or behaviour)
    lr = cfg.lr x lr_multiplier(step)
    for each of ppo_epochs x num_minibatches updates:
        normalizer over the minibatch's loss tokens (never per micro-batch)
        for each micro-batch (<= max_tokens_per_microbatch padded tokens):
            forward -> logprobs, entropy -> loss_fn -> backward   (gradients accumulate)
        clip -> optimizer.step -> zero_grad
    step += 1

Because every micro-batch loss is divided by the same whole-minibatch normalizer, the
summed gradient does not depend on how the batch is split (tested: 1 x 8 == 8 x 1).

Units (algorithms.py): a sample, or each span of a `tree` sample, is one advantage unit;
the update trains on per-token advantages and per-sequence aggregations count units, so
a tree batch and the individual batch of the same episodes give the same update. Stats
are per unit too (`reward_mean`/`_std` before filtering, `adv_mean`); `num_samples`
counts rows (fewer for tree), `num_tokens` loss tokens (the same).

Token alignment: every per-token tensor is [B, T] aligned with `input_ids`; position t
holds log p(ids[t] | ids[:t]) computed from the logits at t-1, and position 0 holds 0.
Rows are right-padded (padding never precedes a real token, so it cannot change them).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from areal_lite.config import AlgorithmConfig, LearnerConfig
from areal_lite.models import autocast_dtype
from areal_lite.train.algorithms import (
    advantage_inputs,
    filter_groups,
    make_advantage_fn,
    sample_token_advantages,
    unit_rewards,
    unit_token_counts,
)
from areal_lite.train.batches import Batch, Micro, StepStats, collate, minibatches
from areal_lite.train.distributed import (
    Dist,
    grad_norm_and_clip,
    shard_model,
    token_balanced_split,
)
from areal_lite.train.forward import (
    prefix_microbatches,
    split_causal_lm,
    trained_logprobs,
)
from areal_lite.train.logprobs import (
    forward_logits,
    make_microbatches,
    sequence_logprobs,
    token_entropy,
    token_logprobs,
)
from areal_lite.train.losses import LOSSES
from areal_lite.types import Sample

__all__ = [
    "Learner",
    "lr_multiplier",
]




# ------------------------------------------------------------- schedule and dtype

_DECAYS: dict[str, Callable[[float], float]] = {
    "constant": lambda progress: 1.0,
    "cosine": lambda progress: 0.5 * (1.0 + math.cos(math.pi * progress)),
    "linear": lambda progress: 1.0 - progress,
}


def lr_multiplier(step: int, cfg: LearnerConfig) -> float:
    """Factor on `cfg.lr` for train step `step` (0-based): linear warmup over
    `warmup_steps` steps ((step + 1) / warmup_steps), then the decay schedule, which
    goes from 1 right after warmup towards 0 at `total_steps` (and stays there)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.total_steps == 0:
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / (cfg.total_steps - cfg.warmup_steps))
    return _DECAYS[cfg.lr_schedule](progress)


# ------------------------------------------------------------------------------ learner

class Learner:
    """Owns the policy's optimizer and schedule; turns groups of samples into updates.

    `model` is a Hugging Face causal LM (moved to `device`; keep its parameters float32
    as master weights). The autocast compute dtype is `dtype` when given, else
    `cfg.compute_dtype` ("auto" = bfloat16 on CUDA, float32 without autocast elsewhere;
    "fast" = bfloat16 on CPUs with AMX too: models.autocast_dtype).
    `ref_model` is the frozen reference for the KL penalty, required when
    `algo.kl_coef > 0`. `max_new_tokens` is the rollout limit,
    needed by the `seq_mean_token_sum` aggregation. Dropout should be 0 (as in all
    current LLM configs): proximal logprobs are computed in eval mode.

    `dist` (from `train.distributed.init_dist`): this is one of `dist.world` FSDP2 ranks;
    the model is sharded per decoder layer (mixed precision in `dtype` instead of
    autocast) and each rank trains on its token-balanced share of every minibatch, with
    the same result as one process on the whole batch (see train/distributed.py).
    """

    def __init__(self, model, *, cfg: LearnerConfig, algo: AlgorithmConfig,
                 device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                 gradient_checkpointing: bool = False, ref_model=None, pad_token_id: int = 0,
                 max_new_tokens: int = 0, dist: Dist | None = None):
        if algo.kl_coef > 0 and ref_model is None:
            raise ValueError("algorithm.kl_coef > 0 needs a frozen reference model: pass "
                             "Learner(..., ref_model=...) or set kl_coef = 0")
        self.cfg, self.algo = cfg, algo
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.ref_model = None if ref_model is None else \
            ref_model.to(self.device).eval().requires_grad_(False)
        if dtype is None:
            dtype = autocast_dtype(cfg.compute_dtype, self.device)
        self.dtype = dtype
        self.dist = dist
        self._on_microbatch: Callable[[], None] | None = None  # set for one train_step
        if dist is not None:
            shard_model(self.model, dtype)
            self.dtype = torch.float32  # FSDP2 gathers parameters in `dtype`: no autocast
        self.pad_token_id = pad_token_id
        self.max_new_tokens = max_new_tokens
        # (decoder, head) for the shared-prefix, trained-positions-only forward
        # (train/forward.py); None keeps the plain forward (FSDP2 shards the root module,
        # whose hooks a split call would bypass; models whose head is not a plain Linear)
        self._splits: dict[int, tuple | None] = {}
        self._fast = dist is None and cfg.fast_forward
        self._share_prefix = not gradient_checkpointing  # checkpointed layers keep no cache
        if gradient_checkpointing:  # transformers >= 5.x renamed it activation checkpointing
            enable = getattr(model, "activation_checkpointing_enable", None)
            if enable is not None:
                enable({"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs={"use_reentrant": False})
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.adam_betas),
                                           eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
        self.step = 0  # train steps done; the lr schedule is a pure function of it
        self._adv_fn = make_advantage_fn(algo)
        self._loss_fn = LOSSES[algo.loss_agg]

    def _autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    # -- scoring ---------------------------------------------------------------------

    def compute_logprobs(self, samples: Sequence[Sample], *, model=None) -> list[list[float]]:
        """Per-token logprobs of each sample's input_ids under `model` (default: the
        policy), aligned with input_ids, 0.0 at position 0. No gradients."""
        model = self.model if model is None else model
        return [t.tolist() for t in self._logprob_tensors([s.input_ids for s in samples], model)]

    def _split(self, model) -> tuple | None:
        if not self._fast:
            return None
        if id(model) not in self._splits:
            self._splits[id(model)] = split_causal_lm(model)
        return self._splits[id(model)]

    def _logprob_tensors(self, ids: Sequence[Sequence[int]], model,
                         masks: Sequence[Tensor] | None = None) -> list[Tensor]:
        """Per-token logprobs of each row under `model`, no gradients; with `masks`, only
        at the masked positions (0 elsewhere), through the shared-prefix forward."""
        lengths = [len(x) for x in ids]
        out: list[Tensor] = [torch.zeros(0)] * len(ids)
        split = self._split(model) if masks is not None else None
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), self._autocast():
                if split is not None:
                    for mb, prefix in prefix_microbatches(
                            ids, self.cfg.max_tokens_per_microbatch, self.cfg.packing):
                        self._before_microbatch()
                        rows = [torch.as_tensor(ids[i], dtype=torch.long) for i in mb]
                        attn = [torch.ones(len(r), dtype=torch.long) for r in rows]
                        logp, _ = trained_logprobs(
                            *split, pad_sequence(rows, batch_first=True, padding_value=self.
                                                 pad_token_id).to(self.device),
                            pad_sequence(attn, batch_first=True).to(self.device),
                            pad_sequence([masks[i] for i in mb], batch_first=True).to(
                                self.device), prefix_len=prefix, entropy=False)
                        for row, i in enumerate(mb):
                            out[i] = logp[row, :lengths[i]].cpu()
                    return out
                for mb in make_microbatches(lengths, self.cfg.max_tokens_per_microbatch,
                                            self.cfg.packing):
                    self._before_microbatch()
                    rows = [torch.as_tensor(ids[i], dtype=torch.long) for i in mb]
                    attn = [torch.ones(len(r), dtype=torch.long) for r in rows]
                    logp = sequence_logprobs(
                        model, pad_sequence(rows, batch_first=True,
                                            padding_value=self.pad_token_id).to(self.device),
                        pad_sequence(attn, batch_first=True).to(self.device)).cpu()
                    for row, i in enumerate(mb):
                        out[i] = logp[row, :lengths[i]]
        finally:
            model.train(was_training)
        return out

    # -- training --------------------------------------------------------------------

    def train_step(self, groups: Sequence[Sequence[Sample]], *, current_version: int = 0,
                   on_microbatch: Callable[[], None] | None = None) -> dict[str, float]:
        """One train step on a batch of groups (one group = samples of one prompt).

        Runs ppo_epochs x num_minibatches optimizer updates at the lr of this step.
        `current_version` is the policy's weight version, for the staleness stat.
        `on_microbatch` is called on this thread before every micro-batch's forward (the
        trainer's core split hands the learner more threads there: engine/local/threads.py).
        Returns floats for logging (see the module docstring for the flow).
        """
        self._on_microbatch = on_microbatch
        try:
            return self._train_step(groups, current_version)
        finally:
            self._on_microbatch = None

    def _before_microbatch(self) -> None:
        if self._on_microbatch is not None:
            self._on_microbatch()

    def _train_step(self, groups: Sequence[Sequence[Sample]], current_version: int
                    ) -> dict[str, float]:
        start = time.perf_counter()
        lr = self.cfg.lr * lr_multiplier(self.step, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        rewards = torch.tensor([r for g in groups for s in g for r in unit_rewards(s)],
                               dtype=torch.float64)  # per unit: a tree sample's spans
        num_filtered = 0
        if self.algo.dynamic_filtering:
            groups, num_filtered = filter_groups(groups)
        samples = [s for g in groups for s in g]
        acc = StepStats()
        batch = None
        if samples:
            adv = self._adv_fn(*advantage_inputs(groups)).to(torch.float32)
            batch = self._prepare(samples, adv)
            for _ in range(self.cfg.ppo_epochs):
                for mini in minibatches(len(samples), self.cfg.num_minibatches):
                    self._update(batch, mini, acc)
            if self.dist is not None:
                acc.merge(self.dist)
        self.step += 1
        stats = acc.result()
        stats |= self._batch_stats(samples, batch, current_version)
        stats |= {
            "lr": lr, "num_filtered_groups": float(num_filtered),
            "num_samples": float(len(samples)), "step": float(self.step),
            "reward_mean": rewards.mean().item() if len(rewards) else 0.0,
            "reward_std": rewards.std(correction=0).item() if len(rewards) else 0.0,
        }
        elapsed = time.perf_counter() - start
        stats["tokens_per_s"] = sum(len(s.input_ids) for s in samples) / max(elapsed, 1e-9)
        return stats

    def _prepare(self, samples: list[Sample], unit_adv: Tensor) -> Batch:
        ids = [torch.tensor(s.input_ids, dtype=torch.long) for s in samples]
        masks = []
        for s in samples:
            m = torch.tensor(s.loss_mask, dtype=torch.bool)
            m[:1] = False  # nothing predicts the first token
            masks.append(m)
        behav = [torch.tensor(s.logprobs, dtype=torch.float32) for s in samples]
        for s, i, m, b in zip(samples, ids, masks, behav, strict=True):
            if not len(i) == len(m) == len(b) == len(s.versions):
                raise ValueError(f"sample has {len(i)} input_ids but {len(m)} loss_mask, "
                                 f"{len(b)} logprobs, {len(s.versions)} versions; they "
                                 f"must align token for token (check the export)")
        single_update = self.cfg.ppo_epochs * min(self.cfg.num_minibatches, len(samples)) == 1
        if not self.cfg.recompute_proximal:
            prox = behav
        elif single_update:
            prox = None  # weights unchanged until the only update: the forward gives them
        else:
            prox = self._logprob_tensors([s.input_ids for s in samples], self.model, masks)
        ref = None
        if self.ref_model is not None and self.algo.kl_coef > 0:
            ref = self._logprob_tensors([s.input_ids for s in samples], self.ref_model, masks)
        adv = [a * m for a, m in zip(sample_token_advantages(samples, unit_adv), masks,
                                     strict=True)]
        units, unit_tokens = zip(*map(unit_token_counts, samples, masks), strict=True)
        return Batch(ids=ids, mask=masks, behav=behav, adv=adv, unit_tokens=list(unit_tokens),
                      units=list(units), unit_adv=unit_adv, prox=prox, ref=ref)

    def _update(self, batch: Batch, rows: list[int], acc: StepStats) -> None:
        """One optimizer update on samples `rows`, accumulating over micro-batches."""
        normalizer = self._loss_fn.normalizer([n for r in rows for n in batch.units[r]],
                                              self.max_new_tokens)
        lengths = [len(batch.ids[r]) for r in rows]
        self.model.train()
        mine, scale, num = list(range(len(rows))), 1.0, 0
        if self.dist is not None:  # FSDP2 averages gradients over ranks: undo it
            mine, scale = token_balanced_split(lengths, self.dist.world)[self.dist.rank], \
                float(self.dist.world)
        budget = self.cfg.max_tokens_per_microbatch
        if self._split(self.model) is not None:
            mbs = [([mine[k] for k in mb], prefix if self._share_prefix else 0)
                   for mb, prefix in prefix_microbatches(
                [batch.ids[rows[j]].tolist() for j in mine], budget, self.cfg.packing)]
        else:
            mbs = [([mine[k] for k in mb], 0) for mb in make_microbatches(
                [lengths[j] for j in mine], budget, self.cfg.packing)]
        if self.dist is not None:  # every rank must join every forward/backward
            num = self.dist.all_max(len(mbs)) - len(mbs)
        for mb, prefix in mbs:
            acc.padded += prefix + max(lengths[j] - prefix for j in mb) * len(mb)
            acc.real += prefix + sum(lengths[j] - prefix for j in mb)
            acc.shared += prefix * (len(mb) - 1)
            acc.add(self._micro_step(collate(batch, [rows[j] for j in mb], self.device,
                                              self.pad_token_id), normalizer, scale, prefix))
        for _ in range(num):  # zero-weight micro-batches on the rank with fewer
            self._micro_step(collate(batch, rows[:1], self.device, self.pad_token_id),
                             normalizer, 0.0)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf
        grad_norm = (grad_norm_and_clip(params, max_norm) if self.dist is not None
                     else torch.nn.utils.clip_grad_norm_(params, max_norm).item())
        acc.grad_norms.append(grad_norm)
        if math.isfinite(grad_norm):
            self.optimizer.step()
        else:  # one bad batch must not turn every weight into NaN
            acc.skipped += 1
        self.optimizer.zero_grad(set_to_none=True)

    def _micro_step(self, mb: Micro, normalizer: float, scale: float = 1.0,
                    prefix: int = 0) -> dict[str, float]:
        self._before_microbatch()
        split = self._split(self.model)
        if split is not None:
            with self._autocast():
                logp, entropy = trained_logprobs(*split, mb.ids, mb.attn, mb.mask,
                                                 prefix_len=prefix)
        else:
            with self._autocast():
                logits = forward_logits(self.model, mb.ids, mb.attn)
            logp = token_logprobs(logits, mb.ids)
            entropy = token_entropy(logits.detach(), mb.mask)
            del logits
        prox = mb.prox if mb.prox is not None else logp.detach()
        loss, stats = self._loss_fn(
            logp, prox, mb.behav, mb.adv, mb.mask, cfg=self.algo,
            normalizer=normalizer, ref_logprobs=mb.ref, entropy=entropy,
            unit_tokens=mb.unit_tokens)
        (loss * scale if scale != 1.0 else loss).backward()
        return stats

    def _batch_stats(self, samples: list[Sample], batch: Batch | None,
                     current_version: int) -> dict[str, float]:
        if batch is None:
            return {"num_tokens": 0.0, "adv_mean": 0.0, "staleness": 0.0,
                    "prox_forward_skipped": 0.0}
        stale = torch.cat([current_version - torch.tensor(s.versions, dtype=torch.float64)[m]
                           for s, m in zip(samples, batch.mask, strict=True)])
        return {"num_tokens": float(sum(int(m.sum()) for m in batch.mask)),
                "adv_mean": batch.unit_adv.mean().item(),  # per unit, as individual's
                "staleness": stale.mean().item() if len(stale) else 0.0,
                # 1 = no proximal forward ran: one update pass, so the weights cannot change
                # before it and the update's own detached logprobs are the proximal ones
                # (exact, whatever the version lag), or recompute_proximal = false
                "prox_forward_skipped": float(batch.prox is None or batch.prox is batch.behav)}

    # -- checkpoint state ------------------------------------------------------------

    def state_dict(self) -> dict:
        """Optimizer state and train step (which fixes the lr schedule's position): what
        resuming needs besides the weights. Plain tensors and numbers only."""
        return {"optimizer": self.optimizer.state_dict(), "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
