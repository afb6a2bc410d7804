"""Benchmark: does asynchronous RL cost accuracy? The CPU recipe at several staleness bounds.

Runs the word-problem recipe (`examples/wordproblems/cpu.toml` by default) once per
`rollout.max_head_offpolicyness` in `--etas` (0 = synchronous RL, the baseline), each for
the same number of steps with the same seed, one after the other, each in a fresh child
process (a run left in the process slows the next: one process held 16 GB after two
runs), and prints one JSON line per (eta, step) and one summary line per eta:

    {"measure": "step", "eta", "step", "wall_s" (since the run started, loading
     included), "step_s", "reward_mean", "eval_first_try", "eval_within_3",
     "eval_accuracy"}                                   (eval_* on eval steps only)
    {"measure": "run", "eta", "steps", "wall_s" (load to last eval), "step_s_total" (the
     steps alone: waiting for rollouts + update + swap, evals left out), "eval_s_total",
     "final_first_try", "final_within_3", "wall_ratio_vs_sync", "step_s_ratio_vs_sync",
     "first_try_delta_vs_sync"}

`wall_s` is the fair comparison: with eta > 0 rollouts for later steps keep running
while an eval runs, so the evals take longer and the steps less.

The eval is greedy on the recipe's held-out split, every `--eval-every` steps (and at
step 0); `--eval-rows` caps it so per-step evals stay affordable.

Usage::

    python benchmarks/async_vs_sync.py                          # SmolLM2, 2 CPU cores: long
    python benchmarks/async_vs_sync.py --steps 20 --eval-every 5 --etas 0,2,8
    python benchmarks/async_vs_sync.py --model tiny --steps 2   # random tiny model, seconds
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # the recipe's workflow lives in examples/


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def run_one(args: argparse.Namespace, model: str, run_dir: Path, eta: int) -> list[dict]:
    """One training run at staleness bound `eta`; its step rows with wall times."""
    from areal_lite.trainer import Trainer

    overrides = [f"actor.path={json.dumps(model)}", f"run_dir={json.dumps(str(run_dir))}",
                 f"trial_name=eta{eta}", f"rollout.max_head_offpolicyness={eta}",
                 f"seed={args.seed}", f"trainer.total_steps={args.steps}",
                 f"trainer.eval_every={args.eval_every}", "trainer.save_every=0",
                 f"trainer.max_eval_prompts={args.eval_rows}", "metrics.log_every=1",
                 "metrics.plots=false", "metrics.progress=false", *args.set]
    trainer = Trainer(REPO_ROOT / args.config if not Path(args.config).is_absolute()
                      else Path(args.config), overrides)
    start = time.time()
    trainer.train()
    lines = (trainer.run_dir / "metrics.jsonl").read_text().splitlines()
    by_step: dict[int, dict] = {}
    for line in lines:
        if line.strip():
            record = json.loads(line)
            by_step.setdefault(record["step"], {}).update(record)
    return [{**by_step[s], "wall_s": by_step[s]["time"] - start} for s in sorted(by_step)]


def summarize(eta: int, rows: list[dict], baseline: dict | None) -> dict:
    steps = [r for r in rows if "time/step_s" in r]
    evals = [r for r in rows if "eval/first_try" in r]
    out = {"measure": "run", "eta": eta, "steps": len(steps),
           "wall_s": rows[-1]["wall_s"] if rows else 0.0,
           "step_s_total": sum(r["time/step_s"] for r in steps),
           "eval_s_total": sum(r.get("eval/time_s", 0.0) for r in evals),
           "final_first_try": evals[-1]["eval/first_try"] if evals else None,
           "final_within_3": evals[-1]["eval/within_3"] if evals else None}
    if baseline is not None:
        out["wall_ratio_vs_sync"] = out["wall_s"] / baseline["wall_s"] if baseline["wall_s"] else None
        out["step_s_ratio_vs_sync"] = (out["step_s_total"] / baseline["step_s_total"]
                                       if baseline["step_s_total"] else None)
        if out["final_first_try"] is not None and baseline["final_first_try"] is not None:
            out["first_try_delta_vs_sync"] = out["final_first_try"] - baseline["final_first_try"]
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="examples/wordproblems/cpu.toml", help="the recipe")
    p.add_argument("--model", default="smollm2-135m-instruct",
                   help='HF dir, hub id or alias; "tiny" = a random tiny model in a tmp dir')
    p.add_argument("--etas", default="0,2,8", help="comma list of max_head_offpolicyness; 0 first")
    p.add_argument("--steps", type=int, default=20, help="RL steps per run")
    p.add_argument("--eval-every", type=int, default=5, help="steps between greedy evals")
    p.add_argument("--eval-rows", type=int, default=0, help="eval rows per eval; 0 = all")
    p.add_argument("--seed", type=int, default=1, help="the same seed for every run")
    p.add_argument("--run-dir", type=Path, default=None, help="runs root (tmp by default)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config override for every run (repeatable)")
    p.add_argument("--child-eta", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.etas = [int(x) for x in args.etas.split(",")]
    if args.etas[0] != 0:
        p.error("--etas must start with 0: the synchronous run is the baseline")
    return args


_ROW = "avs-row "  # marks the child's rows among whatever else it prints


def run_child(argv: list[str], model: str, root: Path, eta: int) -> list[dict]:
    """`run_one` in a fresh interpreter; its rows come back as JSON on stdout."""
    cmd = [sys.executable, __file__, *argv, "--model", model, "--run-dir", str(root),
           "--child-eta", str(eta)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"the eta={eta} run failed (exit {proc.returncode}); see above")
    return [json.loads(line[len(_ROW):]) for line in proc.stdout.splitlines()
            if line.startswith(_ROW)]


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.child_eta is not None:  # child mode: one run, its rows on stdout
        for row in run_one(args, args.model, args.run_dir, args.child_eta):
            print(_ROW + json.dumps(row), flush=True)
        return
    with tempfile.TemporaryDirectory(prefix="async-vs-sync-") as tmp:
        root = args.run_dir or Path(tmp)
        model = args.model
        if model == "tiny":
            from areal_lite.testing.tiny import make_tiny_model_dir

            model = str(make_tiny_model_dir(Path(tmp) / "tiny-model"))
        baseline = None
        for eta in args.etas:
            rows = run_child(argv, model, root, eta)
            for r in rows:
                emit({"measure": "step", "eta": eta, "step": r["step"], "wall_s": r["wall_s"],
                      "step_s": r.get("time/step_s"), "reward_mean": r.get("reward/mean"),
                      "eval_first_try": r.get("eval/first_try"),
                      "eval_within_3": r.get("eval/within_3"),
                      "eval_accuracy": r.get("eval/accuracy")})
            summary = summarize(eta, rows, baseline)
            baseline = baseline or summary
            emit(summary)


if __name__ == "__main__":
    main()
