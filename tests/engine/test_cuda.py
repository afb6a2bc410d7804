"""The CUDA path of the engine and learner stages (gpu-marked: skipped without CUDA).

What `benchmarks/gpu_check.py` runs first on a lent GPU: the local engine's fused
forward and batching in bf16 against Hugging Face `generate` on the same device, its
in-place weight swap, and a bf16-autocast learner step against the same step on the CPU.
"""

from __future__ import annotations

import copy

import pytest
import torch

from areal_lite.config import AlgorithmConfig, LearnerConfig
from areal_lite.engine.local.engine import LocalEngine
from areal_lite.models import load_causal_lm, named_weights
from areal_lite.train.learner import Learner
from areal_lite.train.weight_sync import swap_weights
from areal_lite.types import GenerateRequest, Sample, SamplingParams

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _greedy(n: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0.0)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
async def test_engine_greedy_matches_hf_generate_on_cuda(tiny_model_dir, dtype):
    model = load_causal_lm(tiny_model_dir, device="cuda", dtype=dtype)
    prompts = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16, 17]]
    async with LocalEngine(model, device="cuda") as engine:
        results = [await engine.generate(GenerateRequest(rid=f"r{i}", input_ids=p,
                                                         sampling=_greedy(8)))
                   for i, p in enumerate(prompts)]
    for p, result in zip(prompts, results, strict=True):
        with torch.inference_mode():
            out = model.generate(torch.tensor([p], device="cuda"), max_new_tokens=8,
                                 do_sample=False)
        expected = out[0, len(p):].tolist()
        assert result.output_ids == expected[:len(result.output_ids)], (dtype, p)
        assert len(result.logprobs) == len(result.output_ids)


async def test_weight_swap_on_cuda_installs_the_new_weights(tiny_model_dir):
    model = load_causal_lm(tiny_model_dir, device="cuda", dtype="float32")
    trained = copy.deepcopy(model)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.01)
    async with LocalEngine(model, device="cuda") as engine:
        await swap_weights(engine, trained, 1)
        assert engine.version == 1
    for (name, got), (_, want) in zip(named_weights(model), named_weights(trained), strict=True):
        assert torch.equal(got, want), name


def _samples() -> list[list[Sample]]:
    gen = torch.Generator().manual_seed(0)
    groups = []
    for g in range(2):
        group = []
        for k in range(4):
            n = 12 + 3 * k
            ids = torch.randint(0, 200, (n,), generator=gen).tolist()
            mask = [0] * 4 + [1] * (n - 4)
            group.append(Sample(input_ids=ids, loss_mask=mask, logprobs=[-1.0] * n,
                                versions=[0] * n, reward=float((g + k) % 2), raw_reward=0.0))
        groups.append(group)
    return groups


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_learner_step_on_cuda_matches_cpu(tiny_model_dir, dtype):
    stats = {}
    for device in ("cpu", "cuda"):
        model = load_causal_lm(tiny_model_dir, device=device, dtype="float32")
        learner = Learner(model, cfg=LearnerConfig(lr=1e-3), algo=AlgorithmConfig(),
                          device=device, dtype=dtype if device == "cuda" else torch.float32)
        stats[device] = learner.train_step(_samples())
    tol = 1e-4 if dtype == torch.float32 else 5e-2  # bf16 autocast vs fp32
    assert stats["cuda"]["loss"] == pytest.approx(stats["cpu"]["loss"], abs=tol, rel=tol)
    assert stats["cuda"]["grad_norm"] == pytest.approx(stats["cpu"]["grad_norm"], rel=max(tol, 1e-3))
