"""Tests for the interaction cache: tree invariants, reward keys, tree-aware discount."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import forests, node

from areal_lite.cache import InteractionCache, discount
from areal_lite.types import CompletionNode

FAST = settings(max_examples=100, deadline=None)


# ---- random valid forests --------------------------------------------------------------


def insertion_order(nodes: Sequence[CompletionNode], priority: Sequence[float]):
    """A parents-first order of `nodes`: among addable nodes, lowest priority first."""
    added: set[str] = set()
    todo = list(range(len(nodes)))
    out = []
    while todo:
        ready = [i for i in todo if nodes[i].parent_id is None or nodes[i].parent_id in added]
        i = min(ready, key=lambda j: (priority[j], j))
        todo.remove(i)
        added.add(nodes[i].id)
        out.append(nodes[i])
    return out


def priorities(n_max: int = 12):
    return st.permutations(range(n_max))


def build(nodes: Sequence[CompletionNode], rewards: Mapping[str, float]) -> InteractionCache:
    cache = InteractionCache(nodes)
    for key, r in rewards.items():
        cache.set_reward(key, r)
    return cache


def reference_discount(nodes, rewards, gamma, agg):
    """Slow, obviously correct: recursion straight from the definition."""
    kids = {n.id: [c.id for c in nodes if c.parent_id == n.id] for n in nodes}

    def ret(nid):
        r = rewards.get(nid, 0.0)
        vals = [ret(k) for k in kids[nid]]
        if not vals:
            return r
        return r + gamma * (sum(vals) / len(vals) if agg == "mean" else max(vals))

    return {n.id: ret(n.id) for n in nodes}


def bits(values: Mapping[str, float]) -> dict[str, str]:
    return {k: float(v).hex() for k, v in values.items()}


# ---- discount properties ---------------------------------------------------------------


@FAST
@given(forests(), st.floats(0, 1), st.sampled_from(["mean", "max"]))
def test_discount_matches_reference(forest, gamma, agg):
    got = build(forest.nodes, forest.rewards).discounted_rewards(gamma, agg)
    want = reference_discount(forest.nodes, forest.rewards, gamma, agg)
    assert list(got) == [n.id for n in forest.nodes]  # insertion order
    for nid, value in want.items():
        assert math.isclose(got[nid], value, rel_tol=1e-9, abs_tol=1e-12), nid


@FAST
@given(forests(), priorities(), priorities(), st.floats(0, 1), st.sampled_from(["mean", "max"]))
def test_discount_is_bit_identical_under_insertion_order(forest, p1, p2, gamma, agg):
    a = build(insertion_order(forest.nodes, p1), forest.rewards)
    b = build(insertion_order(forest.nodes, p2), forest.rewards)
    assert bits(a.discounted_rewards(gamma, agg)) == bits(b.discounted_rewards(gamma, agg))


@FAST
@given(st.lists(st.floats(-1e6, 1e6), min_size=3, max_size=10), st.randoms(),
       st.floats(0.01, 1), st.sampled_from(["mean", "max"]))
def test_wide_fan_out_is_order_independent(rewards, rnd, gamma, agg):
    kids = [node(f"k{i}", "root") for i in range(len(rewards))]
    shuffled = kids[:]
    rnd.shuffle(shuffled)
    r = {k.id: v for k, v in zip(kids, rewards)}
    a = build([node("root"), *kids], r).discounted_rewards(gamma, agg)
    b = build([node("root"), *shuffled], r).discounted_rewards(gamma, agg)
    assert a["root"].hex() == b["root"].hex()


@FAST
@given(forests(), st.data(), st.floats(0, 1), st.sampled_from(["mean", "max"]))
def test_reward_only_reaches_ancestors(forest, data, gamma, agg):
    cache = build(forest.nodes, forest.rewards)
    target = data.draw(st.sampled_from(forest.nodes)).id
    before = cache.discounted_rewards(gamma, agg)
    cache.set_reward(target, (cache.raw_reward(target) or 0.0) + 2.0)
    after = cache.discounted_rewards(gamma, agg)
    chain = {n.id for n in cache.path(target)}
    for nid in before:
        if nid not in chain:
            assert before[nid].hex() == after[nid].hex(), f"{target} leaked into {nid}"
    assert math.isclose(after[target] - before[target], 2.0, rel_tol=1e-9)


@FAST
@given(forests(), st.sampled_from(["mean", "max"]))
def test_gamma_zero_gives_raw_rewards(forest, agg):
    cache = build(forest.nodes, forest.rewards)
    got = cache.discounted_rewards(0.0, agg)
    assert got == {n.id: forest.rewards.get(n.id, 0.0) for n in forest.nodes}


@FAST
@given(st.lists(st.one_of(st.none(), st.floats(-1, 1)), min_size=1, max_size=30))
def test_gamma_one_mean_on_a_chain_sums_to_the_end(rewards):
    ids = [f"t{i}" for i in range(len(rewards))]
    cache = InteractionCache(node(nid, ids[i - 1] if i else None) for i, nid in enumerate(ids))
    for nid, r in zip(ids, rewards):
        if r is not None:
            cache.set_reward(nid, r)
    got = cache.discounted_rewards(1.0, "mean")
    for i, nid in enumerate(ids):
        want = math.fsum(r for r in rewards[i:] if r is not None)
        assert math.isclose(got[nid], want, rel_tol=1e-9, abs_tol=1e-12)


def test_discount_by_hand():
    #        root (r=1)
    #       /    \
    #    a (r=0)  b (r=4)
    #    /   \
    # a1 (2)  a2 (none)
    cache = InteractionCache([node("root"), node("a", "root"), node("b", "root"),
                              node("a1", "a"), node("a2", "a")])
    cache.set_rewards({"root": 1, "b": 4, "a1": 2})
    mean = cache.discounted_rewards(0.5, "mean")
    # a = 0 + .5*mean(2, 0) = .5 ; root = 1 + .5*mean(.5, 4) = 2.125
    assert mean == {"root": 2.125, "a": 0.5, "b": 4.0, "a1": 2.0, "a2": 0.0}
    mx = cache.discounted_rewards(0.5, "max")
    # a = .5*2 = 1 ; root = 1 + .5*max(1, 4) = 3
    assert mx == {"root": 3.0, "a": 1.0, "b": 4.0, "a1": 2.0, "a2": 0.0}


def test_deep_trees_need_no_recursion():
    depth = 5000
    cache = InteractionCache(node(f"d{i}", f"d{i - 1}" if i else None) for i in range(depth))
    cache.set_reward(f"d{depth - 1}", 1.0)
    got = cache.discounted_rewards(1.0)
    assert got["d0"] == 1.0
    assert len(cache.path(f"d{depth - 1}")) == depth


def test_discount_rejects_bad_arguments():
    tree = {"r": ["c"], "c": []}
    with pytest.raises(ValueError, match="aggregation"):
        discount(tree, {}, 0.9, "sum")
    with pytest.raises(ValueError, match="turn_discount"):
        discount(tree, {}, 1.5)
    with pytest.raises(ValueError, match="not in the tree"):
        discount(tree, {"x": 1.0}, 0.9)
    with pytest.raises(ValueError, match="missing"):
        discount({"r": ["c"]}, {}, 0.9)
    with pytest.raises(ValueError, match="two parents"):
        discount({"r": ["c"], "s": ["c"], "c": []}, {}, 0.9)
    with pytest.raises(ValueError, match="cycle"):
        discount({"r": [], "a": ["b"], "b": ["a"]}, {}, 0.9)


# ---- structure -------------------------------------------------------------------------


@FAST
@given(forests(), priorities())
def test_structure_queries_are_consistent(forest, prio):
    ordered = insertion_order(forest.nodes, prio)
    cache = InteractionCache(ordered)
    assert len(cache) == len(ordered) and [n.id for n in cache.nodes] == [n.id for n in ordered]
    assert cache.last_response_id == ordered[-1].response_id
    assert [n.id for n in cache.roots()] == [n.id for n in ordered if n.parent_id is None]
    has_kids = {n.parent_id for n in ordered}
    assert [n.id for n in cache.leaves()] == [n.id for n in ordered if n.id not in has_kids]
    for n in ordered:
        assert n.id in cache and cache.get(n.id) is n
        assert [c.id for c in cache.children(n.id)] == [
            c.id for c in ordered if c.parent_id == n.id]
        path = cache.path(n.id)
        assert path[0].parent_id is None and path[-1] is n
        assert all(child.parent_id == par.id for par, child in zip(path, path[1:]))


def test_empty_cache():
    cache = InteractionCache()
    assert len(cache) == 0 and cache.last_response_id is None
    assert cache.nodes == [] and cache.roots() == [] and cache.leaves() == []
    assert cache.discounted_rewards(0.9) == {}
    assert "x" not in cache
    with pytest.raises(KeyError, match="'x'"):
        cache.get("x")


# ---- add() validation ------------------------------------------------------------------


def test_add_accepts_a_continuation():
    cache = InteractionCache([node("a", prompt=[1, 2], output=[3])])
    cache.add(node("b", "a", prompt=[1, 2, 3], output=[4]))
    cache.add(node("c", "a", prompt=[1, 2, 3, 9, 9], output=[]))
    assert [n.id for n in cache.children("a")] == ["b", "c"]


def test_add_rejects_duplicate_id():
    cache = InteractionCache([node("a")])
    with pytest.raises(ValueError, match="'a' is already"):
        cache.add(node("a"))


def test_add_rejects_unknown_parent():
    cache = InteractionCache([node("a")])
    with pytest.raises(ValueError, match="parent 'zz' is not in"):
        cache.add(node("b", "zz"))
    assert len(cache) == 1 and cache.children("a") == []


@pytest.mark.parametrize("prompt", [
    [1, 2],  # shorter than parent prompt + output
    [1, 2, 4],  # parent's output token differs
    [7, 2, 3, 5],  # parent's prompt token differs
    [],
])
def test_add_rejects_broken_prefix(prompt):
    cache = InteractionCache([node("a", prompt=[1, 2], output=[3])])
    with pytest.raises(ValueError, match="do not start with the prompt"):
        cache.add(node("b", "a", prompt=prompt, output=[6]))
    assert "b" not in cache and cache.children("a") == []
    cache.add(node("b", None, prompt=prompt, output=[6]))  # as a new root it is fine


@pytest.mark.parametrize("logprobs,versions", [
    ([-0.1], [0, 0]), ([-0.1, -0.2, -0.3], [0, 0]), ([-0.1, -0.2], [0]), ([], []),
])
def test_add_rejects_length_mismatch(logprobs, versions):
    cache = InteractionCache()
    with pytest.raises(ValueError, match="one entry per output token"):
        cache.add(node("a", output=[5, 6], logprobs=logprobs, versions=versions))
    assert len(cache) == 0


# ---- rewards ---------------------------------------------------------------------------


def n_choices():
    """A first turn with n=2 choices of response `resp-1`, then a follow-up on choice 0."""
    return InteractionCache([
        node("resp-1/0", prompt=[1], output=[2], response_id="resp-1"),
        node("resp-1/1", prompt=[1], output=[3], response_id="resp-1"),
        node("resp-2", "resp-1/0", prompt=[1, 2, 4], output=[5]),
    ])


def test_set_reward_by_response_id_covers_every_choice():
    cache = n_choices()
    cache.set_reward("resp-1", 0.5)
    assert [cache.raw_reward(i) for i in ("resp-1/0", "resp-1/1", "resp-2")] == [0.5, 0.5, None]
    cache.set_reward("resp-1/1", 1.0)  # a single choice by its completion id
    assert cache.raw_reward("resp-1/0") == 0.5 and cache.raw_reward("resp-1/1") == 1.0


def test_set_last_reward_targets_the_last_response():
    cache = n_choices()
    cache.set_last_reward(True)
    assert cache.raw_reward("resp-2") == 1.0 and cache.raw_reward("resp-1/0") is None
    cache.add(node("resp-3/0", prompt=[8], response_id="resp-3"))
    cache.add(node("resp-3/1", prompt=[8], response_id="resp-3"))
    assert cache.last_response_id == "resp-3"
    cache.set_last_reward(2)
    assert cache.raw_reward("resp-3/0") == cache.raw_reward("resp-3/1") == 2.0


def test_reward_errors():
    cache = n_choices()
    with pytest.raises(KeyError, match="'nope'"):
        cache.set_reward("nope", 1.0)
    with pytest.raises(ValueError, match="finite"):
        cache.set_reward("resp-2", float("nan"))
    with pytest.raises(ValueError, match="must be a number"):
        cache.set_reward("resp-2", "high")  # type: ignore[arg-type]
    with pytest.raises(KeyError, match="'nope'"):
        cache.set_rewards({"resp-2": 1.0, "nope": 2.0})
    assert cache.raw_reward("resp-2") is None  # set_rewards changed nothing
    with pytest.raises(KeyError, match="'nope'"):
        cache.raw_reward("nope")
    with pytest.raises(ValueError, match="no completion"):
        InteractionCache().set_last_reward(1.0)
