"""The fake SGLang command line: it takes every flag the launcher passes to
`sglang.launch_server`, and its failure flags do what the launch tests rely on."""

from __future__ import annotations

import json
import sys

import aiohttp
import pytest

from areal_lite.config import SGLangConfig
from areal_lite.engine.base import EngineError
from areal_lite.engine.sglang.client import SGLangEngine
from areal_lite.engine.sglang.launcher import LaunchedServer, free_port, server_argv
from areal_lite.testing.fake_sglang.launch_server import build_app, build_parser
from areal_lite.testing.fake_sglang.server import FAKE_STATE
from areal_lite.types import GenerateRequest, SamplingParams

FAKE = [sys.executable, "-m", "areal_lite.testing.fake_sglang.launch_server"]


def test_the_fake_accepts_every_flag_the_launcher_sends(tiny_model_dir):
    cfg = SGLangConfig(launch=True, launch_command=FAKE, tp_size=2, mem_fraction_static=0.7,
                       colocate=True, api_key="k",
                       server_args=["--disable-radix-cache", "--weight-version", "v0",
                                    "--context-length", "512"])
    argv = server_argv(cfg, str(tiny_model_dir), 31234)
    assert argv[:len(FAKE)] == FAKE
    args = build_parser().parse_args(argv[len(FAKE):])
    assert (args.port, args.tp_size, args.mem_fraction_static) == (31234, 2, 0.7)
    assert args.enable_memory_saver and args.disable_radix_cache and args.api_key == "k"
    state = build_app(args)[FAKE_STATE]
    assert state.tp_size == 2 and state.weight_version == "v0" and not state.prefix_cache
    assert state.max_context_len == 512
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert state.model.vocab_size == config["vocab_size"]  # read from the checkpoint
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--model-path", "m", "--no-such-flag"])


async def test_a_stalled_server_times_requests_out(tmp_path):
    port = free_port("127.0.0.1")
    url = f"http://127.0.0.1:{port}"
    server = LaunchedServer(0, FAKE + ["--model-path", "m", "--port", str(port),
                                       "--fake-stall-after", "2"], url, tmp_path / "s.log")
    async with aiohttp.ClientSession() as http:
        await server.start()
        try:
            await server.wait_healthy(http, 60.0)
            eng = SGLangEngine([url], session=http, request_timeout_s=1.0,
                               max_context_len=4096)
            req = GenerateRequest(rid="a", input_ids=[1, 2], sampling=SamplingParams())
            assert (await eng.generate(req)).output_ids  # request 1 is answered
            with pytest.raises(EngineError, match="no result within 1.0s"):
                await eng.generate(GenerateRequest(rid="b", input_ids=[1, 2],
                                                   sampling=SamplingParams()))
            assert "stalling from /generate request 2" in server.log_path.read_text()
        finally:
            await server.stop(grace_s=5.0)
    assert server.proc.returncode is not None
