"""Trainer stage, pure core: per-token logprobs + advantages -> decoupled-PPO loss (+ KL).

No I/O, no model: the learner passes [B, T] tensors aligned token for token. The
aggregation is chosen once by name, `loss_fn = LOSSES[cfg.loss_agg]`, and every
micro-batch loss is divided by one whole-batch `loss_fn.normalizer(...)`, so summing
micro-batch losses gives exactly the full-batch loss (see `PolicyLoss`). Advantages and
the `algorithm` config section live in `algorithms.py`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from areal_lite.train.algorithms import AlgorithmConfig

__all__ = [
    "KL_ESTIMATORS",
    "LOSSES",
    "PolicyLoss",
    "kl_k1",
    "kl_k2",
    "kl_k3",
]


# ------------------------------------------------------------------------------ KL penalty

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


def _sum_tokens(values: Tensor, mask: Tensor, unit_tokens: Tensor | None) -> Tensor:
    return torch.where(mask, values, 0.0).sum()


def _sum_seq_token_means(values: Tensor, mask: Tensor, unit_tokens: Tensor | None) -> Tensor:
    if unit_tokens is not None:  # a sequence = a unit (a row, or a tree sample's span)
        return torch.where(mask, values / unit_tokens.clamp_min(1), 0.0).sum()
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
    sequences into one row for that aggregation — unless `unit_tokens` says, per token,
    how many loss tokens its sequence has (the learner passes it: a `tree` sample's
    spans are sequences of their own, so the per-sequence aggregations count and
    average them exactly as the `individual` samples of the same completions; the
    normalizer then takes per-span token counts too).
    """

    name: str
    # (values [B, T], bool mask [B, T], unit_tokens [B, T] | None) -> scalar
    reduce: Callable[[Tensor, Tensor, Tensor | None], Tensor]
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
                 entropy: Tensor | None = None, unit_tokens: Tensor | None = None
                 ) -> tuple[Tensor, dict[str, float]]:
        """Loss of one micro-batch; all tensors [B, T], aligned token for token.

        logprobs: current policy (with grad); prox_logprobs: proximal policy, recomputed
        before the update (pass behav_logprobs when not recomputed: synchronous PPO);
        behav_logprobs: what the engine sampled with; advantages: per token (see
        `token_advantages`); loss_mask: 1 on trained tokens; ref_logprobs: frozen
        reference, needed when cfg.kl_coef > 0; entropy: per token, only reported;
        unit_tokens: per token, the loss tokens of the sequence it belongs to (None =
        each row is one sequence).
        Returns (loss scalar, stats). stats["loss"] and ["policy_loss"] / ["kl_loss"] are
        this micro-batch's share (they sum over micro-batches); the other stats are means
        over this micro-batch's loss tokens, with "num_tokens" to weight them.
        """
        if not normalizer > 0:
            raise ValueError(f"normalizer must be > 0 (use {self.name}.normalizer), got "
                             f"{normalizer}")
        mask = loss_mask.bool()
        terms = _decoupled_ppo(logprobs, prox_logprobs, behav_logprobs, advantages, mask, cfg)
        policy_loss = self.reduce(terms.policy, mask, unit_tokens) / normalizer
        kl_loss, kl = self._kl(logprobs, ref_logprobs, mask, cfg, normalizer, unit_tokens)
        loss = policy_loss + cfg.kl_coef * kl_loss if kl is not None else policy_loss
        return loss, _stats(loss, policy_loss, kl_loss, kl, terms, logprobs, prox_logprobs,
                            mask, entropy)

    def _kl(self, logprobs, ref_logprobs, mask, cfg, normalizer, unit_tokens):
        if cfg.kl_coef == 0.0:
            return None, None
        if ref_logprobs is None:
            raise ValueError("algorithm.kl_coef > 0 needs ref_logprobs from a frozen "
                             "reference model (or set kl_coef = 0)")
        safe_logp = torch.where(mask, logprobs, 0.0)  # padding may hold -inf
        safe_ref = torch.where(mask, ref_logprobs.detach(), 0.0)
        kl = torch.where(mask, KL_ESTIMATORS[cfg.kl_estimator](safe_logp, safe_ref), 0.0)
        return self.reduce(kl, mask, unit_tokens) / normalizer, kl


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
