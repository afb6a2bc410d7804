"""SGLangEngine against fake SGLang servers over real loopback HTTP, plus its pure parts."""

from __future__ import annotations

import asyncio
import contextlib
import socket

import aiohttp
import msgspec
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from areal_lite.engine.base import (
    ContextLengthExceeded,
    Engine,
    EngineError,
    EngineUnavailable,
    GenerationAborted,
)
from areal_lite.engine.sglang.client import SGLangEngine
from areal_lite.engine.sglang.routing import SessionRouter
from areal_lite.engine.sglang.wire import (
    error_for_status,
    parse_stream_event,
    sampling_body,
)
from areal_lite.engine.stats import EngineStats, engine_metrics
from areal_lite.testing.fake_sglang.server import FakeSGLangServer
from areal_lite.types import GenerateRequest, GenerateResult, SamplingParams

EOS = 2


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as s:
        yield s


@contextlib.asynccontextmanager
async def fakes(n: int = 1, **opts):
    async with contextlib.AsyncExitStack() as stack:
        yield [await stack.enter_async_context(FakeSGLangServer(**opts)) for _ in range(n)]


def engine(http, servers, **kw) -> SGLangEngine:
    kw.setdefault("retry_backoff_s", 0.0)
    urls = [s if isinstance(s, str) else s.url for s in servers]
    return SGLangEngine(urls, session=http, **kw)


def request(rid="r", ids=(1, 2, 3), session_id=None, **sp) -> GenerateRequest:
    sp.setdefault("max_new_tokens", 8)
    return GenerateRequest(rid=rid, input_ids=list(ids), sampling=SamplingParams(**sp),
                           session_id=session_id)


def dead_url() -> str:
    with socket.socket() as s:  # a port nobody listens on once the socket is closed
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


async def test_generate_and_stream_agree(http):
    async with fakes() as [fake]:
        eng = engine(http, [fake])
        await eng.start()
        assert isinstance(eng, Engine) and eng.max_context_len == 4096
        res = await eng.generate(request(rid="g", seed=4))
        chunks = [c async for c in eng.stream(request(rid="s", seed=4))]
        body = fake.state.last_bodies["/generate"]
    assert len(res.output_ids) == 8 and res.finish_reason == "length"
    assert res.versions == [0] * 8 and res.prompt_tokens == 3
    assert all(-4.0 < lp <= 0.0 for lp in res.logprobs)
    assert [c.finish_reason for c in chunks] == [None] * 7 + ["length"]
    assert GenerateResult.from_chunks(chunks, prompt_tokens=3) == res
    assert body["stream"] is True and body["return_logprob"] is True and body["rid"] == "s"
    assert eng.server_weight_versions == {fake.url: "default"}


async def test_incremental_streaming_server_gives_same_tokens(http):
    async with fakes(incremental_streaming=True) as [fake]:
        eng = engine(http, [fake], max_context_len=4096)
        res = await eng.generate(request(rid="a", seed=9, max_new_tokens=6))
        chunks = [c async for c in eng.stream(request(rid="b", seed=9, max_new_tokens=6))]
    assert sum((c.output_ids for c in chunks), []) == res.output_ids
    assert sum((c.logprobs for c in chunks), []) == res.logprobs


async def test_sampling_params_mapping(http):
    async with fakes() as [fake]:
        eng = engine(http, [fake], max_context_len=4096)
        await eng.generate(request(max_new_tokens=3, temperature=0.5, top_p=0.9, top_k=20))
        plain = fake.state.last_bodies["/generate"]["sampling_params"]
        await eng.generate(request(rid="r2", stop_token_ids=(7,), seed=3, ignore_eos=True))
        full = fake.state.last_bodies["/generate"]["sampling_params"]
    assert plain == {"max_new_tokens": 3, "temperature": 0.5, "top_p": 0.9, "top_k": 20,
                     "ignore_eos": False}
    assert full["stop_token_ids"] == [7] and full["sampling_seed"] == 3
    assert full["ignore_eos"] is True and "stop" not in full


