"""Tests for learner.py: micro-batching, logprob parity (naive forward, local engine),
gradient-accumulation invariance, learning signal, schedules and resumable state."""

from __future__ import annotations

import copy
import math
import random

import msgspec
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from areal_lite.config import AlgorithmConfig, LearnerConfig
from areal_lite.train.learner import Learner, lr_multiplier
from areal_lite.train.logprobs import (
    make_microbatches,
    padding_fraction,
    sequence_logprobs,
)
from areal_lite.types import GenerateRequest, Sample, SamplingParams

torch.set_num_threads(1)


def make_learner(model, *, ref_model=None, algo=None, **cfg) -> Learner:
    return Learner(model, cfg=LearnerConfig(**cfg), algo=algo or AlgorithmConfig(),
                   ref_model=ref_model, pad_token_id=0)


def make_samples(lengths, rewards, *, seed=0, vocab=256, prompt_len=4, version=0):
    """Random token sequences; loss on everything after the prompt; behaviour = 0s,
    filled in on-policy by `on_policy` below."""
    rng = random.Random(seed)
    out = []
    for n, r in zip(lengths, rewards, strict=True):
        p = min(prompt_len, n - 1)
        out.append(Sample(input_ids=[rng.randrange(3, vocab) for _ in range(n)],
                          loss_mask=[0] * p + [1] * (n - p), logprobs=[0.0] * n,
                          versions=[-1] * p + [version] * (n - p), reward=r, raw_reward=r))
    return out


def on_policy(learner: Learner, samples):
    """Set behaviour logprobs to the current policy's (importance weights 1)."""
    for s, lp in zip(samples, learner.compute_logprobs(samples), strict=True):
        s.logprobs = [x if m else 0.0 for x, m in zip(lp, s.loss_mask, strict=True)]
    return samples


def naive_logprobs(model, ids: list[int]) -> list[float]:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    lp = torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    return [0.0, *lp.tolist()]


# ----------------------------------------------------------------------------- config

def test_config_rejects_bad_values_naming_the_key():
    with pytest.raises(msgspec.ValidationError, match="lr"):
        msgspec.convert({"lr": 0.0}, LearnerConfig)
    with pytest.raises(ValueError, match="train.total_steps"):
        LearnerConfig(lr_schedule="cosine", warmup_steps=10, total_steps=5)
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"lr": 1e-5, "lr_shedule": "cosine"}, LearnerConfig)
    cfg = msgspec.convert({"adam_betas": [0.8, 0.95]}, LearnerConfig)
    assert cfg.adam_betas == (0.8, 0.95)


def test_lr_multiplier_warmup_then_decay():
    cos = LearnerConfig(lr_schedule="cosine", warmup_steps=4, total_steps=14)
    assert [lr_multiplier(s, cos) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_multiplier(9, cos) == pytest.approx(0.5)  # halfway through the decay
    assert lr_multiplier(14, cos) == pytest.approx(0.0, abs=1e-12)
    assert lr_multiplier(100, cos) == pytest.approx(0.0, abs=1e-12)
    lin = LearnerConfig(lr_schedule="linear", total_steps=10)
    assert [lr_multiplier(s, lin) for s in (0, 5, 10)] == pytest.approx([1.0, 0.5, 0.0])
    const = LearnerConfig(warmup_steps=2)
    assert [lr_multiplier(s, const) for s in range(4)] == [0.5, 1.0, 1.0, 1.0]


# ------------------------------------------------------------------------ micro-batches

@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 100), max_size=40), st.integers(1, 400), st.booleans())
def test_microbatches_cover_each_index_once_within_budget(lengths, budget, packing):
    batches = make_microbatches(lengths, budget, packing)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert all(b for b in batches)
    for b in batches:
        padded = max(lengths[i] for i in b) * len(b)
        assert padded <= budget or len(b) == 1  # only a lone over-long sequence exceeds it
    if not packing:
        assert [i for b in batches for i in b] == list(range(len(lengths)))
    else:
        flat = [lengths[i] for b in batches for i in b]
        assert flat == sorted(flat, reverse=True)
        # greedy fill: no micro-batch could have taken the next one's first sequence
        for b, nxt in zip(batches, batches[1:]):
            assert max(lengths[i] for i in b) * (len(b) + 1) > budget


