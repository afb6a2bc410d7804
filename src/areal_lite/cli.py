"""Command line: `areal-lite {train,rollout} config.toml [key=value ...]`.

The only place that configures logging and picks the event loop (uvloop when
installed, asyncio otherwise).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any


def run_async(main: Coroutine[Any, Any, Any]) -> Any:
    """Run `main` on uvloop when it is installed, else on the default asyncio loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="areal-lite", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in [("train", "train the policy on the config's workflow and dataset"),
                        ("rollout", "run one batch of episodes through the proxy, print samples")]:
        c = sub.add_parser(name, help=help_)
        c.add_argument("config", help="TOML config file")
        c.add_argument("overrides", nargs="*", help="key=value overrides, e.g. rollout.group_size=8")
        c.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
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
    except ConfigError as e:
        print(f"areal-lite: {e}", file=sys.stderr)
        return 2
    if args.command == "rollout":
        from areal_lite.demo import rollout_demo

        return run_async(rollout_demo(cfg))
    from areal_lite.trainer import Trainer

    Trainer(cfg).train()
    return 0


if __name__ == "__main__":
    sys.exit(main())
