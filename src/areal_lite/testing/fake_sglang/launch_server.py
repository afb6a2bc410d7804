"""engine/ fake SGLang, command line: `python -m areal_lite.testing.fake_sglang.launch_server`.

Takes the flags the run passes to `python -m sglang.launch_server` (model path, host,
port, tp size, memory fraction, RL flags; protocol section 7), so the launcher is
tested by really launching this as a subprocess. An unknown flag is an error, as in
SGLang. Flags of the fake alone (`--fake-*`) drive failure tests: crash (exit without
cleanup, like a killed server) or stall (stop answering) after N `/generate` requests,
start slowly, or never become healthy.

When `--model-path` is an HF checkpoint directory, the vocabulary size, eos token and
context length come from its `config.json`, so tokens decode with its tokenizer.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from areal_lite.testing.fake_sglang.server import FAKE_STATE, build_fake_sglang_app

__all__ = ["build_parser", "main"]

READY_LINE = "The server is fired up and ready to roll!"  # SGLang's own line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fake_sglang.launch_server", allow_abbrev=False)
    p.add_argument("--model-path", required=True)
    p.add_argument("--tokenizer-path")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--tp-size", "--tp", type=int, default=1)
    p.add_argument("--dp-size", type=int, default=1)
    p.add_argument("--base-gpu-id", type=int, default=0)
    p.add_argument("--mem-fraction-static", type=float)
    p.add_argument("--context-length", type=int)
    p.add_argument("--served-model-name")
    p.add_argument("--api-key")
    p.add_argument("--weight-version", default="default")
    p.add_argument("--random-seed", type=int)
    p.add_argument("--log-level", default="info")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--trust-remote-code", action="store_true")
    for flag in ("--enable-memory-saver", "--enable-weights-cpu-backup",
                 "--skip-tokenizer-init", "--disable-radix-cache",
                 "--enable-deterministic-inference", "--enable-metrics"):
        p.add_argument(flag, action="store_true")
    fake = p.add_argument_group("fake only")
    fake.add_argument("--fake-crash-after", type=int, default=0,
                      help="exit at once (code 17) on the Nth /generate request")
    fake.add_argument("--fake-stall-after", type=int, default=0,
                      help="stop answering any request from the Nth /generate on")
    fake.add_argument("--fake-startup-delay-s", type=float, default=0.0)
    fake.add_argument("--fake-unhealthy", action="store_true",
                      help="/health and /health_generate answer 503 forever")
    fake.add_argument("--fake-latency-s", type=float, default=0.0, help="per token")
    fake.add_argument("--fake-eos-prob", type=float, default=0.1)
    return p


def _model_facts(model_path: str) -> dict[str, Any]:
    """vocab_size / eos_token_id / max_context_len of an HF dir (defaults otherwise)."""
    facts: dict[str, Any] = {"vocab_size": 1024, "eos_token_id": 2, "max_context_len": 4096}
    config = Path(model_path) / "config.json"
    if config.is_file():
        c = json.loads(config.read_text())
        facts["vocab_size"] = int(c.get("vocab_size", facts["vocab_size"]))
        eos = c.get("eos_token_id", facts["eos_token_id"])
        facts["eos_token_id"] = int(eos[0] if isinstance(eos, list) else eos)
        facts["max_context_len"] = int(c.get("max_position_embeddings", 4096))
    return facts


def _failure_middleware(args: argparse.Namespace) -> Callable:
    num_generate = 0
    stalled = asyncio.Event()  # never set: a stalled server answers nothing

    @web.middleware
    async def inject(request: web.Request, handler: Callable) -> web.StreamResponse:
        nonlocal num_generate
        if request.path.startswith("/health") and args.fake_unhealthy:
            return web.Response(status=503)
        if num_generate and args.fake_stall_after and num_generate >= args.fake_stall_after:
            await stalled.wait()
        if request.path == "/generate":
            num_generate += 1
            if args.fake_crash_after and num_generate >= args.fake_crash_after:
                print(f"fake: crashing on /generate request {num_generate}", flush=True)
                os._exit(17)
            if args.fake_stall_after and num_generate >= args.fake_stall_after:
                print(f"fake: stalling from /generate request {num_generate}", flush=True)
                await stalled.wait()
        return await handler(request)

    return inject


def build_app(args: argparse.Namespace) -> web.Application:
    facts = _model_facts(args.model_path)
    app = build_fake_sglang_app(
        vocab_size=facts["vocab_size"], eos_token_id=facts["eos_token_id"],
        eos_prob=args.fake_eos_prob,
        max_context_len=args.context_length or facts["max_context_len"],
        latency_s=args.fake_latency_s, api_key=args.api_key,
        served_model_name=args.served_model_name, model_path=args.model_path,
        prefix_cache=not args.disable_radix_cache, tp_size=args.tp_size)
    app[FAKE_STATE].weight_version = args.weight_version
    app.middlewares.append(_failure_middleware(args))
    return app


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    app = build_app(args)
    if args.fake_startup_delay_s:
        time.sleep(args.fake_startup_delay_s)  # a slow model load, before listening
    print(f"fake sglang pid {os.getpid()} on {args.host}:{args.port} "
          f"model {args.model_path} CUDA_VISIBLE_DEVICES="
          f"{os.environ.get('CUDA_VISIBLE_DEVICES', '')}", flush=True)

    async def ready(_app: web.Application) -> None:
        print(READY_LINE, flush=True)

    app.on_startup.append(ready)
    web.run_app(app, host=args.host, port=args.port, print=None, access_log=None,
                shutdown_timeout=1.0, handle_signals=True)


if __name__ == "__main__":
    sys.exit(main())
