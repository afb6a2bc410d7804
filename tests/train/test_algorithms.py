"""Tests for algorithms.py: hand-computed advantages and losses, property tests against
slow reference implementations, and micro-batch (gradient accumulation) invariance."""

from __future__ import annotations

import math

import msgspec
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import caches

from areal_lite.export import export_episode
from areal_lite.train import algorithms as alg
from areal_lite.train.algorithms import (
    ADVANTAGES,
    AlgorithmConfig,
    advantage_inputs,
    filter_groups,
    make_advantage_fn,
    overlong_penalty,
    sample_token_advantages,
    token_advantages,
    unit_rewards,
)
from areal_lite.train.losses import KL_ESTIMATORS, LOSSES
from areal_lite.types import Sample, Span

torch.set_num_threads(1)
F64 = torch.float64


def t(x) -> torch.Tensor:
    return torch.tensor(x, dtype=F64)


def approx(x, **kw):
    return pytest.approx(x, rel=1e-9, abs=1e-12, **kw)


# ------------------------------------------------------------------- hand-computed advantages

# group 0: three one-sample episodes [1, 0, 0]; group 1: [2, 4]; group 2: one episode [5]
REWARDS = [1.0, 0.0, 0.0, 2.0, 4.0, 5.0]
GROUPS = [0, 0, 0, 1, 1, 2]
EPISODES = [0, 1, 2, 0, 1, 0]


def test_grpo_hand_computed():
    # group 0: mean 1/3, Bessel std sqrt((4/9 + 1/9 + 1/9) / 2) = 1/sqrt(3)
    # group 1: mean 3, std sqrt(2); group 2: single episode -> 0
    s3, s2 = math.sqrt(3), math.sqrt(2)
    expected = [2 / s3, -1 / s3, -1 / s3, -1 / s2, 1 / s2, 0.0]
    got = ADVANTAGES["grpo"](t(REWARDS), GROUPS, EPISODES, eps=1e-12)
    assert got.tolist() == approx(expected)
    assert got.dtype == F64


def test_dr_grpo_hand_computed():
    got = ADVANTAGES["dr_grpo"](t(REWARDS), GROUPS, EPISODES)
    assert got.tolist() == approx([2 / 3, -1 / 3, -1 / 3, -1.0, 1.0, 0.0])


def test_rloo_hand_computed():
    # r0 = 1 vs mean(0, 0) = 0; r1 = 0 vs mean(1, 0) = 0.5; group 1: 2 - 4, 4 - 2
    got = ADVANTAGES["rloo"](t(REWARDS), GROUPS, EPISODES)
    assert got.tolist() == approx([1.0, -0.5, -0.5, -2.0, 2.0, 0.0])


def test_reinforce_hand_computed():
    assert ADVANTAGES["reinforce"](t(REWARDS), GROUPS, EPISODES).tolist() == REWARDS
    # episode-weighted global mean = 12 / 6 = 2
    got = alg.reinforce_advantages(t(REWARDS), GROUPS, EPISODES, baseline=True)
    assert got.tolist() == approx([-1.0, -2.0, -2.0, 0.0, 2.0, 3.0])


def test_multi_sample_episode_hand_computed():
    # episode A has two (discounted) samples [0.5, 1.0], episode B one sample [0.0]
    # R_A = 0.75, R_B = 0, m = 0.375; spread = mean(0.125², 0.625²) + 0.375² = 0.34375
    rewards, groups, episodes = t([0.5, 1.0, 0.0]), [7, 7, 7], [3, 3, 9]
    dr = [0.125, 0.625, -0.375]
    assert ADVANTAGES["dr_grpo"](rewards, groups, episodes).tolist() == approx(dr)
    std = math.sqrt(0.34375)
    got = ADVANTAGES["grpo"](rewards, groups, episodes, eps=1e-12)
    assert got.tolist() == approx([d / std for d in dr])
    assert ADVANTAGES["rloo"](rewards, groups, episodes).tolist() == approx([0.5, 1.0, -0.75])


def test_single_episode_group_is_zero_even_with_differing_samples():
    for name in ("grpo", "dr_grpo", "rloo"):
        got = ADVANTAGES[name](t([0.2, 1.0, 3.0]), [0, 0, 1], [0, 0, 0])
        assert got.tolist() == [0.0, 0.0, 0.0], name


