"""Learner stage, scoring side: sequences -> length-packed micro-batches -> per-token logprobs.

Pure functions the `Learner` (and tests comparing engines) build on: splitting
sequences into micro-batches under a padded-token budget, and a causal LM's per-token
logprobs and entropy.

Token alignment: every per-token tensor is [B, T] aligned with `input_ids`; position t
holds log p(ids[t] | ids[:t]) computed from the logits at t-1, and position 0 holds 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "forward_logits",
    "make_microbatches",
    "padding_fraction",
    "sequence_logprobs",
    "token_entropy",
    "token_logprobs",
]


# ------------------------------------------------------------------------ micro-batches

def make_microbatches(lengths: Sequence[int], budget: int, packing: bool = True
                      ) -> list[list[int]]:
    """Split sequence indices into micro-batches of at most `budget` padded tokens.

    Padded tokens = rows x longest row. With `packing`, indices are sorted by length,
    longest first (ties in original order), so each micro-batch holds similar lengths;
    without it they stay in original order. Either way micro-batches are filled greedily
    and a sequence is never split: one longer than `budget` gets a micro-batch alone.
    """
    if budget < 1:
        raise ValueError(f"train.max_tokens_per_microbatch must be >= 1, got {budget}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i]) if packing \
        else range(len(lengths))
    batches: list[list[int]] = []
    current: list[int] = []
    width = 0
    for i in order:
        new_width = max(width, lengths[i])
        if current and new_width * (len(current) + 1) > budget:
            batches.append(current)
            current, new_width = [], lengths[i]
        current.append(i)
        width = new_width
    if current:
        batches.append(current)
    return batches


def padding_fraction(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> float:
    """Pad tokens / all padded tokens when `batches` are right-padded to their longest row."""
    padded = sum(max(lengths[i] for i in b) * len(b) for b in batches if b)
    real = sum(lengths[i] for b in batches for i in b)
    return (padded - real) / padded if padded else 0.0


# ------------------------------------------------------------------------ token maths

def forward_logits(model, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Logits [B, T, V] of a causal LM; positions follow the mask (left or right padding)."""
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)
    out = model(input_ids=input_ids, attention_mask=attention_mask,
                position_ids=position_ids, use_cache=False)
    return out.logits


def token_logprobs(logits: Tensor, input_ids: Tensor) -> Tensor:
    """[B, T] float32: log softmax(logits[:, t-1])[ids[:, t]] at t >= 1, 0 at t = 0.

    Computed as gather - logsumexp, so no [B, T, V] log-softmax tensor is kept for
    backward. Same value as the engines' log_softmax of temperature-1 logits.
    """
    shifted = logits[:, :-1].float()
    picked = shifted.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return F.pad(picked - shifted.logsumexp(-1), (1, 0))


@torch.no_grad()
def token_entropy(logits: Tensor, mask: Tensor, chunk_rows: int = 1024) -> Tensor:
    """[B, T] float32 entropy (nats) of the distribution that predicted token t, at the
    positions where `mask` is True (t >= 1), 0 elsewhere. Chunked to bound memory."""
    out = torch.zeros(mask.shape, dtype=torch.float32, device=logits.device)
    select = mask[:, 1:].bool()
    rows = logits[:, :-1][select]  # [N, V]: only the tokens that are trained
    parts = []
    for start in range(0, rows.shape[0], chunk_rows):
        logp = torch.log_softmax(rows[start:start + chunk_rows].float(), dim=-1)
        parts.append(-(logp.exp() * logp).sum(-1))
    if parts:
        out[:, 1:][select] = torch.cat(parts)
    return out


def sequence_logprobs(model, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Per-token logprobs [B, T] (float32) of `input_ids` under `model`.

    out[b, t] = log p(ids[b, t] | ids[b, :t]); 0 at each row's first real token and on
    padding. Left or right padding both work. Call under `torch.no_grad()` for scoring.
    """
    logp = token_logprobs(forward_logits(model, input_ids, attention_mask), input_ids)
    mask = attention_mask.bool()
    valid = mask & F.pad(mask[:, :-1], (1, 0), value=False)  # a real token before it
    return torch.where(valid, logp, 0.0)
