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
    """Pick one token per row; return (tokens, raw logprobs of those tokens).

    All sampled rows are drawn in one batched pass (see `sample_rows`); only the noise
    comes from each row's own generator, so a seeded request samples the same tokens
    whatever else shares its batch."""
    logits = logits.float()
    tokens = logits.argmax(dim=-1)
    sampled = [r for r, p in enumerate(params) if not p.greedy]
    if sampled:
        rows = torch.tensor(sampled, device=logits.device)
        tokens[rows] = sample_rows(logits[rows], [params[r] for r in sampled],
                                   [generators[r] for r in sampled])
    chosen = logits.gather(1, tokens[:, None])[:, 0]
    logprobs = chosen - torch.logsumexp(logits, dim=-1)
    # one device->host transfer for both (float64 holds token ids exactly)
    both = torch.stack([tokens.double(), logprobs.double()]).tolist()
    return [int(t) for t in both[0]], both[1]


def sample_rows(logits: torch.Tensor, params: Sequence[SamplingParams],
                generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """One token per row from softmax(logits / temperature) restricted by top_k, then
    top_p (the smallest set of most likely tokens whose mass reaches top_p; the most likely
    token is always kept). Returns a [rows] token tensor without a device sync.

    Batched inverse-CDF sampling: one uniform number per row from the row's generator,
    located in the row's cumulative distribution (a token with probability 0 is never
    picked: the CDF does not rise there)."""
    dev = logits.device
    temps = torch.tensor([p.temperature for p in params], device=dev)
    x = logits / temps[:, None]
    vocab = x.shape[-1]
    ks = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]
    if any(ks):
        top = torch.topk(x, max(ks), dim=-1).values  # [rows, kmax], descending
        kth = top.gather(1, torch.tensor([max(k, 1) - 1 for k in ks], device=dev)[:, None])
        kth[torch.tensor([k == 0 for k in ks], device=dev)] = float("-inf")
        x = x.masked_fill(x < kth, float("-inf"))
    tops = [p.top_p for p in params]
    if min(tops) < 1.0:
        nucleus = torch.tensor([t < 1.0 for t in tops], device=dev).nonzero()[:, 0]
        x[nucleus] = _top_p(x[nucleus], torch.tensor(tops, device=dev)[nucleus])
    cdf = torch.softmax(x, dim=-1).cumsum_(dim=-1)
    u = torch.cat([torch.rand(1, generator=g, device=dev) for g in generators])
    picked = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0]
    return picked.clamp_(max=x.shape[-1] - 1)  # u * total < total: only rounding reaches it


def _top_p(x: torch.Tensor, top_p: torch.Tensor, candidates: int = 1024) -> torch.Tensor:
    """Mask (to -inf) the tokens outside each row's nucleus of mass `top_p[row]`.

    The nucleus is looked for among each row's `candidates` most likely tokens (a partial
    sort, far cheaper than sorting the vocabulary); a row whose candidates hold less than
    its top_p mass is redone over the full vocabulary."""
    vocab = x.shape[-1]
    k = min(candidates, vocab)
    vals, order = torch.topk(x, k, dim=-1)  # descending
    probs = (vals - torch.logsumexp(x, dim=-1, keepdim=True)).exp()
    cum = probs.cumsum(dim=-1)
    keep = (cum - probs) < top_p[:, None]  # mass before the token; keeps the top 1
    out = torch.full_like(x, float("-inf")).scatter_(
        1, order, vals.masked_fill(~keep, float("-inf")))
    if k < vocab:
        short = (cum[:, -1] < top_p).nonzero()[:, 0]
        if len(short):
            out[short] = _top_p(x[short], top_p[short], candidates=vocab)
    return out


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