def test_empty_and_float32_inputs():
    for fn in ADVANTAGES.values():
        assert fn(torch.zeros(0), [], []).shape == (0,)
    got = ADVANTAGES["grpo"]([1.0, 0.0], [0, 0], [0, 1])
    assert got.dtype == torch.float32
    with pytest.raises(ValueError, match="one length"):
        ADVANTAGES["grpo"](t([1.0, 0.0]), [0], [0, 1])


def test_make_advantage_fn_binds_config():
    rewards, groups, episodes = t([1.0, 3.0]), [0, 1], [0, 0]
    fn = make_advantage_fn(AlgorithmConfig(adv_estimator="reinforce", reinforce_baseline=True))
    assert fn(rewards, groups, episodes).tolist() == [-1.0, 1.0]
    fn = make_advantage_fn(AlgorithmConfig(adv_estimator="grpo", eps=0.5))
    assert fn(t([1.0, 0.0]), [0, 0], [0, 1]).tolist() == approx(
        [0.5 / (math.sqrt(0.5) + 0.5), -0.5 / (math.sqrt(0.5) + 0.5)])


def _sample(reward: float, episode_id: str = "", n_tokens: int = 2) -> Sample:
    return Sample(input_ids=[1] * n_tokens, loss_mask=[1] * n_tokens,
                  logprobs=[0.0] * n_tokens, versions=[0] * n_tokens, reward=reward,
                  raw_reward=reward, episode_id=episode_id)


def test_advantage_inputs_numbers_episodes_per_group():
    groups = [[_sample(1.0, "a"), _sample(0.5, "b"), _sample(0.25, "a")],
              [_sample(2.0), _sample(3.0)]]
    rewards, group_ids, episode_ids = advantage_inputs(groups)
    assert rewards.tolist() == [1.0, 0.5, 0.25, 2.0, 3.0]
    assert group_ids.tolist() == [0, 0, 0, 1, 1]
    assert episode_ids.tolist() == [0, 1, 0, 0, 1]  # "" -> each sample its own episode


# ------------------------------------------------------------ advantage property tests

def _reference(name: str, rewards, groups, episodes, eps: float) -> list[float]:
    """Slow, dictionary-based transcription of the module docstring's definitions."""
    by_ep: dict[tuple, list[float]] = {}
    for r, g, e in zip(rewards, groups, episodes, strict=True):
        by_ep.setdefault((g, e), []).append(r)
    ep_mean = {k: sum(v) / len(v) for k, v in by_ep.items()}
    out = []
    for r, g, e in zip(rewards, groups, episodes, strict=True):
        peers = [k for k in by_ep if k[0] == g]
        n = len(peers)
        if name == "reinforce":
            out.append(r)
            continue
        if n < 2:
            out.append(0.0)
            continue
        m = sum(ep_mean[k] for k in peers) / n
        if name == "dr_grpo":
            out.append(r - m)
        elif name == "rloo":
            out.append(r - sum(ep_mean[k] for k in peers if k != (g, e)) / (n - 1))
        else:
            spread = sum(sum((x - m) ** 2 for x in by_ep[k]) / len(by_ep[k]) for k in peers)
            out.append((r - m) / (math.sqrt(spread / (n - 1)) + eps))
    return out


reward_values = st.one_of(st.sampled_from([0.0, 0.5, 1.0, -1.0]),
                          st.integers(-40, 40).map(lambda i: i / 8))
# groups -> episodes -> sample rewards
batches = st.lists(st.lists(st.lists(reward_values, min_size=1, max_size=3),
                            min_size=1, max_size=4), min_size=1, max_size=4)


def _flatten(batch, episode_offset: int = 5):
    rewards, groups, episodes = [], [], []
    for g, group in enumerate(batch):
        for e, samples in enumerate(group):
            for r in samples:
                rewards.append(r)
                groups.append(10 * g + 3)  # arbitrary, non-contiguous ids
                episodes.append(episode_offset + 2 * e)
    return rewards, groups, episodes