async def test_stop_token_and_stop_string(http):
    script = [5, 6, 9, 7, EOS]
    async with fakes(responder=lambda ids, sp: script) as [fake]:
        eng = engine(http, [fake], max_context_len=4096)
        res = await eng.generate(request(stop_token_ids=(9,)))
        eos = [c async for c in eng.stream(request(rid="e"))]
        await eng.generate(request(rid="s", stop=("</tool>",)))
        stop_strings = fake.state.last_bodies["/generate"]["sampling_params"]["stop"]
    assert res.output_ids == [5, 6, 9] and res.finish_reason == "stop"
    assert res.matched_stop == 9
    assert eos[-1].finish_reason == "stop" and eos[-1].matched_stop == EOS
    assert sum((c.output_ids for c in eos), []) == script
    assert stop_strings == ["</tool>"]


async def test_session_affinity_and_least_loaded_routing(http):
    async with fakes(3) as servers:
        eng = engine(http, servers, max_context_len=4096)
        for turn in range(3):
            for sid in ("a", "b", "c"):
                await eng.generate(request(rid=f"{sid}{turn}", session_id=sid))
        seen = {s.url: {b["rid"][0] for b in s.state.generate_bodies} for s in servers}
    assert sorted(map(sorted, seen.values())) == [["a"], ["b"], ["c"]]  # one server each


async def test_new_session_avoids_busy_server(http):
    async with fakes(2, latency_s=0.01) as (s0, s1):
        eng = engine(http, [s0, s1], max_context_len=4096)
        busy = asyncio.create_task(eng.generate(request(rid="busy", max_new_tokens=400)))
        await s0.state.wait_until(lambda: s0.state.num_tokens_emitted >= 1)
        for i in range(2):
            await eng.generate(request(rid=f"n{i}", session_id=f"n{i}", max_new_tokens=1))
        busy.cancel()
        with pytest.raises(asyncio.CancelledError):
            await busy
    assert s0.state.calls["/generate"] == 1 and s1.state.calls["/generate"] == 2


async def test_retries_same_server_then_succeeds(http):
    async with fakes() as [fake]:
        fake.fail_next(1, 500)
        fake.fail_next(1, "disconnect")
        eng = engine(http, [fake], max_context_len=4096)
        res = await eng.generate(request(seed=1))
        ref = await eng.generate(request(rid="ref", seed=1))
    assert fake.state.calls["/generate"] == 4
    assert res.output_ids == ref.output_ids


async def test_lean_and_aiohttp_generate_agree(http):
    """The lean HTTP/1.1 pool (the default for plain generate) and aiohttp give the same
    result, body and errors; the lean one reuses its connections."""
    async with fakes() as [fake]:
        lean, plain = (engine(http, [fake], max_context_len=4096, lean_http=flag)
                       for flag in (True, False))
        assert lean._http1 is not None and plain._http1 is None
        results = [await e.generate(request(rid=f"r{i}", seed=7)) for i, e in
                   enumerate((lean, plain, lean))]
        bodies = fake.state.last_bodies["/generate"]
        with pytest.raises(ContextLengthExceeded):
            await lean.generate(request(rid="long", ids=[1] * 5000))
        await lean.close()
    assert results[0] == results[1] == results[2]
    assert bodies["rid"] == "r2" and bodies["return_logprob"] is True
    assert sum(len(q) for q in lean._http1._idle.values()) == 0  # closed with the engine


async def test_failover_rebinds_session(http):
    async with fakes(2) as (s0, s1):
        eng = engine(http, [s0, s1], max_context_len=4096)
        await eng.generate(request(rid="warm", session_id="ep"))
        first = s0 if s0.state.calls["/generate"] else s1
        other = s1 if first is s0 else s0
        first.fail_next(2, 503)
        await eng.generate(request(rid="t2", session_id="ep"))
        await eng.generate(request(rid="t3", session_id="ep"))
    assert first.state.calls["/generate"] == 3  # warm + the two failures
    assert other.state.calls["/generate"] == 2  # the retry, then the rebound session