def test_packing_reduces_padding_on_mixed_lengths():
    lengths = [10, 200, 12, 190, 15, 180, 8, 210] * 4
    packed = make_microbatches(lengths, 512, packing=True)
    unpacked = make_microbatches(lengths, 512, packing=False)
    assert padding_fraction(lengths, packed) < 0.1 < padding_fraction(lengths, unpacked)
    assert padding_fraction([3, 3], [[0, 1]]) == 0.0
    assert padding_fraction([4, 2], [[0, 1]]) == pytest.approx(2 / 8)


def test_train_step_reports_lower_padding_with_packing(model):
    lengths = [6, 40, 7, 38, 5, 36, 8, 41]
    fracs = {}
    for packing in (True, False):
        learner = make_learner(copy.deepcopy(model), max_tokens_per_microbatch=90,
                               packing=packing)
        samples = on_policy(learner, make_samples(lengths, [1, 0] * 4))
        fracs[packing] = learner.train_step([samples[:4], samples[4:]])["padding_frac"]
    assert fracs[True] < fracs[False]


# --------------------------------------------------------------------- logprob parity

def test_sequence_logprobs_match_unpadded_forward(model):
    seqs = [s.input_ids for s in make_samples([5, 17, 9, 2], [0] * 4, seed=3)]
    width = max(map(len, seqs))
    right = torch.tensor([s + [0] * (width - len(s)) for s in seqs])
    left = torch.tensor([[0] * (width - len(s)) + s for s in seqs])
    mask_r = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    with torch.no_grad():
        lp_r = sequence_logprobs(model, right, mask_r)
        lp_l = sequence_logprobs(model, left, mask_r.flip(-1))
    for row, s in enumerate(seqs):
        ref = torch.tensor(naive_logprobs(model, s))
        n = len(s)
        assert (lp_r[row, :n] - ref).abs().max() < 1e-5
        assert (lp_l[row, width - n:] - ref).abs().max() < 1e-5
        assert lp_r[row, n:].abs().sum() == 0 and lp_l[row, :width - n].abs().sum() == 0


def test_compute_logprobs_keeps_order_across_microbatches(model):
    learner = make_learner(model, max_tokens_per_microbatch=40)
    samples = make_samples([5, 30, 9, 12, 3, 25], [0] * 6, seed=1)
    got = learner.compute_logprobs(samples)
    for s, lp in zip(samples, got, strict=True):
        assert len(lp) == len(s.input_ids) and lp[0] == 0.0
        assert max(abs(a - b) for a, b in zip(lp, naive_logprobs(model, s.input_ids))) < 1e-5


async def test_logprobs_match_local_engine(model, tiny_tokenizer):
    from areal_lite.engine.local.engine import LocalEngine

    prompts = [tiny_tokenizer.encode(t) for t in ("Hello there!", "What is 12 + 30? The")]
    sampling = SamplingParams(max_new_tokens=12, temperature=1.0, ignore_eos=True, seed=7)
    async with LocalEngine(model, max_batch_size=4) as engine:
        results = [await engine.generate(GenerateRequest(rid=f"r{i}", input_ids=p,
                                                         sampling=sampling))
                   for i, p in enumerate(prompts)]
    learner = make_learner(model)
    samples = [Sample(input_ids=p + r.output_ids, loss_mask=[0] * len(p) + [1] * len(r.output_ids),
                      logprobs=[0.0] * len(p) + r.logprobs, versions=[-1] * len(p) + r.versions,
                      reward=0.0, raw_reward=0.0) for p, r in zip(prompts, results, strict=True)]
    for s, lp, p in zip(samples, learner.compute_logprobs(samples), prompts, strict=True):
        diff = max(abs(a - b) for a, b in zip(lp[len(p):], s.logprobs[len(p):], strict=True))
        assert diff < 1e-4


# ----------------------------------------------------------------- training invariants

def _grads_at_step(learner: Learner, groups) -> tuple[dict[str, torch.Tensor], dict]:
    grads: dict[str, torch.Tensor] = {}

    def capture(optimizer, args, kwargs):
        grads.update({n: p.grad.clone() for n, p in learner.model.named_parameters()
                      if p.grad is not None})

    handle = learner.optimizer.register_step_pre_hook(capture)
    stats = learner.train_step(groups)
    handle.remove()
    return grads, stats