@settings(max_examples=60, deadline=None)
@given(batch=batches, name=st.sampled_from(sorted(ADVANTAGES)), perm_seed=st.integers(0, 99))
def test_advantages_match_reference_in_any_order(batch, name, perm_seed):
    rewards, groups, episodes = _flatten(batch)
    perm = torch.randperm(len(rewards), generator=torch.Generator().manual_seed(perm_seed))
    shuffled = [[x[i] for i in perm.tolist()] for x in (rewards, groups, episodes)]
    got = ADVANTAGES[name](t(shuffled[0]), shuffled[1], shuffled[2], eps=1e-6)
    assert got.tolist() == pytest.approx(_reference(name, *shuffled, eps=1e-6), abs=1e-9)


@settings(max_examples=60, deadline=None)
@given(batch=batches, name=st.sampled_from(sorted(ADVANTAGES)), data=st.data())
def test_duplicating_an_episodes_samples_changes_nothing(batch, name, data):
    g = data.draw(st.integers(0, len(batch) - 1))
    e = data.draw(st.integers(0, len(batch[g]) - 1))
    k = data.draw(st.integers(2, 5))
    rewards, groups, episodes = _flatten(batch)
    before = ADVANTAGES[name](t(rewards), groups, episodes)
    grown = [list(group) for group in batch]
    grown[g][e] = batch[g][e] * k  # the episode's samples, repeated k times
    r2, g2, e2 = _flatten(grown)
    after = ADVANTAGES[name](t(r2), g2, e2)
    # map each sample of the grown batch back to its original sample
    index, orig = [], 0
    for gi, group in enumerate(grown):
        for ei, samples in enumerate(group):
            n0 = len(batch[gi][ei])
            index += [orig + (j % n0) for j in range(len(samples))]
            orig += n0
    assert after.tolist() == pytest.approx(before[index].tolist(), abs=1e-9)


@settings(max_examples=60, deadline=None)
@given(batch=batches, name=st.sampled_from(["grpo", "dr_grpo", "rloo"]), data=st.data(),
       shift=st.integers(-100, 100).map(lambda i: i / 4))
def test_group_estimators_are_translation_invariant(batch, name, data, shift):
    g = data.draw(st.integers(0, len(batch) - 1))
    rewards, groups, episodes = _flatten(batch)
    shifted = [r + shift if gid == 10 * g + 3 else r for r, gid in zip(rewards, groups)]
    before = ADVANTAGES[name](t(rewards), groups, episodes)
    after = ADVANTAGES[name](t(shifted), groups, episodes)
    assert after.tolist() == pytest.approx(before.tolist(), abs=1e-7)


@settings(max_examples=60, deadline=None)
@given(batch=batches, data=st.data(), scale=st.floats(0.1, 10.0))
def test_grpo_is_scale_invariant(batch, data, scale):
    g = data.draw(st.integers(0, len(batch) - 1))
    rewards, groups, episodes = _flatten(batch)
    scaled = [r * scale if gid == 10 * g + 3 else r for r, gid in zip(rewards, groups)]
    before = ADVANTAGES["grpo"](t(rewards), groups, episodes, eps=1e-12)
    after = ADVANTAGES["grpo"](t(scaled), groups, episodes, eps=1e-12)
    assert after.tolist() == pytest.approx(before.tolist(), rel=1e-8, abs=1e-8)


def test_token_advantages_broadcasts_over_mask():
    mask = torch.tensor([[0, 1, 1], [1, 0, 0]])
    assert token_advantages(t([2.0, -1.0]), mask).tolist() == [[0, 2, 2], [-1, 0, 0]]


# -------------------------------------------------------- filtering and overlong penalty

def test_filter_groups_drops_all_equal_groups():
    keep1 = [_sample(1.0, "a"), _sample(0.0, "b")]
    keep2 = [_sample(0.9, "a"), _sample(1.0, "a")]  # one episode, discounted turns
    drop1 = [_sample(1.0, "a"), _sample(1.0, "b"), _sample(1.0, "c")]
    drop2 = [_sample(0.0, "x")]
    kept, dropped = filter_groups([drop1, keep1, drop2, keep2, []])
    assert kept == [keep1, keep2]
    assert dropped == 3
    kept, dropped = filter_groups([keep1, keep2], atol=0.5)
    assert kept == [keep1] and dropped == 1