@pytest.mark.parametrize("stream", [False, True])
async def test_server_dying_mid_request_fails_over_with_partial(http, stream):
    async with fakes(2, latency_s=0.005) as (s0, s1):
        eng = engine(http, [s0, s1], max_context_len=4096)
        ref = await eng.generate(request(rid="ref", seed=2, max_new_tokens=30, session_id="ep"))
        home, other = (s0, s1) if eng.router.session_url("ep") == s0.url else (s1, s0)
        base = home.state.num_tokens_emitted
        req = request(rid="x", seed=2, max_new_tokens=30, session_id="ep")
        if stream:
            async def consume():
                return GenerateResult.from_chunks([c async for c in eng.stream(req)], 3)
            task = asyncio.create_task(consume())
        else:
            task = asyncio.create_task(eng.generate(req))
        await home.state.wait_until(lambda: home.state.num_tokens_emitted >= base + 5)
        home.fail_next(1, 503)  # the retry on the same server fails too
        home.state.drop("x")
        res = await task
    assert res.output_ids == ref.output_ids and res.finish_reason == "length"
    assert eng.router.session_url("ep") == other.url
    moved = other.state.last_bodies["/generate"]
    assert moved["rid"] == "x.2"
    k = len(moved["input_ids"]) - 3
    assert moved["input_ids"][3:] == ref.output_ids[:k] and (not stream or k >= 5)
    assert moved["sampling_params"]["max_new_tokens"] == 30 - k


async def test_all_servers_down_is_engine_unavailable(http):
    urls = [dead_url(), dead_url()]
    eng = engine(http, urls, max_context_len=4096, max_retries=3)
    with pytest.raises(EngineUnavailable) as err:
        await eng.generate(request())
    assert all(u in str(err.value) for u in urls)
    assert eng.router.in_flight == dict.fromkeys(urls, 0)


async def test_start_names_the_dead_server(http):
    eng = engine(http, [url := dead_url()])
    with pytest.raises(EngineUnavailable, match=url):
        await eng.start(timeout_s=0.2, poll_interval_s=0.05)


async def test_context_overflow_and_bad_request_are_not_retried(http):
    async with fakes(max_context_len=32) as [fake]:
        eng = engine(http, [fake])
        await eng.start()
        with pytest.raises(ContextLengthExceeded, match="context length"):
            await eng.generate(request(ids=[1] * 30))
        with pytest.raises(EngineError, match="top_p") as err:
            await eng.generate(request(top_p=0.0))
    assert not isinstance(err.value, ContextLengthExceeded)
    assert fake.state.calls["/generate"] == 2


async def test_api_key(http):
    async with fakes(api_key="sk") as [fake]:
        good = engine(http, [fake], api_key="sk")
        await good.start()
        assert (await good.generate(request())).finish_reason == "length"
        bad = engine(http, [fake], max_context_len=4096)
        with pytest.raises(EngineError, match="api_key"):
            await bad.generate(request())


