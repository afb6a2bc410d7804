"""Worker for tests/train/test_distributed.py, run by torchrun: one learner rank.

argv: model_dir out_dir. For each case in CASES, a fresh FSDP2 learner takes one
train_step on the same batch as the test's single process; rank 0 writes the stats
and the full weights to out_dir/<case>.pt.
"""

from __future__ import annotations

import sys

import torch

from areal_lite.config import AlgorithmConfig, LearnerConfig
from areal_lite.train.distributed import full_state_dict, init_dist
from areal_lite.train.learner import Learner
from areal_lite.types import Sample, Span

# uneven lengths: the token-balanced split gives the ranks different sample counts
LENGTHS = [60, 5, 9, 30, 6, 7, 22, 8]
REWARDS = [1.0, 0.0, 0.5, 0.0, 1.0, 1.0, 0.0, 0.25]
CASES = {
    "token_mean": dict(cfg=dict(lr=1e-2), algo=dict()),
    "seq_mean_token_sum": dict(cfg=dict(lr=1e-2, max_tokens_per_microbatch=64),
                               algo=dict(loss_agg="seq_mean_token_sum")),
    # adam_eps: Adam's first step (~ lr * sign(g)) turns summation-order noise on a
    # near-zero gradient entry into a visible weight change. This batch has one on some
    # CPUs: on a VM without AMX one weight of 29,504 differed by 1.3e-5, on main too; a
    # 1-process run split into other micro-batches differs from itself the same way
    "seq_mean_token_mean_2mb": dict(cfg=dict(lr=1e-2, num_minibatches=2, grad_clip=0.05,
                                             adam_eps=1e-4),
                                    algo=dict(loss_agg="seq_mean_token_mean")),
    # samples of 20+ tokens are tree samples (two spans, each its own advantage unit);
    # adam_eps as above: this batch has such an entry on every CPU tried
    "tree_seq_mean_token_mean": dict(cfg=dict(lr=1e-2, adam_eps=1e-4),
                                     algo=dict(loss_agg="seq_mean_token_mean")),
}


def make_groups(case: str = "") -> list[list[Sample]]:
    g = torch.Generator().manual_seed(0)
    samples = []
    for n, r in zip(LENGTHS, REWARDS, strict=True):
        ids = torch.randint(3, 250, (n,), generator=g).tolist()
        p = min(3, n - 1)
        lp = (-torch.rand(n, generator=g)).tolist()
        samples.append(Sample(input_ids=ids, loss_mask=[0] * p + [1] * (n - p), logprobs=lp,
                              versions=[-1] * p + [0] * (n - p), reward=r, raw_reward=r))
        if case.startswith("tree") and n >= 20:  # two turns, a user turn between them
            mid = n // 2
            samples[-1].loss_mask[mid:mid + 2] = [0, 0]
            samples[-1].spans = [Span(start=p, end=mid, reward=0.75, raw_reward=0.75,
                                      completion_id="t0"),
                                 Span(start=mid + 2, end=n, reward=r, raw_reward=r,
                                      completion_id="t1")]
    return [samples[:4], samples[4:]]


def make_learner(model, case: str, dist=None) -> Learner:
    spec = CASES[case]
    # FSDP2 ranks take the plain forward (train/forward.py's split is off under sharding);
    # the 1-process reference does too, so the comparison isolates the sharding
    return Learner(model, cfg=LearnerConfig(**spec["cfg"], fast_forward=False),
                   algo=AlgorithmConfig(**spec["algo"]),
                   pad_token_id=0, max_new_tokens=40, dist=dist)


def main(model_dir: str, out_dir: str) -> None:
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    d = init_dist("cpu")
    for case in CASES:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        learner = make_learner(model, case, d)
        stats = learner.train_step(make_groups(case))
        weights = dict(full_state_dict(learner.model, keep=d.is_leader))
        if d.is_leader:
            torch.save({"stats": stats, "weights": weights}, f"{out_dir}/{case}.pt")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
