"""Tests for episode export: `individual`, `concat` and `tree` samples from an interaction tree."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from msgspec.structs import replace
from strategies import caches

from areal_lite.cache import InteractionCache
from areal_lite.export import (
    EXPORTERS,
    export_concat,
    export_episode,
    export_individual,
    export_tree,
)
from areal_lite.types import CompletionNode, Sample, Span

FAST = settings(max_examples=100, deadline=None)


def span(node: CompletionNode) -> range:
    return range(len(node.prompt_ids), len(node.prompt_ids) + len(node.output_ids))


def check_shapes(sample: Sample) -> None:
    size = len(sample.input_ids)
    assert len(sample.loss_mask) == len(sample.logprobs) == len(sample.versions) == size
    for m, lp, v in zip(sample.loss_mask, sample.logprobs, sample.versions):
        assert m in (0, 1)
        if v == -1:
            assert m == 0 and lp == 0.0


# ---- hand-computed ---------------------------------------------------------------------


def two_turn_cache() -> InteractionCache:
    """root: prompt [1,2] -> [3,4]; two follow-ups continue it; a separate root."""
    cache = InteractionCache([
        CompletionNode(id="r", response_id="r", parent_id=None, prompt_ids=[1, 2],
                       output_ids=[3, 4], logprobs=[-0.1, -0.2], versions=[5, 5],
                       finish_reason="stop"),
        CompletionNode(id="a", response_id="a", parent_id="r", prompt_ids=[1, 2, 3, 4, 9],
                       output_ids=[6], logprobs=[-0.3], versions=[6], finish_reason="stop"),
        CompletionNode(id="b", response_id="b", parent_id="r", prompt_ids=[1, 2, 3, 4, 8, 8],
                       output_ids=[7, 7], logprobs=[-0.4, -0.5], versions=[6, 7],
                       finish_reason="length"),
        CompletionNode(id="z", response_id="z", parent_id=None, prompt_ids=[0],
                       output_ids=[1], logprobs=[-0.6], versions=[7], finish_reason="stop"),
    ])
    cache.set_rewards({"a": 1.0, "b": 0.0, "r": 0.5})
    return cache


def test_individual_by_hand():
    samples = export_individual(two_turn_cache(), gamma=0.5, episode_id="ep")
    r, a, b, z = samples
    assert r == Sample(
        input_ids=[1, 2, 3, 4], loss_mask=[0, 0, 1, 1], logprobs=[0.0, 0.0, -0.1, -0.2],
        versions=[-1, -1, 5, 5], reward=0.5 + 0.5 * 0.5, raw_reward=0.5, episode_id="ep",
        completion_ids=["r"])
    assert a.input_ids == [1, 2, 3, 4, 9, 6] and a.loss_mask == [0, 0, 0, 0, 0, 1]
    assert a.logprobs[-1] == -0.3 and a.versions == [-1] * 5 + [6]
    assert (a.reward, a.raw_reward, b.reward, b.raw_reward) == (1.0, 1.0, 0.0, 0.0)
    assert (z.reward, z.raw_reward, z.completion_ids) == (0.0, 0.0, ["z"])


@pytest.mark.parametrize("shared_once", [True, False])
def test_concat_by_hand(shared_once):
    a, b, z = export_concat(two_turn_cache(), gamma=0.5, agg="max", episode_id="ep",
                            train_shared_once=shared_once)
    assert a == Sample(
        input_ids=[1, 2, 3, 4, 9, 6], loss_mask=[0, 0, 1, 1, 0, 1],
        logprobs=[0.0, 0.0, -0.1, -0.2, 0.0, -0.3], versions=[-1, -1, 5, 5, -1, 6],
        reward=1.0, raw_reward=1.0, episode_id="ep", completion_ids=["r", "a"])
    assert b.input_ids == [1, 2, 3, 4, 8, 8, 7, 7]
    shared = [0, 0] if shared_once else [1, 1]  # the root's span was trained in `a`
    assert b.loss_mask == [0, 0, *shared, 0, 0, 1, 1]
    assert b.logprobs == [0.0, 0.0, -0.1, -0.2, 0.0, 0.0, -0.4, -0.5]
    assert b.versions == [-1, -1, 5, 5, -1, -1, 6, 7]
    assert (b.reward, b.raw_reward, b.completion_ids) == (0.0, 0.0, ["r", "b"])
    assert (z.input_ids, z.loss_mask, z.completion_ids) == ([0, 1], [0, 1], ["z"])


@pytest.mark.parametrize("shared_once", [True, False])
def test_tree_by_hand(shared_once):
    """concat's samples, with each trained completion's own discounted reward as a span."""
    a, b, z = export_tree(two_turn_cache(), gamma=0.5, agg="max", episode_id="ep",
                          train_shared_once=shared_once)
    concat = export_concat(two_turn_cache(), gamma=0.5, agg="max", episode_id="ep",
                           train_shared_once=shared_once)
    for tree, flat in zip((a, b, z), concat, strict=True):
        assert replace(tree, spans=[]) == flat
    root = Span(start=2, end=4, reward=0.5 + 0.5 * 1.0, raw_reward=0.5, completion_id="r")
    assert a.spans == [root, Span(start=5, end=6, reward=1.0, raw_reward=1.0, completion_id="a")]
    leaf_b = Span(start=6, end=8, reward=0.0, raw_reward=0.0, completion_id="b")
    assert b.spans == ([root, leaf_b] if not shared_once else [leaf_b])
    assert z.spans == [Span(start=1, end=2, reward=0.0, raw_reward=0.0, completion_id="z")]


def test_export_episode_dispatch_and_errors():
    cache = two_turn_cache()
    assert sorted(EXPORTERS) == ["concat", "individual", "tree"]
    for style, fn in EXPORTERS.items():
        assert export_episode(cache, style=style, gamma=0.9, agg="max", episode_id="e",
                              train_shared_once=False) == fn(
            cache, gamma=0.9, agg="max", episode_id="e", train_shared_once=False)
    with pytest.raises(ValueError, match="export_style"):
        export_episode(cache, style="flat", gamma=1.0)
    with pytest.raises(ValueError, match="aggregation"):
        export_episode(cache, style="concat", gamma=1.0, agg="sum")
    assert export_concat(InteractionCache(), gamma=1.0) == []
    assert export_individual(InteractionCache(), gamma=1.0) == []
    assert export_tree(InteractionCache(), gamma=1.0) == []


# ---- properties ------------------------------------------------------------------------


@FAST
@given(caches(), st.floats(0, 1), st.sampled_from(["mean", "max"]))
def test_individual_is_one_sample_per_completion(cache, gamma, agg):
    samples = export_individual(cache, gamma=gamma, agg=agg, episode_id="ep")
    returns = cache.discounted_rewards(gamma, agg)
    assert [s.completion_ids for s in samples] == [[n.id] for n in cache.nodes]
    for s, n in zip(samples, cache.nodes):
        check_shapes(s)
        assert s.input_ids == n.prompt_ids + n.output_ids
        assert [i for i, m in enumerate(s.loss_mask) if m] == list(span(n))
        assert s.logprobs[len(n.prompt_ids):] == n.logprobs
        assert s.versions[len(n.prompt_ids):] == n.versions
        assert s.reward == returns[n.id]
        assert s.raw_reward == (cache.raw_reward(n.id) or 0.0)
        assert s.episode_id == "ep"


@FAST
@given(caches(), st.floats(0, 1), st.sampled_from(["mean", "max"]), st.booleans())
def test_concat_equals_individual_stitched(cache, gamma, agg, shared_once):
    concat = export_concat(cache, gamma=gamma, agg=agg, train_shared_once=shared_once)
    individual = {s.completion_ids[0]: s for s in export_individual(cache, gamma=gamma, agg=agg)}
    returns = cache.discounted_rewards(gamma, agg)
    assert [s.completion_ids[-1] for s in concat] == [n.id for n in cache.leaves()]
    for sample in concat:
        check_shapes(sample)
        path = cache.path(sample.completion_ids[-1])
        assert sample.completion_ids == [n.id for n in path]
        assert (sample.reward, sample.raw_reward) == (
            returns[path[-1].id], cache.raw_reward(path[-1].id) or 0.0)
        sampled = set()
        for n in path:
            ind, k = individual[n.id], len(n.prompt_ids)
            s = slice(k, k + len(n.output_ids))
            assert sample.input_ids[s] == ind.input_ids[k:]  # == n.output_ids
            assert sample.logprobs[s] == ind.logprobs[k:]
            assert sample.versions[s] == ind.versions[k:]
            sampled |= set(span(n))
        # positions no path node sampled are context only
        for i in set(range(len(sample.input_ids))) - sampled:
            assert (sample.loss_mask[i], sample.logprobs[i], sample.versions[i]) == (0, 0.0, -1)
        if not shared_once:
            trained = {(i, sample.logprobs[i]) for i, m in enumerate(sample.loss_mask) if m}
            want = {(i, individual[n.id].logprobs[i]) for n in path for i in span(n)}
            assert trained == want


@FAST
@given(caches())
def test_concat_trains_each_completion_exactly_once(cache):
    concat = export_concat(cache, gamma=1.0, train_shared_once=True)
    times_trained = {n.id: 0 for n in cache.nodes}
    first_leaf = {}
    for idx, sample in enumerate(concat):
        for n in cache.path(sample.completion_ids[-1]):
            first_leaf.setdefault(n.id, idx)
            mask = {sample.loss_mask[i] for i in span(n)}
            assert len(mask) <= 1  # a span is trained whole or not at all
            if mask == {1}:
                times_trained[n.id] += 1
                assert first_leaf[n.id] == idx  # in the first sample that contains it
    for n in cache.nodes:
        assert times_trained[n.id] == (1 if n.output_ids else 0), n.id
    total = sum(sum(s.loss_mask) for s in concat)
    assert total == sum(len(n.output_ids) for n in cache.nodes)


@FAST
@given(caches(), st.floats(0, 1), st.sampled_from(["mean", "max"]))
def test_tree_trains_every_sampled_token_once_with_its_completions_reward(cache, gamma, agg):
    """Each completion is exactly one span (one advantage unit, as in `individual`): its
    tokens are trained once, in the first leaf's sample that contains it, and carry its
    own discounted and raw reward; the spans cover exactly the trained tokens."""
    tree = export_tree(cache, gamma=gamma, agg=agg, episode_id="ep")
    concat = export_concat(cache, gamma=gamma, agg=agg, episode_id="ep")
    individual = {s.completion_ids[0]: s for s in
                  export_individual(cache, gamma=gamma, agg=agg, episode_id="ep")}
    assert [replace(s, spans=[]) for s in tree] == concat
    seen: dict[str, int] = {}
    for idx, sample in enumerate(tree):
        check_shapes(sample)
        covered = [0] * len(sample.input_ids)
        path = {n.id: n for n in cache.path(sample.completion_ids[-1])}
        for sp in sample.spans:
            node, ind = path[sp.completion_id], individual[sp.completion_id]
            assert range(sp.start, sp.end) == span(node)
            assert (sp.reward, sp.raw_reward) == (ind.reward, ind.raw_reward)
            assert sample.logprobs[sp.start:sp.end] == node.logprobs
            assert sp.completion_id not in seen
            seen[sp.completion_id] = idx
            for i in range(sp.start, sp.end):
                covered[i] += 1
        assert covered == sample.loss_mask  # trained exactly where a span is, once
        assert [sp.completion_id for sp in sample.spans] == [
            nid for nid in sample.completion_ids if nid in {sp.completion_id for sp in sample.spans}]
    assert sorted(seen) == sorted(n.id for n in cache.nodes)  # one unit per completion
    for nid, idx in seen.items():  # in the first leaf whose path holds it
        assert idx == min(k for k, s in enumerate(tree) if nid in s.completion_ids)
