"""engine/prefix.py and its use by the local engine: prompts that start like an earlier
one reuse its KV, with the same tokens and logprobs as a full prefill."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from areal_lite.engine.local.engine import LocalEngine
from areal_lite.engine.local.prefix import PrefixCache, _common_prefix
from areal_lite.models import load_causal_lm, load_tokenizer
from areal_lite.train.logprobs import sequence_logprobs
from areal_lite.types import GenerateRequest, SamplingParams


def kv_of(ids, layers=2):
    """Fake per-layer KV whose column j holds token ids[j] (to check what is copied)."""
    col = torch.tensor(ids, dtype=torch.float32)[None, None, :, None]
    return [(col.clone(), -col.clone()) for _ in range(layers)]


def test_lookup_finds_the_longest_shared_prefix_within_the_limit():
    cache = PrefixCache(1000, min_match=3)
    cache.store([1, 2, 3, 4, 5, 6], kv_of([1, 2, 3, 4, 5, 6]))
    cache.store([1, 2, 9, 9], kv_of([1, 2, 9, 9]))
    n, entry = cache.lookup([1, 2, 3, 4, 7], limit=10)
    assert n == 4 and entry.ids == (1, 2, 3, 4, 5, 6)
    assert cache.lookup([1, 2, 3, 4, 7], limit=3)[0] == 3
    assert cache.lookup([1, 2, 8], limit=10) == (0, None)  # 2 < min_match
    assert cache.hits == 2 and cache.hit_tokens == 7


def test_min_match_and_store_copies_only_the_prompt_columns():
    cache = PrefixCache(1000, min_match=3)
    cache.store([5, 6], kv_of([5, 6]))  # shorter than min_match: not kept
    assert len(cache) == 0
    cache.store([5, 6, 7], kv_of([5, 6, 7, 8, 9]))  # a wider buffer: first 3 columns kept
    _, entry = cache.lookup([5, 6, 7, 1], limit=10)
    assert entry.kv[0][0].shape[2] == 3 and entry.kv[1][1][0, 0, :, 0].tolist() == [-5, -6, -7]


def test_covered_prefixes_are_not_duplicated():
    cache = PrefixCache(1000, min_match=2)
    cache.store([1, 2, 3], kv_of([1, 2, 3]))
    cache.store([1, 2, 3, 4, 5], kv_of([1, 2, 3, 4, 5]))  # replaces [1, 2, 3]
    cache.store([1, 2, 3, 4], kv_of([1, 2, 3, 4]))  # covered by [1..5]: not kept
    assert len(cache) == 1 and cache.num_tokens == 5


def test_least_recently_used_goes_first_within_the_token_budget():
    cache = PrefixCache(10, min_match=2)
    cache.store([1, 1, 1, 1], kv_of([1, 1, 1, 1]))
    cache.store([2, 2, 2, 2], kv_of([2, 2, 2, 2]))
    cache.lookup([1, 1, 9], limit=5)  # touch the first
    cache.store([3, 3, 3, 3], kv_of([3, 3, 3, 3]))  # 12 > 10: the [2...] entry goes
    assert cache.lookup([2, 2, 2], limit=5) == (0, None)
    assert cache.lookup([1, 1, 1], limit=5)[0] == 3 and cache.num_tokens == 8
    cache.store(list(range(11)), kv_of(list(range(11))))  # larger than the budget: skipped
    assert cache.num_tokens == 8
    cache.clear()
    assert len(cache) == 0 and cache.num_tokens == 0


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_causal_lm(tiny_model_dir)


@pytest.fixture(scope="module")
def chats(tiny_model_dir):
    """Prompts sharing a long system prompt, as an agent's episodes would."""
    tok = load_tokenizer(tiny_model_dir)
    system = "You are a careful assistant. Think about the question, then answer briefly."
    out = []
    for q in ("What is 2 + 2?", "Name a color.", "What is 2 + 2? Explain.", "Say hi."):
        ids = tok.apply_chat_template([{"role": "system", "content": system},
                                       {"role": "user", "content": q}],
                                      add_generation_prompt=True, tokenize=True)["input_ids"]
        out.append(list(ids))
    return out