def _tree_sample(*rewards: float, episode: str = "a") -> Sample:
    """A 2-token-per-span tree sample (prompt token, then one span per reward)."""
    n = 1 + 2 * len(rewards)
    spans = [Span(start=1 + 2 * k, end=3 + 2 * k, reward=r, raw_reward=r,
                  completion_id=f"c{k}") for k, r in enumerate(rewards)]
    return Sample(input_ids=list(range(n)), loss_mask=[0] + [1] * (n - 1),
                  logprobs=[0.0] * n, versions=[-1] + [0] * (n - 1), reward=rewards[-1],
                  raw_reward=rewards[-1], episode_id=episode, spans=spans)


def test_tree_samples_are_one_unit_per_span():
    """A tree sample counts once per span in advantages and filtering; each span's
    tokens get that span's advantage."""
    tree = [_tree_sample(0.5, 1.0, episode="a"), _tree_sample(0.0, episode="b")]
    assert unit_rewards(tree[0]) == [0.5, 1.0] and unit_rewards(_sample(0.3, "x")) == [0.3]
    rewards, groups, episodes = advantage_inputs([tree])
    assert rewards.tolist() == [0.5, 1.0, 0.0] and episodes.tolist() == [0, 0, 1]
    assert groups.tolist() == [0, 0, 0]
    adv = t([1.0, 2.0, 3.0])
    per_token = sample_token_advantages(tree, adv)
    assert [x.tolist() for x in per_token] == [[0, 1, 1, 2, 2], [0, 3, 3]]
    with pytest.raises(ValueError, match="advantages for 3 units"):
        sample_token_advantages(tree, adv[:2])
    # equal sample rewards but differing span rewards: kept (and the converse dropped)
    kept, dropped = filter_groups([[_tree_sample(0.5, 1.0), _tree_sample(1.0, episode="b")],
                                   [_tree_sample(1.0, 1.0), _tree_sample(1.0, episode="b")]])
    assert len(kept) == 1 and len(kept[0][0].spans) == 2 and dropped == 1


@settings(max_examples=60, deadline=None)
@given(st.lists(caches(max_nodes=6), min_size=1, max_size=4), st.floats(0, 1),
       st.sampled_from(sorted(ADVANTAGES)))
def test_tree_gives_individual_per_token_advantages(episodes, gamma, name):
    """A group of episodes exported as `tree` and as `individual`: every completion's
    tokens get the same advantage either way."""
    fn = make_advantage_fn(AlgorithmConfig(adv_estimator=name, reinforce_baseline=True))
    per_style = {}
    for style in ("individual", "tree"):
        group = [s for k, c in enumerate(episodes)
                 for s in export_episode(c, style=style, gamma=gamma, episode_id=f"e{k}")]
        per_token = sample_token_advantages(group, fn(*advantage_inputs([group])))
        per_style[style] = (group, per_token)
    ind, ind_adv = per_style["individual"]
    by_completion = {(s.episode_id, s.completion_ids[0]): (s, a) for s, a in zip(ind, ind_adv)}
    num_spans = 0
    for s, adv in zip(*per_style["tree"]):
        for sp in s.spans:
            num_spans += 1
            ind_sample, ind_tokens = by_completion[(s.episode_id, sp.completion_id)]
            start = len(ind_sample.input_ids) - (sp.end - sp.start)
            torch.testing.assert_close(adv[sp.start:sp.end], ind_tokens[start:],
                                       rtol=1e-12, atol=1e-12)
        assert not adv[[m == 0 for m in s.loss_mask]].any()
    assert num_spans == len(ind)


def test_overlong_penalty_dapo_ramp():
    # max 100, buffer 20: free up to 80 tokens, linear to -factor at 100
    assert overlong_penalty(50, 100, 20, 1.0) == 0.0
    assert overlong_penalty(80, 100, 20, 1.0) == 0.0
    assert overlong_penalty(90, 100, 20, 1.0) == approx(-0.5)
    assert overlong_penalty(95, 100, 20, 2.0) == approx(-1.5)
    assert overlong_penalty(100, 100, 20, 1.0) == approx(-1.0)
    assert overlong_penalty(130, 100, 20, 0.5) == approx(-0.5)
    assert overlong_penalty(500, 100, 0, 1.0) == 0.0  # buffer 0 = off
    with pytest.raises(ValueError, match="overlong_buffer_len"):
        overlong_penalty(10, 100, 101, 1.0)