@pytest.mark.parametrize("loss_agg", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"])
def test_gradient_accumulation_invariance(model, loss_agg):
    """All 8 samples in one micro-batch == 8 micro-batches of one (same grads, params)."""
    algo = AlgorithmConfig(loss_agg=loss_agg, kl_coef=0.1)
    lengths = [9, 14, 6, 11, 20, 7, 13, 10]
    results = []
    for budget in (8 * 20, 1):
        learner = Learner(copy.deepcopy(model), cfg=LearnerConfig(
            lr=1e-3, adam_eps=1.0, max_tokens_per_microbatch=budget, recompute_proximal=False),
            algo=algo, ref_model=copy.deepcopy(model), max_new_tokens=20)
        samples = make_samples(lengths, [1.0, 0.0, 0.5, 0.0, 1.0, 1.0, 0.0, 0.25], seed=5)
        on_policy(learner, samples)
        for s in samples:  # off-policy behaviour: exercise the importance weights
            s.logprobs = [x - 0.1 * m for x, m in zip(s.logprobs, s.loss_mask, strict=True)]
        grads, stats = _grads_at_step(learner, [samples[:4], samples[4:]])
        results.append((grads, stats, dict(learner.model.named_parameters())))
    (g1, s1, p1), (g8, s8, p8) = results
    assert s1["num_updates"] == s8["num_updates"] == 1
    assert s1["loss"] == pytest.approx(s8["loss"], rel=1e-5, abs=1e-6)  # ~0: float noise
    assert s1["kl"] == pytest.approx(s8["kl"], abs=1e-7)
    assert g1.keys() == g8.keys() and g1
    for name in g1:
        torch.testing.assert_close(g1[name], g8[name], rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(p1[name], p8[name], rtol=0, atol=1e-6)


def test_gradient_checkpointing_gives_same_gradients(model):
    samples = make_samples([12, 9, 15, 7], [1.0, 0.0, 0.0, 1.0], seed=2)
    grads = []
    for ckpt in (False, True):
        learner = Learner(copy.deepcopy(model), cfg=LearnerConfig(), algo=AlgorithmConfig(),
                          gradient_checkpointing=ckpt)
        grads.append(_grads_at_step(learner, [on_policy(learner, samples)])[0])
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-7)


def test_positive_advantage_sample_becomes_more_likely(model):
    learner = make_learner(model, lr=1e-3)
    samples = on_policy(learner, make_samples([12, 12], [1.0, 0.0], seed=4))

    def mean_logprob(i):
        lp = learner.compute_logprobs([samples[i]])[0]
        return sum(x for x, m in zip(lp, samples[i].loss_mask, strict=True) if m) / 8

    before = [mean_logprob(0), mean_logprob(1)]
    losses = [learner.train_step([samples])["loss"] for _ in range(4)]
    after = [mean_logprob(0), mean_logprob(1)]
    assert after[0] > before[0] + 0.05 and after[1] < before[1] - 0.05
    assert all(math.isfinite(x) for x in losses)


def test_stats_filtering_staleness_and_update_count(model):
    learner = make_learner(model, lr=1e-4, ppo_epochs=2, num_minibatches=2,
                           algo=AlgorithmConfig(dynamic_filtering=True))
    samples = on_policy(learner, make_samples([8, 9, 10, 11, 6, 7], [1, 0, 1, 0, 2, 2],
                                              version=3))
    steps = []
    learner.optimizer.register_step_post_hook(lambda *a: steps.append(1))
    stats = learner.train_step([samples[:2], samples[2:4], samples[4:]], current_version=5)
    assert len(steps) == 4 and stats["num_updates"] == 4
    assert stats["num_filtered_groups"] == 1 and stats["num_samples"] == 4
    assert stats["staleness"] == pytest.approx(2.0)
    assert stats["num_tokens"] == sum(len(s.input_ids) - 4 for s in samples[:4])
    assert stats["reward_mean"] == pytest.approx(1.0)  # before filtering: all 6 rewards
    assert stats["adv_mean"] == pytest.approx(0.0, abs=1e-6)
    assert stats["entropy"] > 0 and stats["grad_norm"] > 0 and stats["tokens_per_s"] > 0
    for key in ("loss", "policy_loss", "clip_frac", "approx_kl", "lr", "padding_frac"):
        assert math.isfinite(stats[key])


def test_all_groups_filtered_leaves_weights_unchanged(model):
    learner = make_learner(model, lr=1e-2, algo=AlgorithmConfig(dynamic_filtering=True))
    before = {n: p.clone() for n, p in model.named_parameters()}
    stats = learner.train_step([make_samples([5, 6], [1.0, 1.0])])
    assert stats["num_samples"] == 0 and stats["num_filtered_groups"] == 1
    assert learner.step == 1
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])


