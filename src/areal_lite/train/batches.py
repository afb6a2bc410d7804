"""Learner stage, data side: one train step's per-sample tensors, their micro-batch
collation, minibatch splits and the step's statistics.

`Batch` holds CPU tensors per flattened sample (token aligned with `input_ids`);
`collate` right-pads a micro-batch's rows onto the device; `StepStats` accumulates the
loss function's stats over micro-batches (shares summed per update, the rest weighted
by tokens) and, under FSDP2, over ranks.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from areal_lite.train.distributed import Dist

__all__ = ["Batch", "Micro", "StepStats", "collate", "minibatches"]


@dataclass
class Batch:
    """Per-sample CPU tensors of one train step (index i = i-th flattened sample)."""

    ids: list[Tensor]  # [L_i] long
    mask: list[Tensor]  # [L_i] bool, loss mask with position 0 forced off
    behav: list[Tensor]  # [L_i] float32 behaviour logprobs
    adv: list[Tensor]  # [L_i] float32 per-token advantages, 0 off the mask
    unit_tokens: list[Tensor]  # [L_i] loss tokens of the unit (row or span) each token is in
    units: list[list[int]]  # loss tokens of each of sample i's advantage units
    unit_adv: Tensor  # [U] float32 advantage per unit (sample, or span of a tree sample)
    prox: list[Tensor] | None  # [L_i] proximal logprobs; None = take them from the forward
    ref: list[Tensor] | None  # [L_i] reference logprobs when kl_coef > 0

    @property
    def lengths(self) -> list[int]:
        return [len(x) for x in self.ids]


@dataclass
class Micro:
    """One right-padded micro-batch on the device, all [B, T] (adv padded with 0)."""

    ids: Tensor
    attn: Tensor
    mask: Tensor
    behav: Tensor
    adv: Tensor
    unit_tokens: Tensor
    prox: Tensor | None
    ref: Tensor | None


def collate(batch: Batch, rows: list[int], device, pad_id: int) -> Micro:
    def pad(seqs: list[Tensor] | None, value=0) -> Tensor | None:
        if seqs is None:
            return None
        return pad_sequence([seqs[r] for r in rows], batch_first=True,
                            padding_value=value).to(device)

    attn = pad_sequence([torch.ones(len(batch.ids[r]), dtype=torch.long) for r in rows],
                        batch_first=True).to(device)
    return Micro(ids=pad(batch.ids, pad_id), attn=attn, mask=pad(batch.mask, False),
                  behav=pad(batch.behav), adv=pad(batch.adv),
                  unit_tokens=pad(batch.unit_tokens, 1), prox=pad(batch.prox),
                  ref=pad(batch.ref))


def minibatches(n: int, num: int) -> list[list[int]]:
    """Split range(n) into `num` contiguous, near-equal, non-empty chunks (fewer if n < num)."""
    num = min(num, n)
    bounds = [n * k // num for k in range(num + 1)]
    return [list(range(bounds[k], bounds[k + 1])) for k in range(num)]


_SHARES = ("loss", "policy_loss", "kl_loss")  # summed over micro-batches, mean over updates


class StepStats:
    """Accumulates loss_fn stats: shares summed per update, the rest token-weighted."""

    def __init__(self) -> None:
        self.shares: dict[str, float] = defaultdict(float)
        self.weighted: dict[str, float] = defaultdict(float)
        self.tokens = 0.0
        self.grad_norms: list[float] = []
        self.padded = self.real = 0
        self.shared = 0  # prefix tokens computed once for a micro-batch instead of per row
        self.skipped = 0

    def add(self, stats: dict[str, float]) -> None:
        n = stats["num_tokens"]
        self.tokens += n
        for key, value in stats.items():
            if key in _SHARES:
                self.shares[key] += value
            elif key != "num_tokens":
                self.weighted[key] += value * n

    def merge(self, d: Dist) -> None:
        """Sum every rank's accumulators into this one (grad norms are already global)."""
        parts = [None] * d.world
        torch.distributed.all_gather_object(parts, (dict(self.shares), dict(self.weighted),
                                                    self.tokens, self.padded, self.real,
                                                    self.shared))
        self.shares, self.weighted = defaultdict(float), defaultdict(float)
        self.tokens = self.padded = self.real = self.shared = 0
        for shares, weighted, tokens, padded, real, shared in parts:
            for key, value in shares.items():
                self.shares[key] += value
            for key, value in weighted.items():
                self.weighted[key] += value
            self.tokens, self.padded, self.real = (self.tokens + tokens, self.padded + padded,
                                                   self.real + real)
            self.shared += shared

    def result(self) -> dict[str, float]:
        updates = max(1, len(self.grad_norms))
        out = {k: v / updates for k, v in self.shares.items()}
        out |= {k: v / max(self.tokens, 1.0) for k, v in self.weighted.items()}
        out["grad_norm"] = sum(self.grad_norms) / updates
        out["padding_frac"] = (self.padded - self.real) / self.padded if self.padded else 0.0
        # share of the rows' real tokens that a shared-prefix pass computed once, not per row
        out["prefix_shared_frac"] = self.shared / (self.real + self.shared) \
            if self.real + self.shared else 0.0
        out["num_updates"] = float(len(self.grad_norms))
        out["num_skipped_updates"] = float(self.skipped)
        return out