# -------------------------------------------------------------------------------- config

def test_config_defaults_and_validation():
    cfg = msgspec.convert({}, AlgorithmConfig)
    assert (cfg.adv_estimator, cfg.loss_agg, cfg.clip_eps_high, cfg.kl_estimator) == (
        "grpo", "token_mean", 0.2, "k3")
    cfg = msgspec.toml.decode(b"clip_eps_high = 0.28\nadv_estimator = 'rloo'\n",
                              type=AlgorithmConfig)
    assert cfg.clip_eps_high == 0.28 and cfg.adv_estimator == "rloo"
    for bad in ({"clip_eps_low": 1.5}, {"behav_imp_weight_cap": -0.5}, {"eps": 0.0},
                {"kl_coef": -1.0}, {"adv_estimator": "ppo"}, {"clip_eps": 0.2}):
        with pytest.raises(msgspec.ValidationError):
            msgspec.convert(bad, AlgorithmConfig)
    with pytest.raises(msgspec.ValidationError, match="clip_eps_low"):
        msgspec.convert({"clip_eps_low": 1.5}, AlgorithmConfig)


def test_all_is_sorted_and_complete():
    assert alg.__all__ == sorted(alg.__all__)
    assert all(hasattr(alg, name) for name in alg.__all__)


# ----------------------------------------------------------------- hand-computed losses

def _leaf(x) -> torch.Tensor:
    return t(x).requires_grad_(True)


def test_ppo_clip_hand_computed():
    # prox = behav = 0, eps 0.2: ratios 1.5 (A=1, clipped to 1.2), 0.5 (A=-1, clipped to
    # 0.8), 1.0 (A=2): per-token losses -1.2, 0.8, -2 -> token mean -2.4 / 3 = -0.8
    logp = _leaf([[math.log(1.5), math.log(0.5), 0.0]])
    zeros = torch.zeros(1, 3, dtype=F64)
    adv, mask = t([[1.0, -1.0, 2.0]]), torch.ones(1, 3)
    loss_fn = LOSSES["token_mean"]
    norm = loss_fn.normalizer([3])
    loss, stats = loss_fn(logp, zeros, zeros, adv, mask, cfg=AlgorithmConfig(), normalizer=norm)
    assert loss.item() == approx(-0.8)
    loss.backward()
    assert logp.grad[0].tolist() == approx([0.0, 0.0, -2 / 3])  # clipped tokens: no gradient
    assert stats["clip_frac"] == approx(2 / 3)
    assert stats["ratio_mean"] == approx(1.0)
    assert stats["num_tokens"] == 3.0 and stats["capped_frac"] == 0.0
    # approx_kl = mean(r - 1 - log r) over tokens
    expected_kl = (0.5 - math.log(1.5) + (-0.5 - math.log(0.5))) / 3
    assert stats["approx_kl"] == approx(expected_kl)


def test_decoupled_weight_cap_masks_tokens_above_it():
    # ratio 1, A = 1; behaviour weights pi_prox/pi_behav = 2 and 4 -> losses -2, -4
    prox = t([[0.3, -0.7]])
    behav = prox - t([[math.log(2.0), math.log(4.0)]])
    adv, mask = t([[1.0, 1.0]]), torch.ones(1, 2)
    loss_fn = LOSSES["token_mean"]
    cases = {5.0: (-3.0, 0.0, 3.0), 3.0: (-1.0, 0.5, 2.0), 0.0: (-3.0, 0.0, 3.0)}
    for cap, (want, capped_frac, weight_mean) in cases.items():
        cfg = AlgorithmConfig(behav_imp_weight_cap=cap)
        loss, stats = loss_fn(prox.clone(), prox, behav, adv, mask, cfg=cfg, normalizer=2.0)
        assert loss.item() == approx(want), cap  # capped token: 0 but still counted in the 2
        assert stats["capped_frac"] == capped_frac
        assert stats["behav_weight_mean"] == approx(weight_mean)