def test_kl_needs_a_reference_model(model):
    with pytest.raises(ValueError, match="ref_model"):
        make_learner(model, algo=AlgorithmConfig(kl_coef=0.1))


def test_state_dict_resume_matches_uninterrupted_run(model):
    cfg = {"lr": 1e-3, "lr_schedule": "cosine", "warmup_steps": 1, "total_steps": 4}
    batches = [[make_samples([9, 11, 7], [1.0, 0.0, 0.5], seed=s)] for s in range(3)]
    straight = make_learner(copy.deepcopy(model), **cfg)
    lrs = [straight.train_step(b)["lr"] for b in batches]
    assert lrs == pytest.approx([1e-3, 1e-3, 1e-3 * 0.5 * (1 + math.cos(math.pi / 3))])

    first = make_learner(copy.deepcopy(model), **cfg)
    first.train_step(batches[0])
    state = copy.deepcopy(first.state_dict())
    resumed = make_learner(copy.deepcopy(first.model), **cfg)
    resumed.load_state_dict(state)
    assert [resumed.train_step(b)["lr"] for b in batches[1:]] == pytest.approx(lrs[1:])
    for (n, a), b in zip(straight.model.named_parameters(), resumed.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7, msg=n)


def test_proximal_from_forward_equals_recomputed(model):
    """Single update: proximal logprobs taken from the training forward (a shortcut) give
    the same first update as recomputing them in a separate pass (ppo_epochs=2)."""
    samples = make_samples([10, 13, 8, 12], [1.0, 0.0, 0.0, 1.0], seed=6)
    first_grads = []
    for epochs in (1, 2):
        learner = make_learner(copy.deepcopy(model), ppo_epochs=epochs)
        on_policy(learner, samples)
        for s in samples:
            s.logprobs = [x + 0.05 * m for x, m in zip(s.logprobs, s.loss_mask, strict=True)]
        grads: list[dict[str, torch.Tensor]] = []
        learner.optimizer.register_step_pre_hook(lambda *a: grads.append(
            {n: p.grad.clone() for n, p in learner.model.named_parameters()}))
        stats = learner.train_step([samples])
        assert len(grads) == epochs and stats["num_updates"] == epochs
        first_grads.append(grads[0])
    for name, g in first_grads[0].items():
        torch.testing.assert_close(g, first_grads[1][name], rtol=1e-5, atol=1e-7)


def test_train_step_calls_on_microbatch_before_every_micro_batch(model):
    """The hook a core split uses to hand the learner more threads: once per micro-batch
    on the learner's thread, the proximal forward's included (here 8 rows of 12 tokens
    in 24-token micro-batches: 4 for the proximal logprobs that two minibatches need,
    then 2 per minibatch update), and not at all after the step."""
    learner = make_learner(model, max_tokens_per_microbatch=24, num_minibatches=2,
                           fast_forward=False)
    samples = on_policy(learner, make_samples([12] * 8, [1.0, 0.0] * 4, seed=5))
    calls = []
    learner.train_step([samples], on_microbatch=lambda: calls.append(1))
    assert len(calls) == 8
    learner.train_step([samples])
    assert len(calls) == 8


def test_bf16_compute_dtype_learns_and_keeps_fp32_master_weights(model):
    """`train.compute_dtype = "bfloat16"` autocasts forward/backward on the CPU; weights
    and optimizer state stay float32 and the logprobs stay close to the fp32 ones."""
    fp32 = make_learner(copy.deepcopy(model))
    learner = make_learner(model, lr=1e-3, compute_dtype="bfloat16")
    assert learner.dtype == torch.bfloat16 and fp32.dtype == torch.float32
    samples = on_policy(learner, make_samples([12, 12], [1.0, 0.0], seed=4))
    ref = fp32.compute_logprobs(samples)
    for got, want in zip(learner.compute_logprobs(samples), ref, strict=True):
        assert max(abs(a - b) for a, b in zip(got, want, strict=True)) < 0.1
    before = learner.compute_logprobs([samples[0]])[0]
    for _ in range(4):
        learner.train_step([samples])
    after = learner.compute_logprobs([samples[0]])[0]
    assert sum(after) > sum(before)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(v.dtype == torch.float32 for st_ in learner.optimizer.state.values()
               for v in st_.values() if isinstance(v, torch.Tensor) and v.dim() > 0)


