"""Launched SGLang servers (the fake's command line, as real subprocesses): start, health
wait, stop with no orphan (checked by PID), restart with the current weights, failover,
and aborts that never become finished text."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap

import aiohttp
import openai
import pytest
from proxy_support import make_cfg

from areal_lite.config import SGLangConfig
from areal_lite.engine.base import EngineError, GenerationAborted
from areal_lite.engine.sglang.client import SGLangEngine
from areal_lite.engine.sglang.fleet import ServerFleet
from areal_lite.engine.sglang.launcher import (
    ServerLaunchError,
    assign_gpus,
    visible_gpus,
)
from areal_lite.rollout.stack import open_rollout
from areal_lite.testing.fake_sglang.server import FakeSGLangServer
from areal_lite.types import GenerateRequest, SamplingParams

FAKE = [sys.executable, "-m", "areal_lite.testing.fake_sglang.launch_server"]


def fleet_cfg(**kw) -> SGLangConfig:
    kw.setdefault("restart_backoff_s", 0.0)
    kw.setdefault("launch_timeout_s", 60.0)
    return SGLangConfig(launch=True, launch_command=FAKE, base_port=0, **kw)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead
    except FileNotFoundError:
        return False


def request(rid="r", session_id=None, max_new_tokens=8) -> GenerateRequest:
    return GenerateRequest(rid=rid, input_ids=[1, 2, 3], session_id=session_id,
                           sampling=SamplingParams(max_new_tokens=max_new_tokens))


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as s:
        yield s


def test_gpu_assignment_leaves_the_trainer_its_device():
    cfg = SGLangConfig(launch=True, num_servers=2, tp_size=2)
    assert assign_gpus(cfg, ["0", "1", "2", "3", "4"]) == ["1,2", "3,4"]
    colocated = SGLangConfig(launch=True, num_servers=2, colocate=True)
    assert assign_gpus(colocated, ["5", "6"]) == ["5", "6"]
    assert assign_gpus(cfg, None) == [None, None]
    with pytest.raises(EngineError, match=r"num_servers = 2 x tp_size = 2 needs 5 GPUs"):
        assign_gpus(cfg, ["0", "1", "2"])
    assert visible_gpus(0, {"CUDA_VISIBLE_DEVICES": "3, 7"}) == ["3", "7"]
    assert visible_gpus(2, {}) == ["0", "1"] and visible_gpus(0, {}) is None


async def test_launch_waits_for_health_then_stops_every_process(http, tmp_path):
    cfg = fleet_cfg(num_servers=2, mem_fraction_static=0.5, colocate=True,
                    server_args=["--fake-startup-delay-s", "0.5", "--disable-radix-cache"])
    async with ServerFleet(cfg, model_path="fake/m", log_dir=tmp_path, session=http) as fleet:
        pids = [s.pid for s in fleet.servers]
        assert all(alive(p) for p in pids)
        for url in fleet.urls:  # healthy when __aenter__ returns: no polling here
            async with http.get(url + "/health_generate") as r:
                assert r.status == 200
        manifest = json.loads((tmp_path / "servers.json").read_text())
        assert [m["pid"] for m in manifest] == pids
        log = (tmp_path / "server_1.log").read_text()
        assert "--mem-fraction-static 0.5 --enable-memory-saver" in log
        assert "--disable-radix-cache" in log and "ready to roll" in log
    assert not any(alive(p) for p in pids)


async def test_a_server_that_never_gets_healthy_fails_in_time_naming_its_log(http, tmp_path):
    cfg = fleet_cfg(launch_timeout_s=3.0, server_args=["--fake-unhealthy"])
    fleet = ServerFleet(cfg, model_path="fake/m", log_dir=tmp_path, session=http)
    loop = asyncio.get_running_loop()
    start = loop.time()
    with pytest.raises(ServerLaunchError, match=r"server_0\.log\) not healthy after 3.0s"):
        async with fleet:
            pass
    assert loop.time() - start < 15  # the timeout, plus stopping it
    assert not alive(fleet.servers[0].pid)


async def test_a_server_that_exits_at_start_fails_at_once_with_its_log(http, tmp_path):
    cfg = fleet_cfg(server_args=["--no-such-flag"])
    with pytest.raises(ServerLaunchError, match=r"(?s)exited with code 2.*unrecognized arguments"):
        async with ServerFleet(cfg, model_path="fake/m", log_dir=tmp_path, session=http):
            pass


async def test_failure_inside_the_run_stops_the_servers(http, tmp_path):
    fleet = ServerFleet(fleet_cfg(), model_path="fake/m", log_dir=tmp_path, session=http)
    with pytest.raises(RuntimeError, match="the run failed"):
        async with fleet:
            pid = fleet.servers[0].pid
            raise RuntimeError("the run failed")
    assert not alive(pid)


def test_ctrl_c_stops_the_servers(tmp_path):
    script = textwrap.dedent(f"""
        import asyncio, sys, aiohttp
        from areal_lite.config import SGLangConfig
        from areal_lite.engine.sglang.fleet import ServerFleet
        from areal_lite.runtime import run_async

        async def main():
            cfg = SGLangConfig(launch=True, launch_command={FAKE!r}, base_port=0,
                               num_servers=2)
            async with aiohttp.ClientSession() as http:
                async with ServerFleet(cfg, model_path="m", log_dir=sys.argv[1],
                                       session=http):
                    print("up", flush=True)
                    await asyncio.Event().wait()

        run_async(main())
    """)
    # the child gets Ctrl-C's default disposition: an ignored SIGINT is inherited across
    # exec, and in CI's full run the child ignored both SIGINTs (a test process had it so)
    with subprocess.Popen([sys.executable, "-c", script, str(tmp_path)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)
                          ) as proc:
        try:
            assert proc.stdout.readline().strip() == "up"
            pids = [m["pid"] for m in json.loads((tmp_path / "servers.json").read_text())]
            assert all(alive(p) for p in pids)
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=30)
        finally:
            proc.kill()
    assert proc.returncode != 0  # KeyboardInterrupt
    assert not any(alive(p) for p in pids)


async def test_a_crashed_server_comes_back_with_the_current_weights(http, tmp_path):
    cfg = fleet_cfg(outage_timeout_s=60.0, server_args=["--fake-eos-prob", "0"])
    async with ServerFleet(cfg, model_path="fake/m", log_dir=tmp_path / "servers",
                           session=http) as fleet:
        eng = SGLangEngine(fleet.urls, session=http, outage_timeout_s=60.0,
                           retry_backoff_s=0.05)
        await eng.start()
        fleet.supervise(eng)
        ckpt = tmp_path / "weights_v1"
        ckpt.mkdir()
        (ckpt / "model.safetensors").write_bytes(b"weights of version 1")
        await eng.pause()
        await eng.update_weights_from_disk(str(ckpt), 1)
        await eng.resume()
        (ckpt / "model.safetensors").unlink()  # the trainer deletes its copy
        first = fleet.servers[0].pid
        os.kill(first, signal.SIGKILL)
        res = await eng.generate(request(session_id="ep"))  # waits through the restart
        url = fleet.urls[0]
        assert fleet.num_restarts == 1 and fleet.servers[0].pid not in (None, first)
        assert (await eng.get_model_info(url))["weight_version"] == "1"
        assert eng.server_weight_versions[url] == "1"  # the server that answered held v1
        assert res.versions == [1] * 8 and len(res.output_ids) == 8
        kept = tmp_path / "servers" / "weights_v1" / "model.safetensors"
        assert kept.read_bytes() == b"weights of version 1"
        assert fleet.metrics()["servers/down"] == 0
        pid = fleet.servers[0].pid
    assert not alive(pid) and not kept.exists()


async def test_sessions_move_off_a_dead_server(http, tmp_path):
    cfg = fleet_cfg(num_servers=2, restart_backoff_s=60.0)  # stays down for the test
    async with ServerFleet(cfg, model_path="fake/m", log_dir=tmp_path, session=http) as fleet:
        eng = SGLangEngine(fleet.urls, session=http, outage_timeout_s=30.0,
                           retry_backoff_s=0.01)
        await eng.start()
        fleet.supervise(eng)
        await eng.generate(request(rid="a", session_id="ep"))
        home = eng.router.session_url("ep")
        victim = next(s for s in fleet.servers if s.url == home)
        os.kill(victim.pid, signal.SIGKILL)
        await victim.wait_exit()
        res = await eng.generate(request(rid="b", session_id="ep"))
        assert res.output_ids and res.finish_reason in ("stop", "length")
        assert eng.router.session_url("ep") not in (None, home)
        metrics = fleet.metrics()
        assert metrics["servers/affinity_misses"] == 1 and metrics["servers/restarts"] == 1
        assert metrics["servers/down"] == 1
        eng.end_session("ep")
        assert eng.router.session_url("ep") is None  # the binding ends with the episode


async def test_a_server_that_keeps_crashing_ends_the_run_naming_its_log(http, tmp_path):
    cfg = fleet_cfg(max_restarts=1, server_args=["--fake-crash-after", "1"])
    async with ServerFleet(cfg, model_path="fake/m", log_dir=tmp_path, session=http) as fleet:
        eng = SGLangEngine(fleet.urls, session=http, outage_timeout_s=0.0, max_retries=0)
        await eng.start()
        fleet.supervise(eng)
        with pytest.raises(EngineError):
            await eng.generate(request())  # crash 1
        await fleet.wait_for(lambda: fleet.num_restarts == 1 and not eng.router.offline)
        with pytest.raises(EngineError):
            await eng.generate(request())  # crash 2, on the restarted server
        with pytest.raises(ServerLaunchError, match=r"server_0\.log\) exited \(last code 17\) and was restarted 1 times"):
            await fleet.wait_failure()


async def test_a_server_going_down_mid_request_resubmits_elsewhere(http):
    async with FakeSGLangServer(latency_s=0.01) as s0, FakeSGLangServer() as s1:
        eng = SGLangEngine([s0.url, s1.url], session=http, retry_backoff_s=0.0,
                           max_context_len=4096)
        task = asyncio.create_task(eng.generate(request(max_new_tokens=50)))
        await s0.state.wait_until(lambda: s0.state.num_tokens_emitted >= 3)
        await s0.stop()  # aborts in flight with "server shutting down"
        res = await task
    assert len(res.output_ids) == 50 and res.finish_reason == "length"
    assert s1.state.calls["/generate"] == 1 and eng.num_aborted == 0


class CatchingAgent:
    """Swallows the proxy's error and still returns a reward."""

    async def run(self, data, **kw):
        client = openai.AsyncOpenAI(base_url=kw["base_url"], api_key=kw["api_key"],
                                    http_client=kw["http_client"], max_retries=0)
        try:
            await client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=400)
        except openai.APIError:
            pass
        return 1.0