def test_clip_higher_keeps_positive_tokens_between_the_bounds():
    logp = _leaf([[math.log(1.25), math.log(0.75)]])
    zeros = torch.zeros(1, 2, dtype=F64)
    adv, mask = t([[1.0, -1.0]]), torch.ones(1, 2)
    loss_fn = LOSSES["token_mean"]
    wide = AlgorithmConfig(clip_eps_low=0.2, clip_eps_high=0.28)
    loss, stats = loss_fn(logp, zeros, zeros, adv, mask, cfg=wide, normalizer=1.0)
    loss.backward()
    # 1.25 < 1 + 0.28: not clipped, d(-A r)/dlogp = -1.25; 0.75 < 0.8 with A < 0: clipped
    assert loss.item() == approx(-1.25 + 0.8)
    assert logp.grad[0].tolist() == approx([-1.25, 0.0])
    assert stats["clip_frac"] == 0.5
    logp.grad = None
    symmetric = AlgorithmConfig(clip_eps_low=0.2, clip_eps_high=0.2)
    loss, stats = loss_fn(logp, zeros, zeros, adv, mask, cfg=symmetric, normalizer=1.0)
    loss.backward()
    assert loss.item() == approx(-1.2 + 0.8)
    assert logp.grad.tolist() == [[0.0, 0.0]]
    assert stats["clip_frac"] == 1.0


def test_aggregations_hand_computed():
    # ratio 1 everywhere, so per-token loss = -A. seq 0: two tokens A = 1, 3; seq 1: A = 4
    mask = torch.tensor([[1, 1, 0], [0, 1, 0]])
    adv = t([[1.0, 3.0, 0.0], [0.0, 4.0, 0.0]])
    lp = torch.zeros(2, 3, dtype=F64)
    tokens_per_seq = mask.sum(-1).tolist()
    want = {"token_mean": (3.0, -8 / 3),  # (1 + 3 + 4) / 3 tokens
            "seq_mean_token_mean": (2.0, -3.0),  # (mean(1, 3) + 4) / 2 sequences
            "seq_mean_token_sum": (8.0, -1.0)}  # (1 + 3 + 4) / (2 sequences x max_len 4)
    for name, (norm_want, loss_want) in want.items():
        loss_fn = LOSSES[name]
        norm = loss_fn.normalizer(tokens_per_seq, max_len=4)
        assert norm == norm_want, name
        loss, _ = loss_fn(lp, lp, lp, adv, mask, cfg=AlgorithmConfig(), normalizer=norm)
        assert loss.item() == approx(loss_want), name


def test_normalizer_edge_cases():
    assert LOSSES["token_mean"].normalizer([0, 0]) == 1.0  # empty batch: loss 0, not NaN
    assert LOSSES["seq_mean_token_mean"].normalizer(torch.tensor([0, 3, 2])) == 2.0
    with pytest.raises(ValueError, match="max_len"):
        LOSSES["seq_mean_token_sum"].normalizer([3], max_len=0)
    lp = torch.zeros(1, 1, dtype=F64)
    with pytest.raises(ValueError, match="normalizer"):
        LOSSES["token_mean"](lp, lp, lp, lp, lp, cfg=AlgorithmConfig(), normalizer=0.0)


@pytest.mark.parametrize(("estimator", "value"), [
    ("k1", math.log(2.0)), ("k2", 0.5 * math.log(2.0) ** 2), ("k3", math.log(2.0) - 0.5)])
def test_kl_penalty_hand_computed(estimator, value):
    # logp - ref = log 2, A = 0 (no policy loss): loss = kl_coef * k / tokens
    logp, ref = t([[0.0, 0.0]]), t([[-math.log(2.0), 5.0]])
    mask = torch.tensor([[1, 0]])
    cfg = AlgorithmConfig(kl_coef=0.1, kl_estimator=estimator)
    zeros = torch.zeros(1, 2, dtype=F64)
    loss, stats = LOSSES["token_mean"](logp, logp, logp, zeros, mask, cfg=cfg, normalizer=1.0,
                                       ref_logprobs=ref, entropy=t([[0.7, 9.0]]))
    assert loss.item() == approx(0.1 * value)
    assert stats["kl"] == approx(value) and stats["kl_loss"] == approx(value)
    assert stats["entropy"] == approx(0.7)
    with pytest.raises(ValueError, match="ref_logprobs"):
        LOSSES["token_mean"](logp, logp, logp, zeros, mask, cfg=cfg, normalizer=1.0)