async def test_cancel_aborts_request_on_server(http):
    async with fakes(latency_s=0.01) as [fake]:
        eng = engine(http, [fake], max_context_len=4096)
        task = asyncio.create_task(eng.generate(request(rid="c", max_new_tokens=500)))
        await fake.state.wait_until(lambda: fake.state.num_tokens_emitted >= 2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert fake.state.aborted_rids == ["c"]
        await fake.state.wait_until(lambda: not fake.state.in_flight)
    assert eng.router.in_flight == {fake.url: 0}


async def test_request_timeout_aborts_and_raises(http):
    async with fakes(latency_s=0.01) as [fake]:
        eng = engine(http, [fake], max_context_len=4096, request_timeout_s=0.05)
        with pytest.raises(EngineError, match="request_timeout_s"):
            await eng.generate(request(rid="t", max_new_tokens=500))
        assert fake.state.aborted_rids == ["t"]
        await fake.state.wait_until(lambda: not fake.state.in_flight)


async def test_leaving_a_stream_early_aborts(http):
    async with fakes(latency_s=0.01) as [fake]:
        eng = engine(http, [fake], max_context_len=4096)
        async with contextlib.aclosing(eng.stream(request(rid="st", max_new_tokens=500))) as s:
            async for chunk in s:
                assert chunk.output_ids
                break
        assert fake.state.aborted_rids == ["st"]


async def pause_swap_resume(eng: SGLangEngine, fake: FakeSGLangServer, at: int) -> None:
    await fake.state.wait_until(lambda: fake.state.num_tokens_emitted >= at)
    await eng.pause()
    await eng.update_weights({"w": torch.ones(2)}, version=1)
    await eng.resume()


@pytest.mark.parametrize("stream", [False, True])
async def test_pause_resubmits_partial_with_new_version(http, stream):
    async with fakes(latency_s=0.005) as [fake]:
        eng = engine(http, [fake], max_context_len=4096)
        ref = await eng.generate(request(rid="ref", seed=5, max_new_tokens=40))
        base = fake.state.num_tokens_emitted
        req = request(rid="p", seed=5, max_new_tokens=40)
        if stream:
            async def consume():
                return [c async for c in eng.stream(req)]
            task = asyncio.create_task(consume())
        else:
            task = asyncio.create_task(eng.generate(req))
        await pause_swap_resume(eng, fake, base + 5)
        out = await task
    res = GenerateResult.from_chunks(out, 3) if stream else out
    assert res.finish_reason == "length" and len(res.output_ids) == 40
    assert res.output_ids == ref.output_ids  # the fake continues seeded streams exactly
    k = res.versions.index(1)
    assert 5 <= k < 40 and res.versions == [0] * k + [1] * (40 - k)
    bodies = [b for b in fake.state.generate_bodies if b["rid"].startswith("p")]
    assert [b["rid"] for b in bodies] == ["p", "p.1"]
    assert bodies[1]["input_ids"] == [1, 2, 3] + res.output_ids[:k]
    assert bodies[1]["sampling_params"]["max_new_tokens"] == 40 - k
    assert bodies[1]["sampling_params"]["sampling_seed"] == 5


async def test_requests_wait_while_paused(http):
    async with fakes() as [fake]:
        eng = engine(http, [fake], max_context_len=4096)
        await eng.pause()
        task = asyncio.create_task(eng.generate(request(rid="w")))
        await asyncio.sleep(0)  # one loop step: the task enters the engine and parks
        assert eng.router.in_flight[fake.url] == 1 and not task.done()
        assert fake.state.calls["/generate"] == 0
        await eng.update_weights_from_disk("/ckpt/step1", version=3)
        await eng.resume()
        res = await task
    assert res.versions == [3] * 8
    assert fake.state.last_bodies["/update_weights_from_disk"] == {
        "model_path": "/ckpt/step1", "abort_all_requests": True, "weight_version": "3"}


@pytest.mark.parametrize("stream", [False, True])
async def test_server_side_abort_is_an_error_never_a_finished_text(http, stream):
    async with fakes(latency_s=0.01) as [fake]:
        eng = engine(http, [fake], max_context_len=4096)
        req = request(rid="x", max_new_tokens=500, session_id="ep")

        async def run():
            if not stream:
                return await eng.generate(req)
            return [c async for c in eng.stream(req)]

        task = asyncio.create_task(run())
        await fake.state.wait_until(lambda: fake.state.num_tokens_emitted >= 3)
        fake.state.abort("x", "Aborted by a server-side limit")
        with pytest.raises(GenerationAborted, match="server-side limit"):
            await task
        assert fake.state.calls["/generate"] == 1  # not resubmitted: the cause stays
    assert eng.num_aborted == 1
    assert "aborted request x" in eng.end_session("ep")
    assert eng.end_session("ep") is None and eng.router.session_url("ep") is None


async def test_weight_update_calls(http):
    async with fakes(2, decode_tensors=True) as servers:
        servers[1].state.decode_tensors = False  # a CPU tensor's shared fd opens only once
        eng = engine(http, servers, max_context_len=4096)
        w = torch.arange(6, dtype=torch.float32).reshape(2, 3)
        await eng.update_weights([("layer.w", w)], version=1)
        assert [s.state.weight_version for s in servers] == ["1", "1"]
        assert torch.equal(servers[0].state.received_tensors["layer.w"], w)
        sent = servers[0].state.last_bodies["/update_weights_from_tensor"]
        assert len(sent["serialized_named_tensors"]) == 1 and "flush_cache" not in sent
        await eng.init_weights_update_group("10.0.0.1", 29500, rank_offset=1, world_size=3,
                                            group_name="g")
        offsets = [s.state.groups["g"]["rank_offset"] for s in servers]
        await eng.update_weights_from_distributed(
            ["layer.w"], [torch.bfloat16], [(2, 3)], version=2, group_name="g")
        dist = servers[1].state.last_bodies["/update_weights_from_distributed"]
        with pytest.raises(EngineError, match="not initialized"):
            await eng.update_weights_from_distributed(["w"], ["float32"], [[1]], version=3)
        await eng.destroy_weights_update_group("g")
    assert offsets == [1, 2]
    assert dist["dtypes"] == ["bfloat16"] and dist["shapes"] == [[2, 3]]
    assert dist["weight_version"] == "2" and eng.version == 2  # failed update: unchanged
    assert [s.state.weight_version for s in servers] == ["2", "2"]


async def test_memory_cache_info_and_health_helpers(http):
    async with fakes(2) as servers:
        eng = engine(http, servers, max_context_len=4096)
        await eng.release_memory_occupation()
        await eng.resume_memory_occupation(["weights"])
        await eng.resume_memory_occupation(["kv_cache", "cuda_graph"])
        with pytest.raises(EngineError, match="not released"):
            await eng.resume_memory_occupation(["weights"])
        with pytest.raises(ValueError, match="memory tags"):
            await eng.release_memory_occupation(["gpu"])
        await eng.flush_cache()
        info = await eng.get_model_info()
        server = await eng.get_server_info(servers[1].url)
        health = await eng.check_health()
    assert all(s.state.calls["/flush_cache"] == 1 for s in servers)
    assert info["weight_version"] == "default" and server["context_length"] == 4096
    assert health == {s.url: True for s in servers}


async def test_closed_engine_refuses(http):
    async with fakes() as [fake]:
        eng = engine(http, [fake], max_context_len=4096)
        await eng.close()
        with pytest.raises(EngineUnavailable, match="closed"):
            await eng.generate(request())


# -- pure parts ------------------------------------------------------------------------

def _event(ids: list[int], num_lps: int, finish=None) -> bytes:
    lps = [[-0.5, t, None] for t in ids[:num_lps]]
    return msgspec.json.encode({"output_ids": ids, "meta_info": {
        "id": "r", "finish_reason": finish, "output_token_logprobs": lps}})


@given(tokens=st.lists(st.integers(0, 1000), max_size=30),
       cuts=st.lists(st.integers(0, 30), max_size=6), incremental=st.booleans())
def test_stream_events_rebuild_the_output(tokens, cuts, incremental):
    bounds = sorted({min(c, len(tokens)) for c in cuts} | {len(tokens)})
    seen, got, prev = 0, [], 0
    for b in bounds:
        ids = tokens[prev:b] if incremental else tokens[:b]
        delta = parse_stream_event(
            msgspec.json.encode({"output_ids": ids, "meta_info": {
                "output_token_logprobs": [[-1.0, t, None] for t in tokens[:b]]}}), seen)
        seen = delta.num_seen
        got += delta.segment.output_ids
        assert len(delta.segment.logprobs) == len(delta.segment.output_ids)
        prev = b
    assert got == tokens


def test_stream_error_event_raises():
    with pytest.raises(EngineError, match="boom"):
        parse_stream_event(b'{"error": {"message": "boom"}}', 0)


def test_error_mapping():
    ctx = error_for_status(400, b'{"error": {"message": "longer than the model\'s context '
                           b'length"}}', "u")
    assert isinstance(ctx, ContextLengthExceeded)
    bad = error_for_status(400, b'{"object": "error", "message": "bad top_p"}', "u")
    assert type(bad) is EngineError and "bad top_p" in str(bad)
    assert "api_key" in str(error_for_status(401, b'{"error": "Unauthorized"}', "u"))


def test_sampling_body_sends_only_known_keys():
    body = sampling_body(SamplingParams(), 5)
    assert set(body) == {"max_new_tokens", "temperature", "top_p", "top_k", "ignore_eos"}


@given(ops=st.lists(st.tuples(st.sampled_from("abcdefgh"), st.booleans()), max_size=60))
def test_router_keeps_sessions_and_balances(ops):
    now = [0.0]
    router = SessionRouter(["u0", "u1", "u2"], clock=lambda: now[0])
    bound: dict[str, str] = {}
    for sid, finish in ops:
        url = router.pick(sid)
        assert bound.setdefault(sid, url) == url  # healthy servers keep their sessions
        router.begin(url)
        if finish:
            router.end(url)
    assert sum(router.in_flight.values()) == sum(not f for _, f in ops)


def test_router_prefers_idle_and_avoids_failed():
    now = [0.0]
    router = SessionRouter(["u0", "u1"], cooldown_s=5.0, clock=lambda: now[0])
    router.begin(router.pick("a"))
    assert router.pick("b") == "u1"  # u0 is busy
    router.report_failure("u1")
    assert router.pick("b") == "u0"  # u1 down: the session moves
    assert router.fallback("c", ["u0"]) == "u1"  # only server this request did not try
    now[0] = 6.0
    assert router.healthy("u1") and router.pick(None) == "u1"


@pytest.mark.parametrize("stream", [False, True])
async def test_stats_count_tokens_and_the_servers_prefix_reuse(http, stream):
    ids = list(range(10, 50))  # 40 tokens: the fake caches 16-token blocks
    async with fakes() as [fake]:
        eng = engine(http, [fake], max_context_len=4096)
        assert eng.stats == EngineStats(step_counts=False)
        for rid in ("a", "b"):
            r = request(rid=rid, ids=ids, seed=1, max_new_tokens=6)
            if stream:
                [c async for c in eng.stream(r)]
            else:
                await eng.generate(r)
        stats = eng.stats
    assert stats.generated_tokens == 12 and stats.prompt_tokens == 80
    assert stats.prefill_tokens == 80 - 32  # the second call found two blocks cached
    assert stats.steps == stats.decode_tokens == 0 and stats.busy_s == 0
    metrics = engine_metrics(EngineStats(step_counts=False), stats, wall_s=2.0)
    assert metrics == {"engine/gen_tokens_per_s": 6.0,
                       "engine/prefill_reuse_frac": pytest.approx(32 / 80)}


async def test_every_call_retries_through_an_outage_within_the_budget(http):
    """The weight swap's pause and a generate survive a server that refuses for a while
    (503 while restarting, dropped connections); past the budget they fail, naming it."""
    async with fakes() as [fake]:
        eng = engine(http, [fake], max_context_len=4096, max_retries=0,
                     outage_timeout_s=30.0, retry_backoff_s=0.01)
        fake.fail_next(4, 503, path="/pause_generation")
        fake.fail_next(4, "disconnect")
        await eng.pause()
        await eng.resume()
        res = await eng.generate(request())
        assert fake.state.calls["/pause_generation"] == 5 and eng.control.num_retries == 4
        assert len(res.output_ids) == 8 and fake.state.calls["/generate"] == 5
        short = engine(http, [fake], max_context_len=4096, max_retries=1,
                       outage_timeout_s=0.05, retry_backoff_s=0.02)
        fake.fail_next(100, 503, path="/pause_generation")
        with pytest.raises(EngineUnavailable, match=r"still unreachable .*outage_timeout_s"):
            await short.pause()
        fake.state.failures.clear()
    dead = engine(http, [dead_url()], max_context_len=4096, max_retries=1,
                  outage_timeout_s=0.1, retry_backoff_s=0.02)
    with pytest.raises(EngineUnavailable, match=r"outage_timeout_s = 0.1"):
        await dead.generate(request())