@pytest.mark.parametrize(("cfg", "skipped"), [
    (dict(), 1.0),  # one update pass: the update's own forward gives the proximal logprobs
    (dict(ppo_epochs=2), 0.0),  # a second pass needs them from before the first
    (dict(num_minibatches=2), 0.0),
    (dict(ppo_epochs=2, recompute_proximal=False), 1.0),  # behaviour logprobs stand in
])
def test_stats_say_whether_a_proximal_forward_ran(model, cfg, skipped, monkeypatch):
    learner = make_learner(model, lr=1e-4, **cfg)
    forwards = []
    real = learner._logprob_tensors
    monkeypatch.setattr(learner, "_logprob_tensors",
                        lambda *a, **kw: forwards.append(1) or real(*a, **kw))
    samples = make_samples([8, 9, 10, 11], [1, 0, 1, 0], version=0)
    stats = learner.train_step([samples[:2], samples[2:]], current_version=2)
    assert stats["prox_forward_skipped"] == skipped
    assert len(forwards) == (0 if skipped else 1)


# ------------------------------------------------------------- tree export == individual

def _multi_turn_cache(rng: random.Random, learner: Learner, vocab: int = 256):
    """A 3-turn chain with a branch at turn 2 (root -> a -> b, root -> c), rewards on
    every turn, behaviour logprobs a little off the current policy's."""
    from areal_lite.cache import InteractionCache
    from areal_lite.types import CompletionNode

    def toks(n):
        return [rng.randrange(3, vocab) for _ in range(n)]

    nodes: list[CompletionNode] = []
    for nid, parent, num_new, num_out in (("r", None, 5, 4), ("a", "r", 3, 5),
                                          ("b", "a", 2, 3), ("c", "r", 4, 6)):
        base = next((n.prompt_ids + n.output_ids for n in nodes if n.id == parent), [])
        nodes.append(CompletionNode(id=nid, response_id=nid, parent_id=parent,
                                    prompt_ids=base + toks(num_new), output_ids=toks(num_out),
                                    logprobs=[0.0] * num_out, versions=[0] * num_out,
                                    finish_reason="stop"))
    full = learner.compute_logprobs(
        [Sample(input_ids=n.prompt_ids + n.output_ids, loss_mask=[], logprobs=[], versions=[],
                reward=0.0, raw_reward=0.0) for n in nodes])
    for n, lp in zip(nodes, full, strict=True):
        n.logprobs = [x - 0.1 for x in lp[len(n.prompt_ids):]]
    cache = InteractionCache(nodes)
    cache.set_rewards({n.id: rng.choice([0.0, 0.1, 1.0]) for n in nodes})
    return cache


@pytest.mark.parametrize("loss_agg", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"])
def test_tree_export_trains_exactly_like_individual(model, loss_agg):
    """Two groups of multi-turn episodes exported as `individual` and as `tree` (each
    prefix fed once, per-span rewards): the same advantages, loss, KL and gradients, and
    the same weights after the step, for every loss aggregation."""
    from areal_lite.export import export_episode

    algo = AlgorithmConfig(loss_agg=loss_agg, kl_coef=0.1, dynamic_filtering=True)
    results, tokens = {}, {}
    for style in ("individual", "tree"):
        learner = Learner(copy.deepcopy(model), cfg=LearnerConfig(
            lr=1e-3, adam_eps=1.0, max_tokens_per_microbatch=40), algo=algo,
            ref_model=copy.deepcopy(model), max_new_tokens=8)
        rng = random.Random(7)
        groups = [[s for e in range(3) for s in export_episode(
            _multi_turn_cache(rng, learner), style=style, gamma=0.5, episode_id=f"{g}/{e}")]
            for g in range(2)]
        tokens[style] = sum(len(s.input_ids) for g in groups for s in g)
        grads, stats = _grads_at_step(learner, groups)
        results[style] = (grads, stats, dict(learner.model.named_parameters()))
    (g_ind, s_ind, p_ind), (g_tree, s_tree, p_tree) = results["individual"], results["tree"]
    assert tokens["tree"] < tokens["individual"]
    assert (s_ind["num_samples"], s_tree["num_samples"]) == (24, 12)
    for key in ("num_tokens", "reward_mean", "reward_std", "adv_mean", "loss", "kl",
                "entropy", "num_filtered_groups"):
        assert s_tree[key] == pytest.approx(s_ind[key], rel=1e-5, abs=1e-6), key
    assert g_ind.keys() == g_tree.keys() and g_ind
    for name in g_ind:
        torch.testing.assert_close(g_tree[name], g_ind[name], rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(p_tree[name], p_ind[name], rtol=0, atol=1e-6)
