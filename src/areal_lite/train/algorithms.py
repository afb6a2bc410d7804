"""Trainer stage, pure core: groups of samples -> advantages (-> the loss, in `losses.py`).

No I/O, no model: rewards go in as tensors, per-token logprobs come from the learner.
This module owns the `algorithm` config section, advantages, group filtering and reward
shaping. Every variant is a function chosen once by name (STYLE rule 7)::

    adv_fn = make_advantage_fn(cfg)                          # ADVANTAGES[cfg.adv_estimator]
    advantages = adv_fn(*advantage_inputs(groups))           # one float per unit
    per_token = sample_token_advantages(samples, advantages)  # [L_i] per sample
    loss_fn = LOSSES[cfg.loss_agg]                           # losses.py
    normalizer = loss_fn.normalizer(tokens_per_seq, max_len)  # once, over the WHOLE batch
    for mb in micro_batches:                                  # sum over mbs == full-batch loss
        loss, stats = loss_fn(mb.logprobs, mb.prox, mb.behav, mb.adv, mb.mask,
                              cfg=cfg, normalizer=normalizer)
        loss.backward()

Units: a sample is one unit with its `reward`, except a `tree` sample (export.py), which
is one unit per `Span`, each with the span's own reward. Estimators and filtering see
units only, so a tree export gets exactly the advantages an individual export of the same
episodes gets; `sample_token_advantages` then gives each span's tokens its unit's value.

Advantage definition (group g holds E_g episodes; episode e holds n_e units, each
with its own, possibly turn-discounted, reward r_i)::

    R_e  = mean_{i in e} r_i                                episode reward
    m_g  = mean_{e in g} R_e                                group baseline
    s_g² = sum_{e in g} mean_{i in e} (r_i - m_g)² / (E_g - 1)   group spread
    grpo: (r_i - m_g) / (s_g + eps)    dr_grpo: r_i - m_g
    rloo: r_i - (E_g m_g - R_e) / (E_g - 1)     (mean of the OTHER episodes)
    reinforce: r_i   (or r_i - mean over all episodes of R_e)

Why: the episode, not the sample, is the unit that was drawn independently, so every
statistic weighs each episode once, whatever number of samples an individual export of
a multi-turn episode produced (repeating all of an episode's samples k times changes
nothing). Each sample still keeps its own reward in the numerator, so discounted early
turns are credited less than the final one. The spread pools within-episode deviations:
it is 0 only when every sample of the group has the same reward (then every numerator
is 0 too), so a group whose episodes all end equally but whose turns are discounted is
never divided by a near-zero std. With one sample per episode these are exactly the
textbook GRPO mean and Bessel-corrected `torch.std`. A group with a single episode has
no peer to compare with: its advantages are 0 for grpo, dr_grpo and rloo.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from areal_lite.config import AlgorithmConfig
from areal_lite.types import Sample

__all__ = [
    "ADVANTAGES",
    "advantage_inputs",
    "dr_grpo_advantages",
    "filter_groups",
    "grpo_advantages",
    "make_advantage_fn",
    "overlong_penalty",
    "reinforce_advantages",
    "rloo_advantages",
    "sample_token_advantages",
    "token_advantages",
    "unit_rewards",
    "unit_token_counts",
]




# ----------------------------------------------------------------------------- advantages

class _GroupStats(NamedTuple):
    reward: Tensor  # [N] float64, one per sample
    episode: Tensor  # [N] dense episode index of each sample
    episode_group: Tensor  # [E] dense group index of each episode
    episode_mean: Tensor  # [E] R_e
    group_mean: Tensor  # [G] m_g
    num_episodes: Tensor  # [G] E_g


def _segment_mean(values: Tensor, index: Tensor, size: int) -> Tensor:
    sums = torch.zeros(size, dtype=values.dtype).index_add_(0, index, values)
    return sums / torch.bincount(index, minlength=size).to(values.dtype)


def _group_stats(rewards, group_ids, episode_ids) -> _GroupStats:
    r = torch.as_tensor(rewards, dtype=torch.float64).cpu()
    g = torch.as_tensor(group_ids, dtype=torch.long).cpu()
    e = torch.as_tensor(episode_ids, dtype=torch.long).cpu()
    if not (r.dim() == g.dim() == e.dim() == 1 and len(r) == len(g) == len(e)):
        raise ValueError(f"rewards, group_ids and episode_ids must be 1-D of one length, got "
                         f"shapes {tuple(r.shape)}, {tuple(g.shape)}, {tuple(e.shape)}")
    pairs, episode = torch.unique(torch.stack([g, e], dim=1), dim=0, return_inverse=True)
    groups, episode_group = torch.unique(pairs[:, 0], return_inverse=True)
    episode_mean = _segment_mean(r, episode, len(pairs))
    group_mean = _segment_mean(episode_mean, episode_group, len(groups))
    num_episodes = torch.bincount(episode_group, minlength=len(groups))
    return _GroupStats(r, episode, episode_group, episode_mean, group_mean, num_episodes)


def _out_dtype(rewards) -> torch.dtype:
    dtype = getattr(rewards, "dtype", None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def _centered(st: _GroupStats) -> tuple[Tensor, Tensor]:
    """r_i - m_g per sample, and whether the sample's group has >= 2 episodes."""
    sample_group = st.episode_group[st.episode]
    return st.reward - st.group_mean[sample_group], st.num_episodes[sample_group] >= 2


