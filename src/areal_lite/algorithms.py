"""Trainer stage, pure core: groups of samples -> advantages -> decoupled-PPO loss.

No I/O, no model: rewards go in as tensors, per-token logprobs come from the learner.
Every variant is a function chosen once by name (STYLE rule 7)::

    adv_fn = make_advantage_fn(cfg)                          # ADVANTAGES[cfg.adv_estimator]
    advantages = adv_fn(*advantage_inputs(groups))           # one float per sample
    loss_fn = LOSSES[cfg.loss_agg]
    normalizer = loss_fn.normalizer(tokens_per_seq, max_len)  # once, over the WHOLE batch
    for mb in micro_batches:                                  # sum over mbs == full-batch loss
        loss, stats = loss_fn(mb.logprobs, mb.prox, mb.behav, mb.adv, mb.mask,
                              cfg=cfg, normalizer=normalizer)
        loss.backward()

Advantage definition (group g holds E_g episodes; episode e holds n_e samples, each
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
from dataclasses import dataclass
from typing import Annotated, Literal, NamedTuple

import msgspec
import torch
from torch import Tensor

from areal_lite.types import Sample

__all__ = [
    "ADVANTAGES",
    "AlgorithmConfig",
    "KL_ESTIMATORS",
    "LOSSES",
    "PolicyLoss",
    "advantage_inputs",
    "dr_grpo_advantages",
    "filter_groups",
    "grpo_advantages",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "make_advantage_fn",
    "overlong_penalty",
    "reinforce_advantages",
    "rloo_advantages",
    "token_advantages",
]


_NonNeg = Annotated[float, msgspec.Meta(ge=0)]


class AlgorithmConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The `algorithm` section: how rewards become advantages and logprobs a loss.

    Loss aggregation: token_mean = sum over loss tokens / loss tokens in the batch;
    seq_mean_token_sum (Dr.GRPO) = sum over loss tokens / (sequences x max_new_tokens);
    seq_mean_token_mean = mean over each sequence's tokens, then over sequences.
    Behaviour weight cap: tokens whose pi_prox/pi_behav exceeds it are masked out (loss 0,
    still counted in the normalizer).
    """

    adv_estimator: Literal["grpo", "dr_grpo", "rloo", "reinforce"] = "grpo"  # see module doc
    reinforce_baseline: bool = False  # reinforce only: subtract the batch mean episode reward
    loss_agg: Literal["token_mean", "seq_mean_token_sum", "seq_mean_token_mean"] = "token_mean"  # see above
    clip_eps_low: Annotated[float, msgspec.Meta(ge=0, lt=1)] = 0.2  # ratio clipped below at 1 - this
    clip_eps_high: _NonNeg = 0.2  # ... and above at 1 + this; 0.28 = DAPO clip-higher
    behav_imp_weight_cap: _NonNeg = 5.0  # max pi_prox/pi_behav per token (>= 1); 0 = no cap
    kl_coef: _NonNeg = 0.0  # weight of the KL penalty to a frozen reference; 0 = no reference
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"  # per-token estimator of KL(pi || ref)
    dynamic_filtering: bool = False  # drop groups whose rewards are all equal (DAPO)
    overlong_buffer_len: Annotated[int, msgspec.Meta(ge=0)] = 0  # tokens of soft overlong ramp; 0 = off
    overlong_penalty_factor: _NonNeg = 1.0  # penalty at the length limit, in reward units
    eps: Annotated[float, msgspec.Meta(gt=0)] = 1e-6  # added to the group std in grpo (reward units)


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


def advantage_inputs(groups: Sequence[Sequence[Sample]]) -> tuple[Tensor, Tensor, Tensor]:
    """Flatten groups into (rewards [N] float64, group_ids [N], episode_ids [N]).

    Samples are numbered in order, group by group. Samples of one group with the same
    `episode_id` form one episode; a sample with an empty `episode_id` is its own episode.
    """
    rewards: list[float] = []
    group_ids: list[int] = []
    episode_ids: list[int] = []
    for g, group in enumerate(groups):
        index: dict[str, int] = {}
        for i, s in enumerate(group):
            key = s.episode_id or f"\0{i}"  # NUL cannot start a session id
            episode_ids.append(index.setdefault(key, len(index)))
            rewards.append(s.reward)
            group_ids.append(g)
    return (torch.tensor(rewards, dtype=torch.float64), torch.tensor(group_ids, dtype=torch.long),
            torch.tensor(episode_ids, dtype=torch.long))


def token_advantages(advantages: Tensor, loss_mask: Tensor) -> Tensor:
    """Broadcast per-sample advantages [B] to tokens [B, T], 0 where loss_mask is 0."""
    return advantages[:, None] * loss_mask.to(advantages.dtype)


# ------------------------------------------------------------------ filtering, reward shaping