def req(ids, rid, **kw):
    kw.setdefault("temperature", 0.0)
    kw.setdefault("max_new_tokens", 10)
    return GenerateRequest(rid=rid, input_ids=ids, sampling=SamplingParams(ignore_eos=True, **kw))


async def run_one_by_one(model, prompts, cache_tokens, **kw):
    async with LocalEngine(model, prefix_cache_tokens=cache_tokens) as eng:
        results = [await eng.generate(req(p, f"r{i}", **kw)) for i, p in enumerate(prompts)]
        return results, eng.prefix_cache


async def test_cached_prefix_gives_the_same_tokens_and_logprobs(model, chats):
    prompts = chats + chats[:2]  # the repeats hit their own full prompt
    cached, cache = await run_one_by_one(model, prompts, 8192)
    plain, none = await run_one_by_one(model, prompts, 0)
    assert none is None and cache.hits >= len(prompts) - 1
    assert cache.hit_tokens > sum(len(p) for p in prompts) // 2  # most prefill skipped
    assert [r.cached_tokens for r in cached][-2:] == [len(p) - 1 for p in prompts[-2:]]
    assert all(r.cached_tokens == 0 for r in plain)
    for a, b in zip(cached, plain, strict=True):
        assert a.output_ids == b.output_ids
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs, strict=True)) < 1e-4


async def test_sampled_tokens_match_trainer_logprobs_after_a_cache_hit(model, chats):
    results, cache = await run_one_by_one(model, chats, 8192, temperature=1.0, seed=3)
    assert cache.hits >= 3
    for p, r in zip(chats, results, strict=True):
        ids = torch.tensor([p + r.output_ids])
        lp = sequence_logprobs(model, ids, torch.ones_like(ids))[0, len(p):]
        assert (lp - torch.tensor(r.logprobs)).abs().max() < 1e-4


async def test_group_of_identical_prompts_then_more_of_them(model, chats):
    """A GRPO group admitted together computes the prompt once; a later group of the same
    prompt takes it from the cache; outputs equal a fresh, cache-less engine's."""
    group = [req(chats[0], f"g{i}", temperature=1.0, seed=i) for i in range(4)]
    async with LocalEngine(model, prefix_cache_tokens=4096) as eng:
        first = await asyncio.gather(*[eng.generate(r) for r in group])
        hits = eng.prefix_cache.hits
        again = await asyncio.gather(*[eng.generate(r) for r in group])
        assert eng.prefix_cache.hits > hits
    async with LocalEngine(model, prefix_cache_tokens=0) as eng:
        plain = await asyncio.gather(*[eng.generate(r) for r in group])
    for a, b, c in zip(first, again, plain, strict=True):
        assert a.output_ids == b.output_ids == c.output_ids


async def test_weight_update_clears_the_cache(model, chats, tmp_path):
    import copy

    from areal_lite.testing.tiny import make_tiny_model_dir

    other = load_causal_lm(make_tiny_model_dir(tmp_path / "other", seed=1))
    engine_model = copy.deepcopy(model)
    async with LocalEngine(engine_model, prefix_cache_tokens=4096) as eng:
        await eng.generate(req(chats[0], "before"))
        assert len(eng.prefix_cache) == 1
        await eng.update_weights(other.state_dict(), version=1)
        assert len(eng.prefix_cache) == 0
        after = await eng.generate(req(chats[0], "after"))
    async with LocalEngine(other, prefix_cache_tokens=0) as fresh:
        want = await fresh.generate(req(chats[0], "fresh"))
    assert after.output_ids == want.output_ids and after.versions == [1] * 10


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 3), max_size=30), st.lists(st.integers(0, 3), max_size=30),
       st.integers(0, 40))
def test_common_prefix_matches_a_token_by_token_scan(a, b, limit):
    want = 0
    while want < min(len(a), len(b), limit) and a[want] == b[want]:
        want += 1
    assert _common_prefix(np.array(a, dtype=np.int64), np.array(b, dtype=np.int64), limit) == want
