"""Benchmark: the CUDA path measured once, in one command, on a lent GPU (issue 16).

Every item runs in its own child process with a time limit (a CUDA crash or hang costs
that item only), under one overall budget, and prints JSON lines tagged
`"bench": "gpu_check"`; each item ends with an `{"item": ..., "ok": ..., "seconds": ...}`
line (`"error"`: the tail of its stderr).

    env               torch / transformers / CUDA versions, the device's name and memory
    tests             pytest -m gpu (tests/engine/test_cuda.py: engine greedy == HF generate
                      on cuda in fp32 and bf16, weight swap, learner step cuda == cpu)
    models            random-weight checkpoints with the configs of SmolLM2-135M and of
                      a 1.5B Qwen2 (Qwen2.5-1.5B's shape), the tiny tokenizer (a random
                      model's ids need no real vocabulary); --device cpu: the tiny model
    engine_<preset>   benchmarks/engine_throughput.py in bf16: local engine vs HF
                      `generate`, tok/s at 1, 8, 32, 64, 256 concurrent, greedy compared
    learner_<preset>  one bf16-autocast `Learner.train_step` (fp32 master weights, AdamW)
                      on 64 samples of 128-512 tokens: tokens/s and MFU = 6 x params x
                      tokens (+ attention) / s / the device's dense bf16 peak
    swap              `swap_weights` into a started `LocalEngine` vs a plain device copy
                      of the same tensors (torch.cuda.synchronize around both), best of 5
    rl_step           the colocated Trainer on the reference RL config (8 prompts x 8,
                      96 new tokens; benchmarks/train_step.py) with the random 135M on one
                      device: engine bf16, learner bf16 autocast; sync and async

Usage::

    python benchmarks/gpu_check.py                      # cuda, ~6-8 min on one H200
    python benchmarks/gpu_check.py --device cpu         # tiny sizes, seconds-minutes (CI)
    python benchmarks/gpu_check.py --only env,swap
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
ITEMS = ("env", "tests", "models", "engine", "learner", "swap", "rl_step")
# Dense bf16 tensor-core peaks (no sparsity), FLOP/s, by a substring of the device name.
BF16_PEAK = {"H200": 989e12, "H100": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12,
             "L40S": 362e12, "L4": 121e12, "A10G": 70e12, "RTX 4090": 165e12}
PRESETS = {  # name -> (transformers config class, config kwargs)
    "smollm2-135m": ("LlamaConfig", dict(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
        rms_norm_eps=1e-5, tie_word_embeddings=True)),
    "qwen2-1.5b": ("Qwen2Config", dict(
        vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
        num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
        rms_norm_eps=1e-6, tie_word_embeddings=True)),
}


def emit(row: dict) -> None:
    print(json.dumps({"bench": "gpu_check", **row}), flush=True)


def sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# ------------------------------------------------------------------------ the items

def item_env(args) -> None:
    import torch
    import transformers

    row = {"torch": torch.__version__, "transformers": transformers.__version__,
           "python": sys.version.split()[0], "cuda_available": torch.cuda.is_available(),
           "device": args.device, "threads": torch.get_num_threads()}
    if args.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        row |= {"device_name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                "capability": f"{props.major}.{props.minor}", "cuda": torch.version.cuda,
                "bf16_supported": torch.cuda.is_bf16_supported(),
                "bf16_peak_flops": bf16_peak(props.name)}
    emit({"item": "env", **row})


def bf16_peak(name: str) -> float | None:
    return next((peak for key, peak in BF16_PEAK.items() if key in name), None)


def item_tests(args) -> None:
    import xml.etree.ElementTree as ET

    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "junit.xml"
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p",
                               "no:cacheprovider", f"--junitxml={report}",
                               str(REPO_ROOT / "tests" / "engine" / "test_cuda.py")],
                              cwd=REPO_ROOT, capture_output=True, text=True)
        suite = ET.parse(report).getroot().iter("testsuite").__next__()
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    emit({"item": "tests", **counts, "exit_code": proc.returncode,
          "tail": proc.stdout.strip().splitlines()[-1:]})
    if proc.returncode not in (0, 5):  # 5 = nothing collected
        raise SystemExit(proc.stdout[-3000:])


def preset_names(args) -> list[str]:
    return ["tiny"] if args.device == "cpu" else list(PRESETS)


def model_dir(args, preset: str) -> Path:
    return Path(args.work_dir) / preset


def item_models(args) -> None:
    import torch
    import transformers

    from areal_lite.testing.tiny import make_tiny_model_dir, make_tiny_tokenizer

    for preset in preset_names(args):
        start = time.perf_counter()
        path = model_dir(args, preset)
        if preset == "tiny":
            make_tiny_model_dir(path)
        else:
            tok = make_tiny_tokenizer()
            cls_name, kwargs = PRESETS[preset]
            config = getattr(transformers, cls_name)(
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                bos_token_id=None, **kwargs)
            torch.manual_seed(0)
            with torch.device(args.device):  # random init on the GPU: seconds, not minutes
                model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
            model.generation_config.eos_token_id = tok.eos_token_id
            model.generation_config.pad_token_id = tok.pad_token_id
            model.save_pretrained(path)
            tok.save_pretrained(path)
            del model
        emit({"item": "models", "preset": preset, "path": str(path),
              "seconds": round(time.perf_counter() - start, 2)})


def item_engine(args, preset: str) -> None:
    cpu = args.device == "cpu"
    cmd = [sys.executable, str(BENCH_DIR / "engine_throughput.py"),
           "--model", str(model_dir(args, preset)), "--device", args.device,
           "--dtype", "float32" if cpu else "bfloat16",
           "--concurrency", "1,4" if cpu else "1,8,32,64,256", "--waves", "1",
           "--max-new-tokens", "4" if cpu else "64", "--repeats", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            emit({"item": f"engine_{preset}", "script": row.pop("bench"), **row})
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])


def model_flops(model, lengths: list[int]) -> float:
    """Training FLOPs of one forward+backward: 6 x the params of every matmul (the
    layers and lm_head; the input embedding is a lookup) x tokens, plus causal attention,
    6 x layers x hidden x sum(len^2) (the PaLM appendix count, halved for the mask)."""
    cfg = model.config.get_text_config(decoder=True)
    lookup = 0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size
    matmul_params = sum(p.numel() for p in model.parameters()) - lookup
    return (6 * matmul_params * sum(lengths)
            + 6 * cfg.num_hidden_layers * cfg.hidden_size * sum(n * n for n in lengths))


def item_learner(args, preset: str) -> None:
    import torch
    from train_step import synthetic_groups

    from areal_lite.config import AlgorithmConfig, LearnerConfig
    from areal_lite.models import load_causal_lm
    from areal_lite.train.learner import Learner

    cpu = args.device == "cpu"
    model = load_causal_lm(model_dir(args, preset), device=args.device, dtype="float32")
    vocab = model.config.get_text_config(decoder=True).vocab_size
    groups = synthetic_groups(vocab, num_groups=1 if cpu else 8, group_size=4 if cpu else 8,
                              min_len=16 if cpu else 128, max_len=48 if cpu else 512)
    lengths = [len(s.input_ids) for g in groups for s in g]
    dtype = torch.float32 if cpu else torch.bfloat16
    learner = Learner(model, cfg=LearnerConfig(lr=1e-7, max_tokens_per_microbatch=16384),
                      algo=AlgorithmConfig(), device=args.device, dtype=dtype)
    learner.train_step(groups[:1])  # warm-up: kernels, allocator, AdamW state
    sync(args.device)
    start = time.perf_counter()
    stats = learner.train_step(groups)
    sync(args.device)
    seconds = time.perf_counter() - start
    flops = model_flops(model, lengths)
    peak = bf16_peak(torch.cuda.get_device_name(0)) if not cpu else None
    emit({"item": f"learner_{preset}", "dtype": str(dtype), "tokens_per_s": sum(lengths) / seconds,
          "seconds": seconds, "num_tokens": sum(lengths), "num_samples": len(lengths),
          "tflops_per_s": flops / seconds / 1e12, "mfu": flops / seconds / peak if peak else None,
          "bf16_peak_flops": peak, "padding_frac": stats["padding_frac"],
          "loss_finite": bool(torch.isfinite(torch.tensor(stats["loss"])))})


def item_swap(args) -> None:
    import asyncio
    import copy

    import torch

    from areal_lite.engine.local.engine import LocalEngine
    from areal_lite.models import load_causal_lm, named_weights
    from areal_lite.train.weight_sync import swap_weights

    preset = preset_names(args)[0]
    model = load_causal_lm(model_dir(args, preset), device=args.device,
                           dtype="float32" if args.device == "cpu" else "bfloat16")
    sources = [t for _, t in named_weights(model)]
    buffers = [torch.empty_like(t) for t in sources]

    def plain_copy() -> float:
        sync(args.device)
        start = time.perf_counter()
        with torch.no_grad():
            for dst, src in zip(buffers, sources, strict=True):
                dst.copy_(src)
        sync(args.device)
        return time.perf_counter() - start

    async def swaps() -> list[float]:
        times = []
        async with LocalEngine(copy.deepcopy(model).eval(), device=args.device) as engine:
            for version in range(1, 6):
                sync(args.device)
                start = time.perf_counter()
                await swap_weights(engine, model, version)
                sync(args.device)
                times.append(time.perf_counter() - start)
        return times

    swap = min(asyncio.run(swaps()))
    plain = min(plain_copy() for _ in range(5))
    emit({"item": "swap", "preset": preset, "swap_s": swap, "plain_copy_s": plain,
          "ratio": swap / plain if plain > 0 else None,
          "bytes": sum(t.numel() * t.element_size() for t in sources), "repeats": 5})


def item_rl_step(args) -> None:
    from train_step import reference_config, step_rows

    from areal_lite.config_toml import config_to_toml, loads_config
    from areal_lite.trainer import Trainer

    cpu = args.device == "cpu"
    preset = preset_names(args)[0]
    steps = 2 if cpu else 3
    small = ["rollout.batch_size=2", "rollout.group_size=2", "rollout.sampling.max_new_tokens=4",
             "rollout.agent.agent_kwargs={max_tokens=4, temperature=1.0}"] if cpu else []
    for eta in (0, 2):
        base = reference_config(str(model_dir(args, preset)), Path(args.work_dir) / "runs", eta,
                                steps)
        cfg = loads_config(config_to_toml(base), [
            f"actor.device={args.device}", f"actor.dtype={'float32' if cpu else 'bfloat16'}",
            *small])
        trainer = Trainer(cfg)
        trainer.train()
        rows = step_rows(trainer.run_dir / "metrics.jsonl")
        timed = rows[1:] or rows
        emit({"item": "rl_step", "preset": preset, "max_head_offpolicyness": eta,
              "seconds_per_step": sum(r["time/step_s"] for r in timed) / len(timed),
              "generation_s": sum(r["time/generation_s"] for r in timed) / len(timed),
              "update_s": sum(r["time/update_s"] for r in timed) / len(timed),
              "weight_swap_s": sum(r["time/weight_swap_s"] for r in timed) / len(timed),
              "trained_tokens_per_step": sum(r["train/num_tokens"] for r in timed) / len(timed),
              "steps": len(rows), "steps_timed": len(timed)})


# ------------------------------------------------------------------ parent / children

def run_item(args, name: str) -> None:
    """Child: one item (per preset where it has them)."""
    sys.path[:0] = [str(BENCH_DIR), str(REPO_ROOT)]  # train_step.py, examples/
    if name in ("engine", "learner"):
        for preset in preset_names(args):
            {"engine": item_engine, "learner": item_learner}[name](args, preset)
    else:
        globals()[f"item_{name}"](args)


TIMEOUT_S = {"env": 60, "tests": 120, "models": 120, "engine": 240, "learner": 90,
             "swap": 60, "rl_step": 180}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.item:
        run_item(args, args.item)
        return 0
    deadline = time.monotonic() + args.budget_s
    failed = 0
    with tempfile.TemporaryDirectory(prefix="areal-lite-gpu-check-") as tmp:
        work = args.work_dir or tmp
        for name in args.only:
            left = deadline - time.monotonic()
            if left < 5:
                emit({"item": name, "ok": False, "error": "overall budget spent", "seconds": 0})
                failed += 1
                continue
            cmd = [sys.executable, __file__, "--item", name, "--device", args.device,
                   "--work-dir", work]
            start = time.perf_counter()
            try:
                proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, timeout=min(TIMEOUT_S[name], left))
                out, err, rc = proc.stdout, proc.stderr, proc.returncode
            except subprocess.TimeoutExpired as e:
                out, err, rc = e.stdout or "", f"timed out after {e.timeout:.0f} s", -9
                out = out.decode() if isinstance(out, bytes) else out
            for line in out.splitlines():
                if line.startswith('{"bench": "gpu_check"'):
                    print(line, flush=True)
            row = {"item": name, "ok": rc == 0, "seconds": round(time.perf_counter() - start, 2)}
            if rc:
                failed += 1
                row["error"] = err[-2000:]
            emit(row)
    return 1 if failed else 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cpu = tiny sizes, to keep the script working without a GPU")
    p.add_argument("--only", default=",".join(ITEMS), help=f"comma list of {','.join(ITEMS)}")
    p.add_argument("--budget-s", type=float, default=470.0, help="overall time limit, seconds")
    p.add_argument("--work-dir", default=None, help="models and runs (a tmp dir by default)")
    p.add_argument("--item", choices=ITEMS, help=argparse.SUPPRESS)  # child mode
    args = p.parse_args(argv)
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    if set(args.only) - set(ITEMS):
        p.error(f"--only takes a comma list of {','.join(ITEMS)}; got {args.only}")
    needs_models = {"engine", "learner", "swap", "rl_step"} & set(args.only)
    if needs_models and "models" not in args.only and not args.work_dir and not args.item:
        p.error(f"{sorted(needs_models)} need the models item (or --work-dir holding them)")
    return args


if __name__ == "__main__":
    sys.exit(main())
