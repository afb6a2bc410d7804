"""Interaction cache: proxy -> **cache** -> export. One tree of completions per episode.

The proxy records every sampled completion of a session as a `CompletionNode`. A node's
parent is the completion whose exact tokens it continues (prefix-stable rendering,
DESIGN.md decision 2), so every root-to-leaf path is one contiguous token sequence. A
session may hold several roots (a prefix break, parallel calls, n > 1 choices of a
first turn).

Rewards arrive keyed by completion id or by the response id the client saw, and are
discounted from children to parents (decision 3):

    R(node) = r(node) + gamma * agg(R(child) for child in children(node))

with `r` = 0 where no reward was given, `agg` in {"mean", "max"}, and R(leaf) = r(leaf).
Siblings never leak into each other, and the result is bit-identical whatever order the
completions arrived in (children are combined sorted by id, sums are exactly rounded).

Everything here is pure: no I/O, no `await`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence

from areal_lite.types import CompletionNode

__all__ = ["AGGREGATORS", "InteractionCache", "discount"]


def _mean(values: Sequence[float]) -> float:
    # fsum is correctly rounded, hence independent of the order of `values`.
    return math.fsum(values) / len(values)


AGGREGATORS: dict[str, Callable[[Sequence[float]], float]] = {"mean": _mean, "max": max}


def _check_discount_args(gamma: float, agg: str) -> Callable[[Sequence[float]], float]:
    if agg not in AGGREGATORS:
        raise ValueError(
            f"turn discount aggregation must be one of {sorted(AGGREGATORS)}, got {agg!r}"
        )
    if not (0.0 <= gamma <= 1.0):
        raise ValueError(
            f"turn discount gamma (rollout.agent.turn_discount) must be in [0, 1], got {gamma!r}"
        )
    return AGGREGATORS[agg]


def _children_first(children: Mapping[str, Sequence[str]]) -> list[str]:
    """All node ids ordered so that every child comes before its parent.

    Raises ValueError when `children` is not a forest (unknown child, a node with two
    parents, or a cycle).
    """
    parent_of: dict[str, str] = {}
    for parent, kids in children.items():
        for kid in kids:
            if kid not in children:
                raise ValueError(f"node {kid!r} (child of {parent!r}) is missing from the tree")
            if kid in parent_of:
                raise ValueError(
                    f"node {kid!r} has two parents ({parent_of[kid]!r} and {parent!r})"
                )
            parent_of[kid] = parent
    order = [nid for nid in children if nid not in parent_of]  # roots, then BFS
    for nid in order:  # `order` grows while we walk it
        order.extend(children[nid])
    if len(order) != len(children):
        raise ValueError("the tree has a cycle: some nodes are unreachable from any root")
    order.reverse()
    return order


def discount(
    children: Mapping[str, Sequence[str]],
    rewards: Mapping[str, float],
    gamma: float,
    agg: str = "mean",
) -> dict[str, float]:
    """Discounted reward of every node of a forest.

    `children` maps every node id (leaves included, with `[]`) to its children's ids;
    `rewards` gives r(node) for some nodes (missing = 0). Returns R(node) for every node,
    in the key order of `children`. Iterative, so arbitrarily deep trees are fine.
    """
    combine = _check_discount_args(gamma, agg)
    unknown = [nid for nid in rewards if nid not in children]
    if unknown:
        raise ValueError(f"rewards given for nodes not in the tree: {unknown[:5]}")
    out: dict[str, float] = {}
    for nid in _children_first(children):
        r = float(rewards.get(nid, 0.0))
        kids = children[nid]
        if kids:
            r += gamma * combine([out[k] for k in sorted(kids)])
        out[nid] = r
    return {nid: out[nid] for nid in children}


def _check_lengths(node: CompletionNode) -> None:
    n = len(node.output_ids)
    if len(node.logprobs) != n or len(node.versions) != n:
        raise ValueError(
            f"completion {node.id!r}: output_ids, logprobs and versions must have one entry "
            f"per output token, got {n}, {len(node.logprobs)} and {len(node.versions)} "
            "(the engine returned mismatched arrays)"
        )


def _check_prefix(node: CompletionNode, parent: CompletionNode) -> None:
    np_, no = len(parent.prompt_ids), len(parent.output_ids)
    ok = (
        len(node.prompt_ids) >= np_ + no
        and node.prompt_ids[:np_] == parent.prompt_ids
        and node.prompt_ids[np_ : np_ + no] == parent.output_ids
    )
    if not ok:
        raise ValueError(
            f"completion {node.id!r}: its prompt_ids do not start with the prompt + output "
            f"tokens of its parent {parent.id!r}; record it as a new root (parent_id=None) "
            "when the history was re-rendered"
        )


class InteractionCache:
    """The completions of one episode, as a forest linked by token-prefix continuation.

    Nodes are kept in insertion order; a parent is always added before its children.
    """

    def __init__(self, nodes: Iterable[CompletionNode] = ()) -> None:
        self._nodes: dict[str, CompletionNode] = {}
        self._children: dict[str, list[str]] = {}
        self._by_response: dict[str, list[str]] = {}
        self._rewards: dict[str, float] = {}
        for node in nodes:
            self.add(node)

    # ---- recording -------------------------------------------------------------------

    def add(self, node: CompletionNode) -> None:
        """Record a completion. Raises ValueError when it breaks the tree's invariants."""
        if node.id in self._nodes:
            raise ValueError(f"completion id {node.id!r} is already in this session's cache")
        _check_lengths(node)
        if node.parent_id is not None:
            parent = self._nodes.get(node.parent_id)
            if parent is None:
                raise ValueError(
                    f"completion {node.id!r}: parent {node.parent_id!r} is not in this "
                    "session's cache (add the parent first, or use parent_id=None)"
                )
            _check_prefix(node, parent)
            self._children[parent.id].append(node.id)
        self._nodes[node.id] = node
        self._children[node.id] = []
        self._by_response.setdefault(node.response_id, []).append(node.id)

    # ---- queries ---------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._nodes)

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._nodes

    def get(self, node_id: str) -> CompletionNode:
        """The node with this id; KeyError when there is none."""
        try:
            return self._nodes[node_id]
        except KeyError:
            raise KeyError(f"no completion {node_id!r} in this session's cache") from None

    @property
    def nodes(self) -> list[CompletionNode]:
        """All nodes, in insertion order."""
        return list(self._nodes.values())

    def children(self, node_id: str) -> list[CompletionNode]:
        """Direct children of a node, in insertion order."""
        self.get(node_id)
        return [self._nodes[k] for k in self._children[node_id]]

    def roots(self) -> list[CompletionNode]:
        """Nodes without a parent, in insertion order."""
        return [n for n in self._nodes.values() if n.parent_id is None]

    def leaves(self) -> list[CompletionNode]:
        """Nodes without children, in insertion order."""
        return [n for n in self._nodes.values() if not self._children[n.id]]

    @property
    def last_response_id(self) -> str | None:
        """Response id of the most recently added completion (None when empty)."""
        if not self._nodes:
            return None
        return next(reversed(self._nodes.values())).response_id

    def path(self, node_id: str) -> list[CompletionNode]:
        """The nodes from the root down to `node_id`, both included."""
        out = [self.get(node_id)]
        while out[-1].parent_id is not None:
            out.append(self._nodes[out[-1].parent_id])
        out.reverse()
        return out

    # ---- rewards ---------------------------------------------------------------------

    def _resolve(self, key: str) -> list[str]:
        """Node ids a reward key names: the node with that id and/or all its response's."""
        ids = list(self._by_response.get(key, ()))
        if key in self._nodes and key not in ids:
            ids.append(key)
        if not ids:
            raise KeyError(
                f"reward key {key!r} is neither a completion id nor a response id of this "
                "session (key rewards by `response.id`)"
            )
        return ids

    @staticmethod
    def _as_reward(key: str, reward: float) -> float:
        try:
            value = float(reward)
        except (TypeError, ValueError):
            raise ValueError(f"reward for {key!r} must be a number, got {reward!r}") from None
        if not math.isfinite(value):
            raise ValueError(f"reward for {key!r} must be finite, got {value!r}")
        return value

    def set_reward(self, key: str, reward: float) -> None:
        """Set r for a completion id, or for every choice of a response id (overwrites)."""
        value = self._as_reward(key, reward)
        for nid in self._resolve(key):
            self._rewards[nid] = value

    def set_rewards(self, rewards: Mapping[str, float]) -> None:
        """Set several rewards at once; nothing is changed if any key or value is bad."""
        resolved = [(self._resolve(k), self._as_reward(k, v)) for k, v in rewards.items()]
        for ids, value in resolved:
            for nid in ids:
                self._rewards[nid] = value

    def set_last_reward(self, reward: float) -> None:
        """Set r for every choice of the most recent response (an agent's float return)."""
        key = self.last_response_id
        if key is None:
            raise ValueError(
                "cannot assign the episode reward: the agent made no completion through "
                "the proxy in this session"
            )
        self.set_reward(key, reward)

    def raw_reward(self, node_id: str) -> float | None:
        """r(node) as assigned, None when no reward was given."""
        self.get(node_id)
        return self._rewards.get(node_id)

    def discounted_rewards(self, gamma: float, agg: str = "mean") -> dict[str, float]:
        """R(node) for every node, in insertion order (see the module docstring)."""
        return discount(self._children, self._rewards, gamma, agg)
