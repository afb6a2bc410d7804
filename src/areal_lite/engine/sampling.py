"""Local engine internals: next-token choice and stop rules for one decode step.

Pure functions of logits, sampling params and the tokens so far; no engine state.

Logprobs are always of the chosen token under the *raw* distribution (temperature 1,
no top-k/top-p filtering): ``log_softmax(logits)[token]``, the quantity a trainer
recomputes with a plain forward pass over prompt + output.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from areal_lite.types import SamplingParams


def choose_tokens(
    logits: torch.Tensor,  # [rows, vocab], any float dtype
    params: Sequence[SamplingParams],  # one per row
    generators: Sequence[torch.Generator | None],  # one per row (None = greedy rows only)
) -> tuple[list[int], list[float]]:
    """Pick one token per row; return (tokens, raw logprobs of those tokens)."""
    logits = logits.float()
    tokens = logits.argmax(dim=-1)
    sampled = [r for r, p in enumerate(params) if not p.greedy]
    if sampled:
        for r in sampled:
            tokens[r] = sample_row(logits[r], params[r], generators[r])
    chosen = logits.gather(1, tokens[:, None])[:, 0]
    logprobs = chosen - torch.logsumexp(logits, dim=-1)
    # one device->host transfer for both (float64 holds token ids exactly)
    both = torch.stack([tokens.double(), logprobs.double()]).tolist()
    return [int(t) for t in both[0]], both[1]


def sample_row(logits: torch.Tensor, p: SamplingParams,
               generator: torch.Generator | None) -> torch.Tensor:
    """Sample from softmax(logits / temperature) restricted by top_k and top_p; returns a
    0-dim token tensor (no device sync)."""
    x = logits / p.temperature
    vocab = x.shape[-1]
    if 0 < p.top_k < vocab:
        kth = torch.topk(x, p.top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_x, order = torch.sort(x, descending=True)
        probs = torch.softmax(sorted_x, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs
        sorted_x = sorted_x.masked_fill(mass_before >= p.top_p, float("-inf"))  # keeps the top 1
        x = torch.full_like(x, float("-inf")).scatter(0, order, sorted_x)
    probs = torch.softmax(x, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[0]


def validate_params(p: SamplingParams) -> None:
    """Reject params no engine can honour, with the field name in the message."""
    if p.max_new_tokens < 0:
        raise ValueError(f"sampling.max_new_tokens must be >= 0, got {p.max_new_tokens}")
    if p.temperature < 0:
        raise ValueError(f"sampling.temperature must be >= 0, got {p.temperature}")
    if not 0.0 < p.top_p <= 1.0:
        raise ValueError(f"sampling.top_p must be in (0, 1], got {p.top_p}")
    if p.top_k == 0 or p.top_k < -1:
        raise ValueError(f"sampling.top_k must be -1 (off) or >= 1, got {p.top_k}")


def stop_reason(
    token: int,
    output_ids: Sequence[int],  # all output tokens so far, `token` included
    p: SamplingParams,
    eos_ids: frozenset[int],
    decode_tail,  # callable(list[int]) -> str, or None when no tokenizer is available
) -> tuple[str, int | str | None] | None:
    """("stop", matched) / ("length", None) when this token ends the request, else None.

    Token stops (eos, stop_token_ids) are off when `ignore_eos` (types.SamplingParams).
    Stop strings are matched on the decoded tail of the output: the last
    ``max(len(s)) + 4`` tokens, enough since a token decodes to at least one character.
    """
    if not p.ignore_eos and (token in eos_ids or token in p.stop_token_ids):
        return "stop", token
    if p.stop and decode_tail is not None:
        window = max(len(s) for s in p.stop) + 4
        tail = decode_tail(list(output_ids[-window:]))
        for s in p.stop:
            if s in tail:
                return "stop", s
    if len(output_ids) >= p.max_new_tokens:
        return "length", None
    return None
