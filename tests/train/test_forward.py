"""Tests for train/forward.py: prefix micro-batches (property), the shared-prefix and
trained-positions-only forward against the plain one (values and gradients), the
split check, and the learner with and without it (same update)."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from areal_lite.config import AlgorithmConfig, LearnerConfig
from areal_lite.train.forward import (
    common_prefix_len,
    prefix_microbatches,
    split_causal_lm,
    trained_logprobs,
)
from areal_lite.train.learner import Learner
from areal_lite.train.logprobs import forward_logits, token_logprobs
from areal_lite.types import Sample

torch.set_num_threads(1)


# ----------------------------------------------------------------------- micro-batches

_prompts = st.lists(st.lists(st.integers(0, 3), min_size=0, max_size=6), min_size=1, max_size=4)


@settings(max_examples=200, deadline=None)
@given(_prompts, st.lists(st.tuples(st.integers(0, 3), st.lists(st.integers(0, 3), min_size=1,
                                                                max_size=8)), max_size=30),
       st.integers(1, 60), st.booleans())
def test_prefix_microbatches_cover_each_row_once_sharing_their_prefix(prompts, rows, budget,
                                                                       packing):
    ids = [prompts[p % len(prompts)] + tail for p, tail in rows]
    batches = prefix_microbatches(ids, budget, packing)
    assert sorted(i for mb, _ in batches for i in mb) == list(range(len(ids)))
    for mb, prefix in batches:
        assert mb
        if prefix:
            assert len(mb) > 1 and prefix >= 2
            assert all(len(ids[r]) > prefix and ids[r][:prefix] == ids[mb[0]][:prefix]
                       for r in mb)
        width = max(len(ids[r]) for r in mb)
        assert len(mb) == 1 or prefix + len(mb) * (width - prefix) <= budget


def test_rows_of_one_prompt_share_it_in_one_microbatch():
    rng = random.Random(0)
    prompts = [[1, 2, 3] + [rng.randrange(4, 50) for _ in range(20)] for _ in range(3)]
    ids = [prompts[k % 3] + [rng.randrange(50, 99) for _ in range(rng.randint(1, 9))]
           for k in range(12)]
    batches = prefix_microbatches(ids, budget=10_000)
    assert len(batches) == 3
    for mb, prefix in batches:
        assert len(mb) == 4 and prefix == 23
        assert {k % 3 for k in mb} == {mb[0] % 3}


def test_common_prefix_len():
    assert common_prefix_len([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix_len([1, 2], [1, 2, 3]) == 2
    assert common_prefix_len([], [1]) == 0


# ---------------------------------------------------------------------------- forward

def _rows(vocab: int, prefix_len: int, tails: list[int], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(3, vocab, (prefix_len,), generator=g)
    seqs = [torch.cat([prefix, torch.randint(3, vocab, (n,), generator=g)]) for n in tails]
    ids = torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True)
    attn = torch.nn.utils.rnn.pad_sequence([torch.ones(len(s), dtype=torch.long) for s in seqs],
                                           batch_first=True)
    mask = attn.bool().clone()
    mask[:, : prefix_len - 2] = False  # the loss starts two tokens before the suffix
    mask[:, 0] = False
    return ids, attn, mask


@pytest.mark.parametrize("prefix", [0, 6])
def test_trained_logprobs_and_grads_match_the_plain_forward(model, prefix):
    ids, attn, mask = _rows(model.config.vocab_size, 8, [5, 1, 9, 3], seed=prefix)
    split = split_causal_lm(model)
    assert split is not None
    model.train()
    plain = torch.where(mask, token_logprobs(forward_logits(model, ids, attn), ids), 0.0)
    plain.sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    fast, ent = trained_logprobs(*split, ids, attn, mask, prefix_len=prefix)
    fast.sum().backward()
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)
    assert (fast[~mask] == 0).all() and (ent[~mask] == 0).all() and (ent[mask] > 0).all()
    for name, g in ref_grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, g,
                                   rtol=2e-3, atol=5e-5)  # summation order differs


class _Scaled(torch.nn.Module):
    """A causal LM whose logits are not head(decoder(...)): its head output is doubled."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def get_decoder(self):
        return self.inner.get_decoder()

    def get_output_embeddings(self):
        return self.inner.get_output_embeddings()

    def forward(self, **kw):
        out = self.inner(**kw)
        out.logits = out.logits * 2.0
        return out


def test_split_refuses_a_model_whose_logits_are_not_the_head(model):
    assert split_causal_lm(_Scaled(model)) is None
    assert split_causal_lm(torch.nn.Linear(2, 2)) is None


# ---------------------------------------------------------------------------- learner

def _group_samples(vocab: int, groups: int, size: int, seed: int = 0) -> list[list[Sample]]:
    rng = random.Random(seed)
    out = []
    for _ in range(groups):
        prompt = [rng.randrange(3, vocab) for _ in range(rng.randint(6, 12))]
        group = []
        for _ in range(size):
            tail = [rng.randrange(3, vocab) for _ in range(rng.randint(1, 10))]
            ids = prompt + tail
            mask = [0] * len(prompt) + [1] * len(tail)
            r = float(rng.random() < 0.5)
            group.append(Sample(input_ids=ids, loss_mask=mask,
                                logprobs=[-1.0 * m for m in mask],
                                versions=[0 if m else -1 for m in mask], reward=r,
                                raw_reward=r))
        out.append(group)
    return out


@pytest.mark.parametrize("ppo_epochs", [1, 2])
def test_learner_fast_forward_gives_the_same_update(model, ppo_epochs):
    groups = _group_samples(model.config.vocab_size, 3, 4, seed=ppo_epochs)
    params, stats = [], []
    for fast in (False, True):
        learner = Learner(copy.deepcopy(model), cfg=LearnerConfig(
            lr=1e-3, fast_forward=fast, max_tokens_per_microbatch=40, ppo_epochs=ppo_epochs),
            algo=AlgorithmConfig(), pad_token_id=0)
        stats.append(learner.train_step(copy.deepcopy(groups)))
        params.append(dict(learner.model.named_parameters()))
    assert stats[0]["prefix_shared_frac"] == 0.0 < stats[1]["prefix_shared_frac"]
    for key in ("loss", "entropy", "approx_kl", "num_tokens"):
        assert stats[1][key] == pytest.approx(stats[0][key], rel=1e-4, abs=1e-6)
    for name, p in params[0].items():
        torch.testing.assert_close(params[1][name], p, rtol=1e-4, atol=1e-6)