@settings(max_examples=100, deadline=None)
@given(a=st.floats(-50, 50), b=st.floats(-50, 50))
def test_kl_estimators_nonnegative_and_zero_when_equal(a, b):
    x, y = t([a]), t([b])
    assert KL_ESTIMATORS["k2"](x, y).item() >= 0.0
    assert KL_ESTIMATORS["k3"](x, y).item() >= 0.0
    for fn in KL_ESTIMATORS.values():
        assert fn(x, x).item() == 0.0


# ------------------------------------------------------ loss property / invariance tests

def _random_batch(seed: int, batch: int, length: int):
    """Left-padded-prompt + response + right padding rows, in float64."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.zeros(batch, length, dtype=torch.long)
    for i in range(batch):
        start = int(torch.randint(0, length, (1,), generator=gen))
        end = int(torch.randint(start, length + 1, (1,), generator=gen))
        mask[i, start:end] = 1
    def rnd(scale: float) -> torch.Tensor:
        return torch.randn(batch, length, generator=gen, dtype=F64) * scale
    prox = rnd(1.0) - 2.0
    logp = prox + rnd(0.3)  # ratios on both sides of the clip range
    behav = prox + rnd(0.8)  # some weights above the cap
    ref = prox + rnd(0.5)
    adv = token_advantages(torch.randn(batch, generator=gen, dtype=F64), mask)
    logp[mask == 0] = math.nan  # padding may hold anything
    return logp, prox, behav, ref, adv, mask


loss_cfgs = st.builds(AlgorithmConfig, clip_eps_high=st.sampled_from([0.2, 0.28]),
                      behav_imp_weight_cap=st.sampled_from([0.0, 1.5, 5.0]),
                      kl_coef=st.sampled_from([0.0, 0.05]),
                      kl_estimator=st.sampled_from(["k1", "k2", "k3"]))


def _loss_and_grad(loss_fn, cfg, norm, logp, prox, behav, ref, adv, mask):
    leaf = logp.clone().requires_grad_(True)
    loss, _ = loss_fn(leaf, prox, behav, adv, mask, cfg=cfg, normalizer=norm, ref_logprobs=ref)
    loss.backward()
    return loss.item(), leaf.grad


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), batch=st.integers(1, 8), length=st.integers(1, 7),
       name=st.sampled_from(sorted(LOSSES)), cfg=loss_cfgs, data=st.data())
def test_micro_batch_split_matches_full_batch(seed, batch, length, name, cfg, data):
    logp, prox, behav, ref, adv, mask = _random_batch(seed, batch, length)
    loss_fn = LOSSES[name]
    norm = loss_fn.normalizer(mask.sum(-1), max_len=length)
    full_loss, full_grad = _loss_and_grad(loss_fn, cfg, norm, logp, prox, behav, ref, adv, mask)
    assert math.isfinite(full_loss) and torch.isfinite(full_grad).all()
    sizes, left = [], batch
    while left:
        sizes.append(data.draw(st.integers(1, left)))
        left -= sizes[-1]
    total, grads, row = 0.0, torch.zeros_like(full_grad), 0
    for size in sizes:
        rows = slice(row, row + size)
        width = max(1, int(mask[rows].nonzero()[:, 1].max()) + 1) if mask[rows].any() else 1
        parts = [x[rows, :width] for x in (logp, prox, behav, ref, adv, mask)]
        loss, grad = _loss_and_grad(loss_fn, cfg, norm, *parts)
        total += loss
        grads[rows, :width] = grad
        row += size
    assert total == pytest.approx(full_loss, abs=1e-6)
    assert torch.allclose(grads, full_grad, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_batch_8x1_equals_1x8(name):
    logp, prox, behav, ref, adv, mask = _random_batch(seed=3, batch=8, length=12)
    cfg = AlgorithmConfig(kl_coef=0.02, clip_eps_high=0.28)
    loss_fn = LOSSES[name]
    norm = loss_fn.normalizer(mask.sum(-1), max_len=12)
    full_loss, full_grad = _loss_and_grad(loss_fn, cfg, norm, logp, prox, behav, ref, adv, mask)
    one_by_one = [_loss_and_grad(loss_fn, cfg, norm, *(x[i:i + 1] for x in
                                                       (logp, prox, behav, ref, adv, mask)))
                  for i in range(8)]
    assert sum(loss for loss, _ in one_by_one) == pytest.approx(full_loss, abs=1e-6)
    assert torch.allclose(torch.cat([g for _, g in one_by_one]), full_grad, atol=1e-6, rtol=0)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), batch=st.integers(1, 6), length=st.integers(1, 6),
       name=st.sampled_from(sorted(LOSSES)))
def test_on_policy_gradient_is_minus_advantage_over_normalizer(seed, batch, length, name):
    _, prox, _, _, adv, mask = _random_batch(seed, batch, length)
    loss_fn = LOSSES[name]
    norm = loss_fn.normalizer(mask.sum(-1), max_len=length)
    _, grad = _loss_and_grad(loss_fn, AlgorithmConfig(), norm, prox, prox, prox, None, adv, mask)
    per_token = mask.to(F64) / mask.sum(-1, keepdim=True).clamp_min(1)
    scale = per_token if name == "seq_mean_token_mean" else mask.to(F64)
    assert torch.allclose(grad, -adv * scale / norm, atol=1e-12, rtol=0)


def _reference_loss(name, cfg, norm, logp, prox, behav, ref, adv, mask) -> float:
    """Token-by-token transcription of the objective, for comparison."""
    total = 0.0
    for i in range(mask.shape[0]):
        row, n = 0.0, int(mask[i].sum())
        for j in range(mask.shape[1]):
            if not mask[i, j]:
                continue
            a, r = float(adv[i, j]), math.exp(float(logp[i, j] - prox[i, j]))
            w = math.exp(float(prox[i, j] - behav[i, j]))
            if cfg.behav_imp_weight_cap and w > cfg.behav_imp_weight_cap:
                w = 0.0
            clipped = min(max(r, 1 - cfg.clip_eps_low), 1 + cfg.clip_eps_high)
            token = -w * min(r * a, clipped * a)
            d = float(ref[i, j] - logp[i, j])
            kl = {"k1": -d, "k2": 0.5 * d * d, "k3": math.exp(d) - d - 1}[cfg.kl_estimator]
            row += token + cfg.kl_coef * kl
        total += row / max(n, 1) if name == "seq_mean_token_mean" else row
    return total / norm


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), batch=st.integers(1, 5), length=st.integers(1, 6),
       name=st.sampled_from(sorted(LOSSES)), cfg=loss_cfgs)
def test_loss_matches_token_loop_reference(seed, batch, length, name, cfg):
    logp, prox, behav, ref, adv, mask = _random_batch(seed, batch, length)
    loss_fn = LOSSES[name]
    norm = loss_fn.normalizer(mask.sum(-1), max_len=length)
    loss, _ = loss_fn(logp, prox, behav, adv, mask, cfg=cfg, normalizer=norm, ref_logprobs=ref)
    assert loss.item() == pytest.approx(
        _reference_loss(name, cfg, norm, logp, prox, behav, ref, adv, mask), abs=1e-9)


def test_synchronous_case_is_standard_ppo_clip():
    logp, prox, _, _, adv, mask = _random_batch(seed=11, batch=4, length=9)
    cfg = AlgorithmConfig(clip_eps_low=0.2, clip_eps_high=0.2)
    loss_fn = LOSSES["token_mean"]
    norm = loss_fn.normalizer(mask.sum(-1))
    loss, stats = loss_fn(logp, prox, prox, adv, mask, cfg=cfg, normalizer=norm)
    m = mask.bool()
    ratio = torch.exp(logp[m] - prox[m])
    ppo = -torch.min(ratio * adv[m], ratio.clamp(0.8, 1.2) * adv[m]).mean()
    assert loss.item() == pytest.approx(ppo.item(), abs=1e-12)
    assert stats["behav_weight_mean"] == 1.0 and stats["capped_frac"] == 0.0
