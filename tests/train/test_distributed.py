"""Tests for train/distributed.py: 2 FSDP2 ranks (gloo, CPU, under torchrun) take the
same update as 1 process on the whole batch; the token-balanced split."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from areal_lite.train.distributed import token_balanced_split

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import dist_worker  # noqa: E402

# fp32 on CPU: the 2-rank sum of gradients differs from the 1-process sum only by
# summation order, far below these bounds
ATOL = 1e-5


def torchrun(nproc: int, script: Path, *args: str, timeout: float = 240) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2] / "src"),
                                          os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                    f"--nproc-per-node={nproc}", str(script), *args],
                   check=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def two_rank_results(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    torchrun(2, HERE / "dist_worker.py", str(tiny_model_dir), str(out))
    return {case: torch.load(out / f"{case}.pt", weights_only=True) for case in dist_worker.CASES}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(dist_worker.CASES))
def test_two_ranks_match_one_process(case, two_rank_results, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    groups = dist_worker.make_groups(case)
    lengths = [len(s.input_ids) for g in groups for s in g]
    counts = [len(share) for share in token_balanced_split(lengths, 2)]
    assert counts[0] != counts[1]  # the ranks really get uneven sample counts
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats = dist_worker.make_learner(model, case).train_step(groups)
    got = two_rank_results[case]
    for key in ("loss", "policy_loss", "grad_norm", "num_tokens", "entropy", "clip_frac"):
        if key in stats:
            assert got["stats"][key] == pytest.approx(stats[key], rel=1e-5, abs=ATOL), key
    moved = 0
    for name, want in model.state_dict().items():
        torch.testing.assert_close(got["weights"][name], want, atol=ATOL, rtol=1e-5)
        moved += int(not torch.equal(want, before[name]))
    assert moved > 0  # the step changed weights, so the comparison means something


@given(st.lists(st.integers(1, 500), max_size=40), st.integers(1, 5))
def test_token_balanced_split_partitions_and_balances(lengths, world):
    shares = token_balanced_split(lengths, world)
    assert len(shares) == world
    assert sorted(i for s in shares for i in s) == list(range(len(lengths)))
    sums = [sum(lengths[i] for i in s) for s in shares]
    # longest-first greedy: no rank is more than one sequence above the lightest
    assert max(sums) - min(sums) <= max(lengths, default=0)
