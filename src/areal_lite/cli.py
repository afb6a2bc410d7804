"""Command line: `areal-lite {train,rollout,serve} config.toml [key=value ...]`.

The config may also be given as `--config config.toml` (the reference documents' form).
`serve` is `train` with rollout.agent.mode = "online": the proxy serves agents that run
elsewhere, which open sessions through its admin routes (proxy/online.py); it logs the
base URL and where the admin key is (`{run dir}/admin_key`, mode 0600).

`rollout` runs one batch of groups through the proxy and prints what the trainer would
receive: per group the prompt and episode rewards, per exported sample its token counts
and (discounted) reward, and one sample decoded with its trained span marked.

The only place that configures logging and picks the event loop (uvloop when
installed, asyncio otherwise).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from areal_lite.runtime import run_async

if TYPE_CHECKING:
    from areal_lite.config import ExperimentConfig
    from areal_lite.types import Sample


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="areal-lite", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in [("train", "train the policy on the config's workflow and dataset"),
                        ("rollout", "run one batch of episodes through the proxy, print samples"),
                        ("serve", "train on episodes of agents outside (online mode)")]:
        c = sub.add_parser(name, help=help_)
        c.add_argument("config", nargs="?", help="TOML config file")
        c.add_argument("--config", dest="config_flag", metavar="CONFIG",
                       help="TOML config file (instead of the positional one)")
        c.add_argument("overrides", nargs="*", help="key=value overrides, e.g. rollout.group_size=8")
        c.add_argument("-v", "--verbose", action="store_true", help="debug logging")
        if name == "train":
            c.add_argument("--dry-run", action="store_true",
                           help="print the Slurm batch script (or torchrun command), start nothing")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.config_flag is not None:
        if args.config is not None:  # with --config, a first bare word is an override
            if "=" not in args.config:
                parser.error(f"the config is given twice: {args.config!r} and --config")
            args.overrides.insert(0, args.config)
        args.config = args.config_flag
    if args.config is None:
        parser.error("a TOML config file is required (positional or --config)")
    if args.command == "serve":
        args.overrides.append("rollout.agent.mode=online")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpx2", "aiohttp.access", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from areal_lite.config import ConfigError
    from areal_lite.config_toml import load_config

    # Workflows are named by dotted paths relative to where the user runs from.
    sys.path[:0] = [str(Path.cwd()), str(Path(args.config).resolve().parent)]
    try:
        cfg = load_config(args.config, args.overrides)
        if args.command == "train":  # scheduler/: submit to Slurm, or describe the launch
            from areal_lite.scheduler.slurm import submit_or_describe

            if (text := submit_or_describe(cfg, dry_run=args.dry_run)) is not None:
                print(text)
                return 0
    except ConfigError as e:
        print(f"areal-lite: {e}", file=sys.stderr)
        return 2
    if args.command == "rollout":
        return run_async(rollout_demo(cfg))
    from areal_lite.trainer import Trainer

    Trainer(cfg).train()
    return 0


# ----------------------------------------------------------------- `rollout`

def _show_sample(tokenizer, s: Sample) -> str:
    first = s.loss_mask.index(1) if 1 in s.loss_mask else len(s.input_ids)
    prompt = tokenizer.decode(s.input_ids[:first])
    trained = tokenizer.decode(s.input_ids[first:])
    return f"{prompt}[[trained>>]]{trained}"


async def rollout_demo(cfg: ExperimentConfig, workflow=None) -> int:
    """`areal-lite rollout`: one batch through the proxy, printed; 1 if every episode failed."""
    from areal_lite.data.prompts import load_dataset_rows
    from areal_lite.rollout.stack import open_rollout

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


if __name__ == "__main__":
    sys.exit(main())
