"""Tests for engine/sampling.py: batched sampling draws from the right distribution,
top-k / top-p keep the right tokens, seeds are per request, logprobs are raw."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from areal_lite.engine.local.sampling import _top_p, choose_tokens
from areal_lite.types import SamplingParams

ROWS = 6000


def draw(logits: list[float], **params) -> torch.Tensor:
    """Token frequencies over ROWS independent rows (each with its own seeded generator)."""
    x = torch.tensor([logits] * ROWS)
    sp = [SamplingParams(max_new_tokens=1, **params)] * ROWS
    gens = [torch.Generator().manual_seed(i) for i in range(ROWS)]
    tokens, _ = choose_tokens(x, sp, gens)
    return torch.bincount(torch.tensor(tokens), minlength=len(logits)).double() / ROWS


def close(freq: torch.Tensor, probs: list[float], tol: float = 0.025) -> bool:
    return float((freq - torch.tensor(probs, dtype=torch.float64)).abs().max()) < tol


def test_temperature_sampling_matches_softmax():
    logits = [2.0, 1.0, 0.5, 0.0, -1.0]
    for t in (1.0, 0.5, 2.0):
        want = torch.softmax(torch.tensor(logits) / t, -1).tolist()
        assert close(draw(logits, temperature=t), want), t


def test_top_k_keeps_the_k_most_likely_in_proportion():
    logits = [0.0, 2.0, 1.0, -1.0]  # top 2: tokens 1 and 2
    p = torch.softmax(torch.tensor([2.0, 1.0]), -1).tolist()
    assert close(draw(logits, temperature=1.0, top_k=2), [0.0, p[0], p[1], 0.0])


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    logits = [math.log(v) for v in (0.4, 0.3, 0.2, 0.1)]
    # mass before token 1 is 0.4 < 0.5 (kept); before token 2 it is 0.7 (dropped)
    assert close(draw(logits, temperature=1.0, top_p=0.5), [4 / 7, 3 / 7, 0.0, 0.0])
    freq = draw(logits, temperature=1.0, top_p=0.05)  # the most likely token always stays
    assert freq.tolist() == [1.0, 0.0, 0.0, 0.0]


def test_mixed_rows_each_follow_their_own_params():
    x = torch.tensor([[0.0, 3.0, 1.0]] * 3)
    sp = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, top_k=1),
          SamplingParams(temperature=5.0, top_p=1e-6)]
    gens = [None, torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)]
    tokens, logprobs = choose_tokens(x, sp, gens)
    assert tokens == [1, 1, 1]
    raw = torch.log_softmax(x[0], -1)[1].item()  # temperature-1 logprob, whatever the params
    assert logprobs == pytest.approx([raw] * 3, abs=1e-6)


def test_seeded_row_samples_the_same_whatever_shares_the_batch():
    torch.manual_seed(0)
    row = torch.randn(50)

    def token_at(position: int, batch: int) -> int:
        x = torch.randn(batch, 50)
        x[position] = row
        sp = [SamplingParams(temperature=1.0)] * batch
        gens = [torch.Generator().manual_seed(1000 + i) for i in range(batch)]
        gens[position] = torch.Generator().manual_seed(7)
        return choose_tokens(x, sp, gens)[0][position]

    assert len({token_at(0, 1), token_at(3, 5), token_at(7, 8)}) == 1


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-8, 8), min_size=2, max_size=40, unique=True), st.floats(0.01, 0.99),
       st.integers(1, 40))
def test_top_p_from_candidates_equals_full_sort(logits, top_p, candidates):
    """Looking for the nucleus among the top candidates (with the full-vocabulary
    fallback) masks exactly what a full sort masks."""
    x = torch.tensor([logits])
    p = torch.tensor([top_p])
    fast = _top_p(x, p, candidates=candidates)
    full = _top_p(x, p, candidates=len(logits))
    assert torch.equal(torch.isinf(fast), torch.isinf(full))
    assert torch.isfinite(fast).any()