def grpo_advantages(rewards, group_ids, episode_ids, *, eps: float = 1e-6) -> Tensor:
    """(r_i - m_g) / (s_g + eps) per sample; 0 in single-episode groups (module doc)."""
    if len(rewards) == 0:
        return torch.zeros(0, dtype=_out_dtype(rewards))
    st = _group_stats(rewards, group_ids, episode_ids)
    centered, has_peers = _centered(st)
    sq_dev = _segment_mean(centered.square(), st.episode, len(st.episode_mean))
    spread = torch.zeros_like(st.group_mean).index_add_(0, st.episode_group, sq_dev)
    std = (spread / (st.num_episodes - 1).clamp_min(1)).sqrt()
    adv = centered / (std[st.episode_group[st.episode]] + eps)
    return torch.where(has_peers, adv, 0.0).to(_out_dtype(rewards))


def dr_grpo_advantages(rewards, group_ids, episode_ids, *, eps: float = 1e-6) -> Tensor:
    """r_i - m_g per sample (no std scaling); 0 in single-episode groups. `eps` unused."""
    if len(rewards) == 0:
        return torch.zeros(0, dtype=_out_dtype(rewards))
    centered, has_peers = _centered(_group_stats(rewards, group_ids, episode_ids))
    return torch.where(has_peers, centered, 0.0).to(_out_dtype(rewards))


def rloo_advantages(rewards, group_ids, episode_ids, *, eps: float = 1e-6) -> Tensor:
    """r_i minus the mean reward of the other episodes of its group; 0 when there are none."""
    if len(rewards) == 0:
        return torch.zeros(0, dtype=_out_dtype(rewards))
    st = _group_stats(rewards, group_ids, episode_ids)
    n = st.num_episodes.to(torch.float64)
    others = (n[st.episode_group] * st.group_mean[st.episode_group] - st.episode_mean)
    baseline = others / (n[st.episode_group] - 1).clamp_min(1)
    adv = st.reward - baseline[st.episode]
    has_peers = st.num_episodes[st.episode_group[st.episode]] >= 2
    return torch.where(has_peers, adv, 0.0).to(_out_dtype(rewards))


def reinforce_advantages(rewards, group_ids, episode_ids, *, eps: float = 1e-6,
                         baseline: bool = False) -> Tensor:
    """r_i, or with `baseline` r_i minus the mean over all episodes of R_e. Groups unused."""
    if len(rewards) == 0 or not baseline:
        return torch.as_tensor(rewards, dtype=_out_dtype(rewards)).clone()
    st = _group_stats(rewards, group_ids, episode_ids)
    return (st.reward - st.episode_mean.mean()).to(_out_dtype(rewards))


AdvantageFn = Callable[..., Tensor]  # (rewards [N], group_ids [N], episode_ids [N]) -> [N]

ADVANTAGES: dict[str, AdvantageFn] = {
    "grpo": grpo_advantages,
    "dr_grpo": dr_grpo_advantages,
    "rloo": rloo_advantages,
    "reinforce": reinforce_advantages,
}


def make_advantage_fn(cfg: AlgorithmConfig) -> AdvantageFn:
    """ADVANTAGES[cfg.adv_estimator] with the config's knobs bound."""
    fn = functools.partial(ADVANTAGES[cfg.adv_estimator], eps=cfg.eps)
    if cfg.adv_estimator == "reinforce":
        fn = functools.partial(fn, baseline=cfg.reinforce_baseline)
    return fn


def unit_rewards(sample: Sample) -> list[float]:
    """The rewards of a sample's advantage units: one per span, or its own reward."""
    return [sp.reward for sp in sample.spans] if sample.spans else [sample.reward]


