"""Benchmark: training tokens per step, `individual` vs `tree` export, on the word-problem recipe.

Runs `--episodes` real episodes of the recipe's agent (`examples/wordproblems/cpu.toml`:
the 3-turn WordProblemAgent, its sampling and data) through the proxy and the local
engine, exported as `tree`, and counts the tokens the learner would be fed (the sum of
`input_ids` lengths): tree = the samples themselves; individual = one sample per
completion, `prompt + output`, whose length is exactly its span's end in the tree
sample (each completion's prompt is the path before it). Trained (loss) tokens are the
same for both. Prints one JSON line:

    {"measure": "export_tokens", "model", "episodes", "completions_per_episode",
     "individual_tokens", "tree_tokens", "loss_tokens", "ratio_individual_vs_tree"}

Usage::

    python benchmarks/export_tokens.py --model tiny             # random tiny model, seconds
    python benchmarks/export_tokens.py --episodes 12            # SmolLM2 (the recipe's), minutes
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # the recipe's workflow lives in examples/


async def count_tokens(cfg, num_episodes: int) -> dict:
    from areal_lite.data.prompts import load_dataset_rows
    from areal_lite.rollout.stack import open_rollout

    rows = load_dataset_rows(cfg.data.train, split="train", seed=cfg.seed)[:num_episodes]
    async with open_rollout(cfg) as stack:
        episodes = await asyncio.gather(*(stack.controller.run_episode(r) for r in rows))
    samples = [s for ep in episodes for s in ep.samples]
    spans = [sp for s in samples for sp in s.spans]
    return {"episodes": len(episodes),
            "completions_per_episode": len(spans) / max(1, len(episodes)),
            "individual_tokens": sum(sp.end for sp in spans),
            "tree_tokens": sum(len(s.input_ids) for s in samples),
            "loss_tokens": sum(sum(s.loss_mask) for s in samples)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="examples/wordproblems/cpu.toml")
    ap.add_argument("--model", default="", help='HF dir or alias; "tiny" = a random tiny '
                    "model in a tmp dir; default: the config's actor.path")
    ap.add_argument("--episodes", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    from areal_lite.config_toml import load_config

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model == "tiny":
            from areal_lite.testing.tiny import make_tiny_model_dir

            model = str(make_tiny_model_dir(Path(tmp) / "tiny-model"))
        overrides = ["rollout.agent.export_style=tree", f"seed={args.seed}",
                     f"run_dir={json.dumps(tmp)}"]
        if model:
            overrides.append(f"actor.path={json.dumps(model)}")
        cfg = load_config(REPO_ROOT / args.config, overrides)
        out = asyncio.run(count_tokens(cfg, args.episodes))
    out = {"measure": "export_tokens", "model": args.model or cfg.actor.path, **out,
           "ratio_individual_vs_tree": round(out["individual_tokens"] / max(1, out["tree_tokens"]), 3)}
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
