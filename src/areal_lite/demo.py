"""`areal-lite rollout config.toml`: one batch of groups through the proxy, printed.

Shows what the trainer would receive: per group the prompt and episode rewards, per
exported sample its token counts and (discounted) reward, and one sample decoded with
its trained span marked.
"""

from __future__ import annotations

import asyncio
import json
import time

from areal_lite.config import ExperimentConfig
from areal_lite.data import load_dataset_rows
from areal_lite.stack import open_rollout
from areal_lite.types import Sample


def _show_sample(tokenizer, s: Sample) -> str:
    first = s.loss_mask.index(1) if 1 in s.loss_mask else len(s.input_ids)
    prompt = tokenizer.decode(s.input_ids[:first])
    trained = tokenizer.decode(s.input_ids[first:])
    return f"{prompt}[[trained>>]]{trained}"


async def rollout_demo(cfg: ExperimentConfig, workflow=None) -> int:
    rows = load_dataset_rows(cfg.data.train, split="train", seed=cfg.seed)[: cfg.rollout.batch_size]
    start = time.perf_counter()
    async with open_rollout(cfg, workflow) as stack:
        groups = await asyncio.gather(*(stack.controller.run_group(r, cfg.rollout.group_size)
                                        for r in rows))
        stats = stack.controller.stats
        proxy_stats = stack.proxy.stats()
        tokenizer = stack.tokenizer
    elapsed = time.perf_counter() - start
    samples = [s for g in groups for s in g.samples]
    for i, g in enumerate(groups):
        rewards = [None if ep.reward is None else round(ep.reward, 3) for ep in g.episodes]
        print(f"group {i}: {str(g.data.get('question', g.data))[:70]!r} rewards={rewards}")
        for s in g.samples:
            print(f"   sample {s.episode_id}: {len(s.input_ids)} tokens, "
                  f"{sum(s.loss_mask)} trained, reward {s.reward:.3f}")
    if samples:
        print("\nfirst sample, decoded:\n" + _show_sample(tokenizer, samples[0]))
    print(json.dumps({"groups": len(groups), "episodes": stats.num_episodes,
                      "failed": stats.num_failed, "samples": len(samples),
                      "output_tokens": sum(sum(s.loss_mask) for s in samples),
                      "prefix_breaks": proxy_stats["prefix_breaks"],
                      "seconds": round(elapsed, 2)}))
    return 0 if stats.num_failed < stats.num_episodes else 1
