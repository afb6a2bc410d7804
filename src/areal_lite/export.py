"""Export: cache -> **export** -> algorithms. Turns an episode's tree into training samples.

Three styles (DESIGN.md decision 4), chosen once by `rollout.agent.export_style`:

- `individual`: one sample per completion, `prompt + output`, trained on the output.
  Its reward is the completion's discounted reward R(node).
- `concat`: one sample per leaf, the whole root-to-leaf token path (which, by the
  prefix invariant, is `leaf.prompt_ids + leaf.output_ids`), trained on every span the
  policy sampled along the path. Its reward is R(leaf). A completion shared by several
  leaves is trained once — its loss mask is set only in the first leaf's sample that
  contains it — unless `train_shared_once=False`.
- `tree`: the samples of `concat` (one per leaf, each completion trained once), but
  every trained completion keeps its own reward: `Sample.spans` lists, in path order,
  each trained completion's token range with R(node) and its raw reward, exactly the
  rewards `individual` gives. The learner makes each span one advantage unit, so every
  token gets the advantage it would get as an individual sample, while each prefix is
  fed to the model once instead of once per later turn (a 3-turn chain: 1 sequence
  instead of 3). `Sample.reward` is R(leaf), as in `concat`.

Positions that were not sampled get loss_mask 0, logprob 0.0 and version -1. In
`concat`, a shared span whose mask was cleared keeps its logprobs and versions (they
are the true behaviour values; the mask alone decides what is trained).

Pure: no I/O, no `await`.
"""

from __future__ import annotations

from typing import Protocol

from areal_lite.cache import InteractionCache
from areal_lite.types import CompletionNode, Sample, Span

__all__ = [
    "EXPORTERS",
    "Exporter",
    "export_concat",
    "export_episode",
    "export_individual",
    "export_tree",
]


def _individual_sample(
    node: CompletionNode, reward: float, raw_reward: float, episode_id: str
) -> Sample:
    num_prompt = len(node.prompt_ids)
    return Sample(
        input_ids=node.prompt_ids + node.output_ids,
        loss_mask=[0] * num_prompt + [1] * len(node.output_ids),
        logprobs=[0.0] * num_prompt + list(node.logprobs),
        versions=[-1] * num_prompt + list(node.versions),
        reward=reward,
        raw_reward=raw_reward,
        episode_id=episode_id,
        completion_ids=[node.id],
        max_new_tokens=node.max_new_tokens,
    )


def export_individual(
    cache: InteractionCache,
    *,
    gamma: float,
    agg: str = "mean",
    episode_id: str = "",
    train_shared_once: bool = True,
) -> list[Sample]:
    """One sample per completion, in insertion order.

    `train_shared_once` has no effect (no tokens are shared between samples); it is
    accepted so every exporter in `EXPORTERS` takes the same arguments.
    """
    del train_shared_once
    returns = cache.discounted_rewards(gamma, agg)
    return [
        _individual_sample(n, returns[n.id], cache.raw_reward(n.id) or 0.0, episode_id)
        for n in cache.nodes
    ]


def _concat_sample(
    path: list[CompletionNode], trained: set[str] | None, reward: float, raw_reward: float,
    episode_id: str, spans: list[CompletionNode] | None = None,
) -> Sample:
    """One path's sample; `trained` (when given) holds ids already trained, and grows.
    `spans` (when given) receives the path's nodes whose tokens this sample trains."""
    leaf = path[-1]
    input_ids = leaf.prompt_ids + leaf.output_ids
    size = len(input_ids)
    loss_mask, logprobs, versions = [0] * size, [0.0] * size, [-1] * size
    for node in path:
        start, end = len(node.prompt_ids), len(node.prompt_ids) + len(node.output_ids)
        logprobs[start:end] = node.logprobs
        versions[start:end] = node.versions
        if trained is None or node.id not in trained:
            loss_mask[start:end] = [1] * (end - start)
            if trained is not None:
                trained.add(node.id)
            if spans is not None:
                spans.append(node)
    return Sample(
        input_ids=input_ids,
        loss_mask=loss_mask,
        logprobs=logprobs,
        versions=versions,
        reward=reward,
        raw_reward=raw_reward,
        episode_id=episode_id,
        completion_ids=[n.id for n in path],
        max_new_tokens=leaf.max_new_tokens,
    )


def export_concat(
    cache: InteractionCache,
    *,
    gamma: float,
    agg: str = "mean",
    episode_id: str = "",
    train_shared_once: bool = True,
) -> list[Sample]:
    """One sample per leaf (leaves in insertion order) covering its root-to-leaf path."""
    returns = cache.discounted_rewards(gamma, agg)
    trained: set[str] | None = set() if train_shared_once else None
    samples = []
    for leaf in cache.leaves():
        raw = cache.raw_reward(leaf.id) or 0.0
        samples.append(
            _concat_sample(cache.path(leaf.id), trained, returns[leaf.id], raw, episode_id)
        )
    return samples


def export_tree(
    cache: InteractionCache,
    *,
    gamma: float,
    agg: str = "mean",
    episode_id: str = "",
    train_shared_once: bool = True,
) -> list[Sample]:
    """`concat` samples whose `spans` keep each trained completion's own reward.

    With `train_shared_once=False` a shared completion is trained (and is a span, so an
    advantage unit) in every leaf's sample that contains it.
    """
    returns = cache.discounted_rewards(gamma, agg)
    trained: set[str] | None = set() if train_shared_once else None
    samples = []
    for leaf in cache.leaves():
        nodes: list[CompletionNode] = []
        sample = _concat_sample(cache.path(leaf.id), trained, returns[leaf.id],
                                cache.raw_reward(leaf.id) or 0.0, episode_id, nodes)
        sample.spans = [
            Span(start=len(n.prompt_ids), end=len(n.prompt_ids) + len(n.output_ids),
                 reward=returns[n.id], raw_reward=cache.raw_reward(n.id) or 0.0,
                 completion_id=n.id, max_new_tokens=n.max_new_tokens)
            for n in nodes]
        samples.append(sample)
    return samples


class Exporter(Protocol):
    """What every entry of `EXPORTERS` is: an episode's cache in, its samples out."""

    def __call__(
        self, cache: InteractionCache, *, gamma: float, agg: str = "mean",
        episode_id: str = "", train_shared_once: bool = True,
    ) -> list[Sample]: ...


EXPORTERS: dict[str, Exporter] = {
    "individual": export_individual,
    "concat": export_concat,
    "tree": export_tree,
}


def export_episode(
    cache: InteractionCache,
    *,
    style: str,
    gamma: float,
    agg: str = "mean",
    episode_id: str = "",
    train_shared_once: bool = True,
) -> list[Sample]:
    """Export one episode in the named style (`individual`, `concat` or `tree`)."""
    if style not in EXPORTERS:
        raise ValueError(
            f"rollout.agent.export_style must be one of {sorted(EXPORTERS)}, got {style!r}"
        )
    return EXPORTERS[style](
        cache, gamma=gamma, agg=agg, episode_id=episode_id,
        train_shared_once=train_shared_once,
    )