def filter_groups(groups: Sequence[Sequence[Sample]], *, atol: float = 0.0
                  ) -> tuple[list[list[Sample]], int]:
    """DAPO dynamic filtering: drop groups whose sample rewards are all equal (within atol).

    Such a group gets zero advantage for grpo, dr_grpo and rloo, so it would only
    dilute the batch. A one-sample group is trivially all-equal and is dropped. Returns
    (kept groups in order, number dropped).
    """
    kept = [list(g) for g in groups
            if g and max(s.reward for s in g) - min(s.reward for s in g) > atol]
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


# ----------------------------------------------------------------------------------- losses

def kl_k1(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """log pi - log ref: unbiased for KL(pi || ref) under pi samples, can be negative."""
    return logprobs - ref_logprobs


def kl_k2(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """0.5 (log pi - log ref)²: >= 0, low variance, biased."""
    return 0.5 * (logprobs - ref_logprobs).square()


def kl_k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """exp(ref - logp) - (ref - logp) - 1: >= 0 and unbiased (Schulman's k3)."""
    x = ref_logprobs - logprobs
    return (torch.expm1(x) - x).clamp_min(0.0)  # expm1: no cancellation near x = 0


KL_ESTIMATORS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


class _TokenTerms(NamedTuple):
    policy: Tensor  # [B, T] per-token policy loss, 0 off the mask and on capped tokens
    ratio: Tensor  # [B, T] pi / pi_prox (1 off the mask)
    clipped: Tensor  # [B, T] bool, the clipped branch is the active one
    weight: Tensor  # [B, T] pi_prox / pi_behav after capping (0 on capped tokens)
    capped: Tensor  # [B, T] bool, token masked out by the cap


def _decoupled_ppo(logprobs, prox, behav, adv, mask, cfg: AlgorithmConfig) -> _TokenTerms:
    """Per-token decoupled PPO-clip: -w * min(ratio A, clip(ratio) A) with w = pi_prox/pi_behav.

    Log-differences are zeroed off the mask *before* exp so padding can hold anything
    (even -inf) without producing inf or NaN in values or gradients.
    """
    adv = torch.where(mask, adv, 0.0)
    log_ratio = torch.where(mask, logprobs - prox.detach(), 0.0)
    ratio = torch.exp(log_ratio)
    clipped_ratio = ratio.clamp(1.0 - cfg.clip_eps_low, 1.0 + cfg.clip_eps_high)
    loss_unclipped, loss_clipped = -adv * ratio, -adv * clipped_ratio
    clipped = (loss_clipped > loss_unclipped) & mask
    policy = torch.maximum(loss_unclipped, loss_clipped)
    weight = torch.exp(torch.where(mask, prox - behav, 0.0)).detach()
    capped = (weight > cfg.behav_imp_weight_cap) & mask if cfg.behav_imp_weight_cap > 0 \
        else torch.zeros_like(mask)
    weight = torch.where(capped | ~mask, 0.0, weight)
    return _TokenTerms(policy * weight, ratio, clipped, weight, capped)


def _sum_tokens(values: Tensor, mask: Tensor) -> Tensor:
    return torch.where(mask, values, 0.0).sum()


def _sum_seq_token_means(values: Tensor, mask: Tensor) -> Tensor:
    per_seq = torch.where(mask, values, 0.0).sum(-1) / mask.sum(-1).clamp_min(1)
    return per_seq.sum()


def _count_tokens(tokens_per_seq: Tensor, max_len: int) -> float:
    return float(tokens_per_seq.sum())


def _count_seqs_times_len(tokens_per_seq: Tensor, max_len: int) -> float:
    if max_len < 1:
        raise ValueError(f"seq_mean_token_sum needs max_len >= 1 (rollout max_new_tokens), "
                         f"got {max_len}")
    return float((tokens_per_seq > 0).sum()) * max_len


def _count_seqs(tokens_per_seq: Tensor, max_len: int) -> float:
    return float((tokens_per_seq > 0).sum())


@dataclass(frozen=True)
class PolicyLoss:
    """Decoupled PPO-clip (+ optional KL) with one way of aggregating tokens.

    The loss of a micro-batch is `reduce(per-token loss) / normalizer`, where `reduce`
    is a plain sum over tokens (token_mean, seq_mean_token_sum) or over sequences of
    their token mean (seq_mean_token_mean), and `normalizer` comes from `normalizer()`
    over the whole batch. Hence summing micro-batch losses (and their gradients) gives
    exactly the full-batch loss, however the batch is split or padded. Each row is one
    sequence (seq_mean_token_mean takes the mean over a row): do not pack several
    sequences into one row for that aggregation.
    """

    name: str
    reduce: Callable[[Tensor, Tensor], Tensor]  # (values [B, T], bool mask [B, T]) -> scalar
    count: Callable[[Tensor, int], float]  # (loss tokens per sequence, max_len) -> normalizer

    def normalizer(self, tokens_per_seq: Sequence[int] | Tensor, max_len: int = 0) -> float:
        """Divisor for the whole batch: loss tokens (token_mean), sequences with a loss
        token x max_len (seq_mean_token_sum, max_len = max_new_tokens), or such sequences
        (seq_mean_token_mean). At least 1, so an empty batch gives loss 0, not NaN."""
        counts = torch.as_tensor(tokens_per_seq, dtype=torch.long).reshape(-1)
        return max(1.0, self.count(counts, max_len))

    def __call__(self, logprobs: Tensor, prox_logprobs: Tensor, behav_logprobs: Tensor,
                 advantages: Tensor, loss_mask: Tensor, *, cfg: AlgorithmConfig,
                 normalizer: float, ref_logprobs: Tensor | None = None,
                 entropy: Tensor | None = None) -> tuple[Tensor, dict[str, float]]:
        """Loss of one micro-batch; all tensors [B, T], aligned token for token.

        logprobs: current policy (with grad); prox_logprobs: proximal policy, recomputed
        before the update (pass behav_logprobs when not recomputed: synchronous PPO);
        behav_logprobs: what the engine sampled with; advantages: per token (see
        `token_advantages`); loss_mask: 1 on trained tokens; ref_logprobs: frozen
        reference, needed when cfg.kl_coef > 0; entropy: per token, only reported.
        Returns (loss scalar, stats). stats["loss"] and ["policy_loss"] / ["kl_loss"] are
        this micro-batch's share (they sum over micro-batches); the other stats are means
        over this micro-batch's loss tokens, with "num_tokens" to weight them.
        """
        if not normalizer > 0:
            raise ValueError(f"normalizer must be > 0 (use {self.name}.normalizer), got "
                             f"{normalizer}")
        mask = loss_mask.bool()
        terms = _decoupled_ppo(logprobs, prox_logprobs, behav_logprobs, advantages, mask, cfg)
        policy_loss = self.reduce(terms.policy, mask) / normalizer
        kl_loss, kl = self._kl(logprobs, ref_logprobs, mask, cfg, normalizer)
        loss = policy_loss + cfg.kl_coef * kl_loss if kl is not None else policy_loss
        return loss, _stats(loss, policy_loss, kl_loss, kl, terms, logprobs, prox_logprobs,
                            mask, entropy)

    def _kl(self, logprobs, ref_logprobs, mask, cfg, normalizer):
        if cfg.kl_coef == 0.0:
            return None, None
        if ref_logprobs is None:
            raise ValueError("algorithm.kl_coef > 0 needs ref_logprobs from a frozen "
                             "reference model (or set kl_coef = 0)")
        safe_logp = torch.where(mask, logprobs, 0.0)  # padding may hold -inf
        safe_ref = torch.where(mask, ref_logprobs.detach(), 0.0)
        kl = torch.where(mask, KL_ESTIMATORS[cfg.kl_estimator](safe_logp, safe_ref), 0.0)
        return self.reduce(kl, mask) / normalizer, kl


def _stats(loss, policy_loss, kl_loss, kl, terms: _TokenTerms, logprobs, prox, mask,
           entropy) -> dict[str, float]:
    """Floats for logging, gathered in one device sync."""
    with torch.no_grad():
        n = mask.sum().clamp_min(1).to(torch.float64)  # float32 division would blur stats
        log_ratio = torch.where(mask, logprobs - prox, 0.0)
        approx_kl = torch.expm1(log_ratio) - log_ratio  # k3 of KL(pi_prox || pi)
        values = {
            "loss": loss, "policy_loss": policy_loss,
            "clip_frac": terms.clipped.sum() / n,
            "ratio_mean": torch.where(mask, terms.ratio, 0.0).sum() / n,
            "approx_kl": torch.where(mask, approx_kl, 0.0).sum() / n,
            "behav_weight_mean": terms.weight.sum() / (mask & ~terms.capped).sum().clamp_min(1),
            "capped_frac": terms.capped.sum() / n,
            "num_tokens": mask.sum(),
        }
        if kl is not None:
            values["kl_loss"] = kl_loss
            values["kl"] = kl.sum() / n
        if entropy is not None:
            values["entropy"] = torch.where(mask, entropy, 0.0).sum() / n
        keys = list(values)
        floats = torch.stack([v.detach().to(torch.float64).reshape(()) for v in values.values()])
        return dict(zip(keys, floats.cpu().tolist(), strict=True))


LOSSES: dict[str, PolicyLoss] = {
    "token_mean": PolicyLoss("token_mean", _sum_tokens, _count_tokens),
    "seq_mean_token_sum": PolicyLoss("seq_mean_token_sum", _sum_tokens, _count_seqs_times_len),
    "seq_mean_token_mean": PolicyLoss("seq_mean_token_mean", _sum_seq_token_means, _count_seqs),
}
