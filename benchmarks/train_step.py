"""Benchmark: the trainer stage — learner throughput, weight-swap cost, seconds per RL step.

Prints one JSON line per result (all in the same run, same process):

    learner      the same synthetic batch of Samples (mixed lengths, random token ids,
                 loss mask on the tail) through `Learner.train_step`, with length-aware
                 packing on and off at the same `max_tokens_per_microbatch`: real tokens
                 per second and the padding fraction of the micro-batches
    weight_swap  `swap_weights` into a started `LocalEngine` holding a copy of the model,
                 next to a plain `copy_` of the same tensors into preallocated buffers
                 (the physical floor); best of 3 each
    rl_step      `Trainer` on the reference configuration (issue 4): fp32 CPU, 8 prompts
                 x 8 samples, max_new_tokens 96, temperature 1.0, lr 1e-5, no KL, one
                 update per batch, synchronous (max_head_offpolicyness 0) and
                 asynchronous (2); seconds per step split into generation and update,
                 read from the run's metrics.jsonl (step 1 is warm-up and skipped when
                 there are more steps)
    dist         the learner as 1 and as 2 FSDP2 processes (torchrun, gloo on CPU) on
                 the same batch: learner tokens/s and the weight-export time (every
                 sharded parameter gathered to full on rank 0, one at a time), with the
                 2-process / 1-process ratio. On a 2-core CPU machine two processes
                 share the same cores, so this shows the sharding overhead, not a
                 speed-up (that needs one GPU per process)

Usage::

    python benchmarks/train_step.py                              # SmolLM2 alias, slow on CPU
    python benchmarks/train_step.py --model tiny --steps 2       # random tiny model, seconds
    python benchmarks/train_step.py --only learner,swap
    python benchmarks/train_step.py --model tiny --only dist --samples 32
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
MEASURES = ("learner", "swap", "rl", "dist")
REFERENCE_WORKFLOW = "examples.gsm8k.agent.MathAgent"


def emit(row: dict) -> None:
    print(json.dumps({"bench": "train_step", **row}), flush=True)


# ------------------------------------------------------------------------------ learner

def synthetic_groups(vocab_size: int, *, num_groups: int, group_size: int,
                     min_len: int, max_len: int, seed: int = 0) -> list[list]:
    """Groups of Samples with lengths uniform in [min_len, max_len] tokens, random ids,
    the loss mask on the last ~60% of each sequence (the "completion") and random rewards."""
    from areal_lite.types import Sample

    rng = random.Random(seed)
    groups = []
    for _ in range(num_groups):
        group = []
        for _ in range(group_size):
            length = rng.randint(min_len, max_len)
            prompt = max(1, int(length * 0.4))
            mask = [0] * prompt + [1] * (length - prompt)
            group.append(Sample(
                input_ids=[rng.randrange(vocab_size) for _ in range(length)],
                loss_mask=mask,
                logprobs=[-rng.uniform(0.5, 4.0) if m else 0.0 for m in mask],
                versions=[0 if m else -1 for m in mask],
                reward=float(rng.random() < 0.5), raw_reward=0.0))
        groups.append(group)
    return groups


def bench_learner(model_dir: Path, args) -> None:
    from areal_lite.config import AlgorithmConfig, LearnerConfig
    from areal_lite.models import load_causal_lm
    from areal_lite.train.learner import Learner
    from areal_lite.train.logprobs import make_microbatches, padding_fraction

    model = load_causal_lm(str(model_dir), device="cpu", dtype="float32")
    vocab = model.config.get_text_config(decoder=True).vocab_size
    groups = synthetic_groups(vocab, num_groups=args.samples // 8 or 1, group_size=8,
                              min_len=args.min_len, max_len=args.max_len)
    lengths = [len(s.input_ids) for g in groups for s in g]
    warm = synthetic_groups(vocab, num_groups=1, group_size=2, min_len=32, max_len=64, seed=1)
    for packing in (True, False):
        cfg = LearnerConfig(lr=1e-7, max_tokens_per_microbatch=args.max_tokens_per_microbatch,
                            packing=packing)
        learner = Learner(model, cfg=cfg, algo=AlgorithmConfig(), device="cpu")
        learner.train_step(warm)  # first-call allocations out of the timing
        start = time.perf_counter()
        stats = learner.train_step(groups)
        seconds = time.perf_counter() - start
        batches = make_microbatches(lengths, cfg.max_tokens_per_microbatch, packing)
        emit({"measure": "learner", "packing": packing, "tokens_per_s": sum(lengths) / seconds,
              "padding_frac": padding_fraction(lengths, batches),
              "learner_padding_frac": stats["padding_frac"], "seconds": seconds,
              "num_samples": len(lengths), "num_tokens": sum(lengths),
              "num_microbatches": len(batches),
              "max_tokens_per_microbatch": cfg.max_tokens_per_microbatch})


# ------------------------------------------------------------------------- weight swap

def plain_copy_s(sources: list[torch.Tensor], buffers: list[torch.Tensor]) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        for dst, src in zip(buffers, sources, strict=True):
            dst.copy_(src)
    return time.perf_counter() - start


async def _swap_times(model, repeats: int) -> list[float]:
    from areal_lite.engine.local.engine import LocalEngine
    from areal_lite.train.weight_sync import swap_weights

    times = []
    async with LocalEngine(copy.deepcopy(model).eval()) as engine:  # started: as in Trainer
        for version in range(1, repeats + 1):
            start = time.perf_counter()
            await swap_weights(engine, model, version)
            times.append(time.perf_counter() - start)
        assert engine.version == repeats
    return times


def bench_swap(model_dir: Path, repeats: int = 3) -> None:
    from areal_lite.models import load_causal_lm, named_weights

    model = load_causal_lm(str(model_dir), device="cpu", dtype="float32")
    sources = [t for _, t in named_weights(model)]
    buffers = [torch.empty_like(t) for t in sources]
    swap = min(asyncio.run(_swap_times(model, repeats)))
    plain = min(plain_copy_s(sources, buffers) for _ in range(repeats))
    emit({"measure": "weight_swap", "swap_s": swap, "plain_copy_s": plain,
          "ratio": swap / plain if plain > 0 else float("inf"),
          "bytes": sum(t.numel() * t.element_size() for t in sources),
          "num_tensors": len(sources), "repeats": repeats})


# ----------------------------------------------------------------------------- RL step

def reference_config(model_path: str, run_dir: Path, eta: int, steps: int):
    """The fixed reference configuration of issue 4, with staleness bound `eta`."""
    from areal_lite.config_toml import loads_config

    return loads_config("", [
        f"actor.path={model_path}", "actor.device=cpu", "actor.dtype=float32",
        f"run_dir={run_dir}", "experiment_name=bench-train-step",
        f"trial_name=eta{eta}-{time.strftime('%Y%m%d-%H%M%S')}",  # never resume an old run
        f"workflow={REFERENCE_WORKFLOW}", "rollout.backend=local",
        "rollout.batch_size=8", "rollout.group_size=8", f"rollout.max_head_offpolicyness={eta}",
        "rollout.sampling.max_new_tokens=96", "rollout.sampling.temperature=1.0",
        "rollout.agent.agent_kwargs={max_tokens=96, temperature=1.0}",
        "rollout.local.max_batch_size=64",
        "data.train=arithmetic:2000:levels=1", "data.eval=",
        "train.lr=1e-5", "train.ppo_epochs=1", "train.num_minibatches=1",
        "algorithm.kl_coef=0", f"trainer.total_steps={steps}", "trainer.eval_every=0",
        "trainer.save_every=0", "metrics.log_every=1", "metrics.plots=false",
        "metrics.progress=false"])


def step_rows(metrics_path: Path) -> list[dict]:
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    return sorted((r for r in rows if "time/step_s" in r), key=lambda r: r["step"])


def bench_rl(model_path: str, run_dir: Path, steps: int) -> None:
    from areal_lite.trainer import Trainer

    for eta in (0, 2):
        trainer = Trainer(reference_config(model_path, run_dir, eta, steps))
        trainer.train()
        rows = step_rows(trainer.run_dir / "metrics.jsonl")
        if len(rows) != steps:
            raise RuntimeError(f"expected {steps} step rows in {trainer.run_dir}/metrics.jsonl, "
                               f"found {len(rows)}; is metrics.log_every > 1?")
        timed = rows[1:] if len(rows) > 1 else rows  # step 1 warms up caches and threads

        def mean(key: str, timed=timed) -> float:
            return sum(r[key] for r in timed) / len(timed)

        emit({"measure": "rl_step", "mode": "sync" if eta == 0 else "async",
              "max_head_offpolicyness": eta, "seconds_per_step": mean("time/step_s"),
              "generation_s": mean("time/generation_s"), "update_s": mean("time/update_s"),
              "weight_swap_s": mean("time/weight_swap_s"), "steps_timed": len(timed),
              "model": model_path, "run_dir": str(trainer.run_dir)})


# ------------------------------------------------------------------- 1 vs 2 processes

def dist_worker(model_dir: str, args) -> None:
    """One rank under torchrun: a warm-up step, a timed step, a timed full export."""
    from areal_lite.config import AlgorithmConfig, LearnerConfig
    from areal_lite.models import load_causal_lm
    from areal_lite.train.distributed import full_state_dict, init_dist
    from areal_lite.train.learner import Learner

    d = init_dist("cpu")
    model = load_causal_lm(model_dir, device="cpu", dtype="float32")
    vocab = model.config.get_text_config(decoder=True).vocab_size
    groups = synthetic_groups(vocab, num_groups=args.samples // 8 or 1, group_size=8,
                              min_len=args.min_len, max_len=args.max_len)
    warm = synthetic_groups(vocab, num_groups=1, group_size=2, min_len=32, max_len=64, seed=1)
    cfg = LearnerConfig(lr=1e-7, max_tokens_per_microbatch=args.max_tokens_per_microbatch)
    learner = Learner(model, cfg=cfg, algo=AlgorithmConfig(), device="cpu", dist=d)
    learner.train_step(warm)
    torch.distributed.barrier()
    start = time.perf_counter()
    learner.train_step(groups)
    step_s = time.perf_counter() - start
    torch.distributed.barrier()
    start = time.perf_counter()
    weights = list(full_state_dict(learner.model, keep=d.is_leader))
    export_s = time.perf_counter() - start
    if d.is_leader:
        tokens = sum(len(s.input_ids) for g in groups for s in g)
        emit({"measure": "dist", "processes": d.world, "tokens_per_s": tokens / step_s,
              "step_s": step_s, "export_s": export_s, "num_tokens": tokens,
              "threads_per_process": torch.get_num_threads(),
              "export_bytes": sum(t.numel() * t.element_size() for _, t in weights)})
    torch.distributed.destroy_process_group()


def bench_dist(model_dir: Path, args) -> None:
    import subprocess

    rows = {}
    for n in (1, 2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={n}", __file__, "--dist-worker", str(model_dir),
               "--samples", str(args.samples), "--min-len", str(args.min_len),
               "--max-len", str(args.max_len),
               "--max-tokens-per-microbatch", str(args.max_tokens_per_microbatch)]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=True)
        [row] = [json.loads(x) for x in out.stdout.splitlines() if x.startswith("{")]
        rows[n] = row
        print(json.dumps(row), flush=True)
    emit({"measure": "dist_ratio", "tokens_per_s_2_over_1":
          rows[2]["tokens_per_s"] / rows[1]["tokens_per_s"],
          "export_s_2_over_1": rows[2]["export_s"] / max(rows[1]["export_s"], 1e-9),
          "cpu_cores": os.cpu_count(), "threads_per_process": rows[2]["threads_per_process"],
          "note": "CPU gloo: 2 processes share this machine's cores; any gain is more "
                  "threads in use, not sharding (that needs one GPU per process)"})


# -------------------------------------------------------------------------------- main

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct",
                   help='HF dir, hub id or alias; "tiny" = a random tiny model in a tmp dir')
    p.add_argument("--steps", type=int, default=3, help="RL steps per mode (step 1 = warm-up)")
    p.add_argument("--only", default=",".join(MEASURES), help="comma list of learner,swap,rl")
    p.add_argument("--run-dir", type=Path, default=None, help="RL run root (tmp by default)")
    p.add_argument("--samples", type=int, default=64, help="learner: samples in the batch")
    p.add_argument("--min-len", type=int, default=40, help="learner: shortest sample, tokens")
    p.add_argument("--max-len", type=int, default=400, help="learner: longest sample, tokens")
    p.add_argument("--max-tokens-per-microbatch", type=int, default=4096,
                   help="learner: padded tokens per forward (same for packing on and off)")
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch default")
    p.add_argument("--dist-worker", default="", help=argparse.SUPPRESS)  # one torchrun rank
    args = p.parse_args(argv)
    args.only = [m.strip() for m in args.only.split(",") if m.strip()]
    unknown = set(args.only) - set(MEASURES)
    if unknown:
        p.error(f"--only takes a comma list of {','.join(MEASURES)}; got {sorted(unknown)}")
    if args.steps < 1 or not 1 <= args.min_len <= args.max_len:
        p.error("need --steps >= 1 and 1 <= --min-len <= --max-len")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if str(REPO_ROOT) not in sys.path:  # the reference workflow lives in examples/
        sys.path.insert(0, str(REPO_ROOT))
    from areal_lite.models import resolve_model_dir
    from areal_lite.testing.tiny import make_tiny_model_dir

    if args.dist_worker:
        dist_worker(args.dist_worker, args)
        return
    with tempfile.TemporaryDirectory(prefix="areal-lite-bench-") as tmp:
        model_path = str(make_tiny_model_dir(Path(tmp) / "tiny")) if args.model == "tiny" \
            else args.model
        model_dir = Path(resolve_model_dir(model_path))
        if "learner" in args.only:
            bench_learner(model_dir, args)
        if "swap" in args.only:
            bench_swap(model_dir)
        if "rl" in args.only:
            bench_rl(model_path, args.run_dir or Path(tmp) / "runs", args.steps)
        if "dist" in args.only:
            bench_dist(model_dir, args)


if __name__ == "__main__":
    main()