def advantage_inputs(groups: Sequence[Sequence[Sample]]) -> tuple[Tensor, Tensor, Tensor]:
    """Flatten groups into units: (rewards [U] float64, group_ids [U], episode_ids [U]).

    Units are numbered in order, group by group, sample by sample, span by span (the
    order `sample_token_advantages` reads them in). Units of one group whose samples have
    the same `episode_id` form one episode; a sample with an empty `episode_id` is its
    own episode.
    """
    rewards: list[float] = []
    group_ids: list[int] = []
    episode_ids: list[int] = []
    for g, group in enumerate(groups):
        index: dict[str, int] = {}
        for i, s in enumerate(group):
            key = s.episode_id or f"\0{i}"  # NUL cannot start a session id
            episode = index.setdefault(key, len(index))
            for r in unit_rewards(s):
                episode_ids.append(episode)
                rewards.append(r)
                group_ids.append(g)
    return (torch.tensor(rewards, dtype=torch.float64), torch.tensor(group_ids, dtype=torch.long),
            torch.tensor(episode_ids, dtype=torch.long))


def sample_token_advantages(samples: Sequence[Sample], advantages: Tensor) -> list[Tensor]:
    """Per-token advantages [L_i] of each sample from per-unit advantages [U].

    `advantages` is in `advantage_inputs` order over the same samples. A sample without
    spans gets its unit's value on every loss-mask token; a tree sample gets each span's
    value on that span's loss-mask tokens. 0 wherever loss_mask is 0.
    """
    num_units = sum(len(s.spans) or 1 for s in samples)
    if num_units != len(advantages):
        raise ValueError(f"{len(advantages)} advantages for {num_units} units: pass the "
                         f"advantages of advantage_inputs over these same samples")
    out: list[Tensor] = []
    k = 0
    for s in samples:
        mask = torch.tensor(s.loss_mask, dtype=advantages.dtype)
        if not s.spans:
            out.append(advantages[k] * mask)
            k += 1
            continue
        adv = torch.zeros(len(s.loss_mask), dtype=advantages.dtype)
        for sp in s.spans:
            if not 0 <= sp.start <= sp.end <= len(adv):
                raise ValueError(f"span {sp.completion_id!r} [{sp.start}, {sp.end}) lies "
                                 f"outside its sample's {len(adv)} tokens (check the export)")
            adv[sp.start:sp.end] = advantages[k]
            k += 1
        out.append(adv * mask)
    return out


def unit_token_counts(sample: Sample, loss_mask: Tensor) -> tuple[list[int], Tensor]:
    """Loss tokens of each of a sample's units, and per token [L] those of its unit (1
    outside spans). `loss_mask` is the mask as trained (the learner clears position 0)."""
    if not sample.spans:
        n = int(loss_mask.sum())
        return [n], torch.full((len(loss_mask),), n, dtype=torch.long)
    counts, per_token = [], torch.ones(len(loss_mask), dtype=torch.long)
    for sp in sample.spans:
        n = int(loss_mask[sp.start:sp.end].sum())
        counts.append(n)
        per_token[sp.start:sp.end] = n
    return counts, per_token


def token_advantages(advantages: Tensor, loss_mask: Tensor) -> Tensor:
    """Broadcast per-sample advantages [B] to tokens [B, T], 0 where loss_mask is 0."""
    return advantages[:, None] * loss_mask.to(advantages.dtype)


# ------------------------------------------------------------------ filtering, reward shaping

def filter_groups(groups: Sequence[Sequence[Sample]], *, atol: float = 0.0
                  ) -> tuple[list[list[Sample]], int]:
    """DAPO dynamic filtering: drop groups whose unit rewards are all equal (within atol).

    Such a group gets zero advantage for grpo, dr_grpo and rloo, so it would only
    dilute the batch. A one-unit group is trivially all-equal and is dropped. Units are
    samples, or the spans of tree samples (`unit_rewards`). Returns (kept groups in
    order, number dropped).
    """
    def spread(group: Sequence[Sample]) -> float:
        rewards = [r for s in group for r in unit_rewards(s)]
        return max(rewards) - min(rewards) if rewards else 0.0

    kept = [list(g) for g in groups if g and spread(g) > atol]
    return kept, len(groups) - len(kept)


def overlong_penalty(response_len: int, max_len: int, buffer_len: int,
                     penalty_factor: float = 1.0) -> float:
    """DAPO soft overlong punishment, added to the reward (<= 0, reward units).

    0 up to `max_len - buffer_len` tokens, then a linear ramp down to `-penalty_factor`
    at `max_len`, and `-penalty_factor` beyond. `buffer_len == 0` turns it off (0.0).
    """
    if buffer_len == 0:
        return 0.0
    if not 0 < buffer_len <= max_len:
        raise ValueError(f"algorithm.overlong_buffer_len must be in [0, max_len={max_len}], "
                         f"got {buffer_len} (config.toml)")
    expected = max_len - buffer_len
    if response_len <= expected:
        return 0.0
    return -penalty_factor * min(1.0, (response_len - expected) / buffer_len)