async def test_an_aborted_request_fails_its_episode_and_exports_nothing(tiny_model_dir,
                                                                       tiny_tokenizer):
    async with FakeSGLangServer(vocab_size=len(tiny_tokenizer), max_context_len=1024,
                                eos_token_id=tiny_tokenizer.eos_token_id,
                                latency_s=0.01) as fake:
        cfg = make_cfg(tiny_model_dir, fake.url)
        async with open_rollout(cfg, CatchingAgent()) as stack:
            task = asyncio.create_task(stack.controller.run_episode({}))
            await fake.state.wait_until(lambda: fake.state.num_tokens_emitted >= 3)
            (rid,) = fake.state.in_flight
            fake.state.abort(rid, "Aborted by a server-side limit")
            ep = await task
            assert stack.engine.router.session_url(ep.episode_id) is None
    assert ep.failed and ep.error == "aborted" and ep.samples == []
    assert stack.controller.stats.failures == {"aborted": 1}
    assert isinstance(GenerationAborted("x"), EngineError)


async def test_a_stalled_server_is_killed_and_restarted(http, tmp_path):
    cfg = fleet_cfg(health_check_interval_s=0.2, server_args=["--fake-stall-after", "1"])
    async with ServerFleet(cfg, model_path="fake/m", log_dir=tmp_path, session=http) as fleet:
        eng = SGLangEngine(fleet.urls, session=http, max_context_len=4096,
                           request_timeout_s=2.0, max_retries=0)
        fleet.supervise(eng)
        first = fleet.servers[0].pid
        with pytest.raises(EngineError, match="no result within"):
            await eng.generate(request())  # it stalls from its first request on
        await fleet.wait_for(lambda: fleet.num_restarts == 1 and not eng.router.offline)
        assert fleet.servers[0].pid != first and not alive(first)
        assert "stalling from /generate request 1" in (tmp_path / "server_0.log").read_text()
