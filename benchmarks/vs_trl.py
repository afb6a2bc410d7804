"""Benchmark: areal-lite's RL step next to TRL's `GRPOTrainer` on the same work, one run.

The reference configuration (issue 17): the same model, fp32 on the CPU, the same
generated arithmetic data (`arithmetic:2000:levels=1`, the MathAgent prompt, its
math-verify reward on `\\boxed{}`), `--prompts` x `--group` samples per step,
`--max-new-tokens` new tokens at temperature 1, AdamW at lr 1e-5 (betas 0.9/0.999, eps
1e-8, no weight decay, grad clip 1.0, constant schedule), no KL, one update pass per
batch, loss averaged over every sampled token of the batch (areal-lite `token_mean` ==
TRL `loss_type="dapo"`).

Sides, each in its own child process (so peak RSS and the thread pools are its own):

    areal_sync    areal-lite, rollout.max_head_offpolicyness = 0 (synchronous RL)
    areal_async   areal-lite, rollout.max_head_offpolicyness = 2
    trl           TRL GRPOTrainer (only when `trl` is installed: `pip install areal-lite[trl]`);
                  generation with Hugging Face `generate`, its default gradient
                  checkpointing unless --trl-no-gradient-checkpointing

One JSON line per side: seconds per step (median of the steps after the first),
generation (areal-lite: time waiting for the batch; TRL: `_generate_and_score_completions`)
and update (the rest of the step), trained tokens per step (sampled tokens carrying the
loss), peak RSS; then one line with the ratios to TRL.

Usage::

    python benchmarks/vs_trl.py                                  # reference config, ~25 min on 2 cores
    python benchmarks/vs_trl.py --model tiny --steps 2 --prompts 2 --group 2 --max-new-tokens 8
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
SIDES = ("areal_sync", "areal_async", "trl")
DATASET = "arithmetic:2000:levels=1"


def emit(row: dict) -> None:
    print(json.dumps({"bench": "vs_trl", **row}), flush=True)


def median_after_first(xs: list[float]) -> float:
    return statistics.median(xs[1:] if len(xs) > 1 else xs)


# ------------------------------------------------------------------------ areal-lite

def run_areal(args, eta: int) -> dict:
    from train_step import reference_config, step_rows  # benchmarks/ is on sys.path

    from areal_lite.config_toml import config_to_toml, loads_config
    from areal_lite.trainer import Trainer

    base = reference_config(args.model, Path(args.run_dir), eta, args.steps)
    cfg = loads_config(config_to_toml(base), [
        f"rollout.batch_size={args.prompts}", f"rollout.group_size={args.group}",
        f"rollout.sampling.max_new_tokens={args.max_new_tokens}",
        f"rollout.agent.agent_kwargs={{max_tokens={args.max_new_tokens}, temperature=1.0}}",
        f"rollout.local.max_batch_size={max(args.prompts * args.group, 1)}",
        f"data.train={DATASET}", f"seed={args.seed}", *args.areal_override])
    trainer = Trainer(cfg)
    trainer.train()
    rows = step_rows(trainer.run_dir / "metrics.jsonl")
    if len(rows) != args.steps:
        raise RuntimeError(f"expected {args.steps} step rows in {trainer.run_dir}, got {len(rows)}")
    return {
        "step_s": [r["time/step_s"] for r in rows],
        "generation_s": [r["time/generation_s"] for r in rows],
        "update_s": [r["time/update_s"] + r["time/weight_swap_s"] for r in rows],
        "trained_tokens": [r["train/num_tokens"] for r in rows],
        "reward": [r["reward/mean"] for r in rows],
        "extra": {"max_head_offpolicyness": eta,
                  "prox_forward_skipped": rows[-1].get("train/prox_forward_skipped"),
                  "run_dir": str(trainer.run_dir)},
    }


# ------------------------------------------------------------------------------- TRL

def trl_dataset(args):
    from datasets import Dataset

    from areal_lite.data.prompts import load_dataset_rows
    from examples.gsm8k.agent import build_messages

    rows = load_dataset_rows(DATASET, split="train", seed=args.seed)
    return Dataset.from_list([{"prompt": build_messages(r["question"]), "answer": r["answer"]}
                              for r in rows])


def math_reward_func(completions, answer, **_) -> list[float]:
    """TRL reward function: the MathAgent's reward on each completion's text."""
    from areal_lite.data.rewards import math_reward

    return [float(math_reward(c[-1]["content"] if isinstance(c, list) else c, a))
            for c, a in zip(completions, answer, strict=True)]


def run_trl(args) -> dict:
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from areal_lite.models import load_causal_lm, load_tokenizer, resolve_model_dir

    model_dir = resolve_model_dir(args.model)
    tokenizer = load_tokenizer(model_dir)
    n = args.prompts * args.group
    config = GRPOConfig(
        output_dir=str(Path(args.run_dir) / "trl"), use_cpu=True, bf16=False, fp16=False,
        per_device_train_batch_size=n, gradient_accumulation_steps=1, num_generations=args.group,
        max_completion_length=args.max_new_tokens, temperature=1.0, top_p=1.0,
        learning_rate=1e-5, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0,
        beta=0.0, num_iterations=1, loss_type="dapo", max_steps=args.steps, seed=args.seed,
        gradient_checkpointing=not args.trl_no_gradient_checkpointing,
        logging_steps=1, report_to=[], save_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0)
    model = load_causal_lm(model_dir, device="cpu", dtype="float32")
    trainer = GRPOTrainer(model=model, reward_funcs=math_reward_func, args=config,
                          train_dataset=trl_dataset(args), processing_class=tokenizer)
    rec = {"step_s": [], "generation_s": [], "trained_tokens": [], "reward": []}
    generate = trainer._generate_and_score_completions

    def timed_generate(*a, **kw):  # generation + reward scoring, inside the step
        start = time.perf_counter()
        out = generate(*a, **kw)
        rec["generation_s"].append(time.perf_counter() - start)
        rec["trained_tokens"].append(float(out["completion_mask"].sum()))
        return out

    trainer._generate_and_score_completions = timed_generate

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__):
            rec["step_s"].append(time.perf_counter() - self.start)

        def on_log(self, _args, _state, _control, logs=None, **__):
            if logs and "reward" in logs:
                rec["reward"].append(float(logs["reward"]))

    trainer.add_callback(StepTimer())
    trainer.train()
    if len(rec["step_s"]) != args.steps or len(rec["generation_s"]) != args.steps:
        raise RuntimeError(f"TRL ran {len(rec['step_s'])} steps / {len(rec['generation_s'])} "
                           f"generations, expected {args.steps} (steps_per_generation != 1?)")
    rec["update_s"] = [s - g for s, g in zip(rec["step_s"], rec["generation_s"], strict=True)]
    import trl

    rec["extra"] = {"trl_version": trl.__version__,
                    "gradient_checkpointing": config.gradient_checkpointing,
                    "loss_type": config.loss_type}
    return rec


# ----------------------------------------------------------------------- child / parent

def run_side(args) -> None:
    """Child: run one side, print its JSON line."""
    import torch

    sys.path[:0] = [str(BENCH_DIR), str(REPO_ROOT)]  # train_step.py, examples/
    from bench_support import peak_rss_mb

    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    rec = run_trl(args) if args.side == "trl" else \
        run_areal(args, 0 if args.side == "areal_sync" else 2)
    emit({"side": args.side, "seconds_per_step": median_after_first(rec["step_s"]),
          "generation_s": median_after_first(rec["generation_s"]),
          "update_s": median_after_first(rec["update_s"]),
          "trained_tokens_per_step": median_after_first(rec["trained_tokens"]),
          "step_s": rec["step_s"], "reward_mean": rec["reward"], "peak_rss_mb": peak_rss_mb(),
          "wall_s": time.perf_counter() - start, "steps": args.steps, "model": args.model,
          "prompts": args.prompts, "group": args.group, "max_new_tokens": args.max_new_tokens,
          "threads": torch.get_num_threads(), **rec["extra"]})


def trl_installed() -> bool:
    try:
        import trl  # noqa: F401
    except ImportError:
        return False
    return True


def child_argv(args, side: str, run_dir: Path) -> list[str]:
    argv = [sys.executable, __file__, "--side", side, "--model", args.model,
            "--steps", str(args.steps), "--prompts", str(args.prompts),
            "--group", str(args.group), "--max-new-tokens", str(args.max_new_tokens),
            "--seed", str(args.seed), "--threads", str(args.threads), "--run-dir", str(run_dir)]
    argv += [a for o in args.areal_override for a in ("--areal-override", o)]
    return argv + (["--trl-no-gradient-checkpointing"] if args.trl_no_gradient_checkpointing else [])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.side:
        return run_side(args)
    sides = [s for s in args.only if s != "trl" or trl_installed()]
    if "trl" in args.only and "trl" not in sides:
        emit({"side": "trl", "skipped": "trl is not installed (pip install areal-lite[trl])"})
    with tempfile.TemporaryDirectory(prefix="areal-lite-vs-trl-") as tmp:
        if args.model == "tiny":
            from areal_lite.testing.tiny import make_tiny_model_dir

            args.model = str(make_tiny_model_dir(Path(tmp) / "tiny"))
        results = {}
        for side in sides:
            proc = subprocess.run(child_argv(args, side, Path(args.run_dir or tmp) / side),
                                  stdout=subprocess.PIPE, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"side {side} failed (exit {proc.returncode}); see stderr")
            [line] = [x for x in proc.stdout.splitlines() if x.startswith('{"bench": "vs_trl"')]
            print(line, flush=True)
            results[side] = json.loads(line)
    if "trl" in results:
        trl = results["trl"]
        emit({"side": "ratio", **{f"{s}_over_trl": round(r["seconds_per_step"] /
                                                          trl["seconds_per_step"], 3)
                                   for s, r in results.items() if s != "trl"},
              "trained_tokens_per_step": {s: r["trained_tokens_per_step"]
                                          for s, r in results.items()}})


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct",
                   help='HF dir, hub id or alias; "tiny" = a random tiny model in a tmp dir')
    p.add_argument("--steps", type=int, default=4, help="steps per side (step 1 = warm-up)")
    p.add_argument("--prompts", type=int, default=8, help="prompts per step")
    p.add_argument("--group", type=int, default=8, help="samples per prompt")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch default")
    p.add_argument("--only", default=",".join(SIDES), help=f"comma list of {','.join(SIDES)}")
    p.add_argument("--run-dir", default=None, help="where runs write (tmp by default)")
    p.add_argument("--areal-override", action="append", default=[],
                   help="extra key=value for the areal-lite sides (repeatable)")
    p.add_argument("--trl-no-gradient-checkpointing", action="store_true")
    p.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)  # child mode
    args = p.parse_args(argv)
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    if set(args.only) - set(SIDES):
        p.error(f"--only takes a comma list of {','.join(SIDES)}; got {args.only}")
    if args.steps < 1 or args.prompts < 1 or args.max_new_tokens < 1 or args.group < 2:
        p.error("need --steps, --prompts, --max-new-tokens >= 1 and --group >= 2")
    return args


if __name__ == "__main__":
    main()
