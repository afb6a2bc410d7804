"""Hypothesis strategies shared by the cache and export tests."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import strategies as st

from areal_lite.cache import InteractionCache
from areal_lite.types import CompletionNode


@dataclass
class Forest:
    nodes: list[CompletionNode]  # in generation order (parents before children)
    rewards: dict[str, float]  # r for some node ids


def node(nid, parent=None, prompt=(), output=(), response_id=None, logprobs=None,
         versions=None):
    output = list(output)
    return CompletionNode(
        id=nid, response_id=response_id or nid, parent_id=parent, prompt_ids=list(prompt),
        output_ids=output,
        logprobs=[-0.5] * len(output) if logprobs is None else logprobs,
        versions=[0] * len(output) if versions is None else versions,
        finish_reason="stop",
    )


@st.composite
def forests(draw, max_nodes: int = 12) -> Forest:
    """Random valid forests: random ids, parents, tokens, and rewards on some nodes."""
    n = draw(st.integers(1, max_nodes))
    ids = draw(st.lists(st.text("abcdefgh", min_size=1, max_size=3), min_size=n,
                        max_size=n, unique=True))
    tokens = st.lists(st.integers(0, 40), max_size=4)
    nodes: list[CompletionNode] = []
    for i in range(n):
        p = draw(st.integers(-1, min(i - 1, 2)))  # -1: a new root; few parents: wide trees
        parent = nodes[p] if p >= 0 else None
        base = parent.prompt_ids + parent.output_ids if parent else []
        out = draw(tokens)
        nodes.append(CompletionNode(
            id=ids[i], response_id=ids[i], parent_id=parent.id if parent else None,
            prompt_ids=base + draw(tokens), output_ids=out,
            logprobs=draw(st.lists(st.floats(-9, 0), min_size=len(out), max_size=len(out))),
            versions=draw(st.lists(st.integers(0, 3), min_size=len(out), max_size=len(out))),
            finish_reason="stop",
        ))
    values = st.one_of(st.floats(-1, 1), st.integers(-3, 3).map(float),
                       st.integers(1, 2**53).map(lambda k: k / 2**53))  # non-dyadic sums
    maybe = [draw(st.one_of(st.none(), values)) for _ in ids]
    rewards = {nid: r for nid, r in zip(ids, maybe) if r is not None}
    return Forest(nodes, rewards)


def caches(max_nodes: int = 12):
    """Random valid caches with rewards set on some nodes."""
    def build(forest: Forest) -> InteractionCache:
        cache = InteractionCache(forest.nodes)
        for nid, r in forest.rewards.items():
            cache.set_reward(nid, r)
        return cache
    return forests(max_nodes).map(build)
