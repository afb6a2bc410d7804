"""The fake SGLang server speaks the protocol of shared/sglang_protocol.md (plain HTTP)."""

from __future__ import annotations

import asyncio
import base64

import aiohttp
import msgspec
import pytest

from areal_lite.testing.fake_sglang.model import FakeModel, Item, validate_sampling
from areal_lite.testing.fake_sglang.server import FakeSGLangServer

EOS = 2


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as s:
        yield s


async def post(http, url, path, body=None, *, status=200):
    async with http.post(url + path, json=body) as r:
        raw = await r.read()
        assert r.status == status, raw
        return msgspec.json.decode(raw) if raw and r.content_type == "application/json" else raw


async def get(http, url, path, *, status=200):
    async with http.get(url + path) as r:
        raw = await r.read()
        assert r.status == status, raw
        return msgspec.json.decode(raw) if raw and r.content_type == "application/json" else raw


def gen_body(ids=(1, 2, 3), rid="r", **sp):
    return {"input_ids": list(ids), "rid": rid, "return_logprob": True,
            "sampling_params": {"max_new_tokens": 4, **sp}}


async def sse_events(resp) -> list[bytes]:
    raw = (await resp.read()).decode()
    assert raw.endswith("data: [DONE]\n\n")
    return [e.removeprefix("data: ").encode() for e in raw.split("\n\n") if e]


async def test_generate_reply_shape(http):
    async with FakeSGLangServer() as fake:
        out = await post(http, fake.url, "/generate", gen_body(rid="a", sampling_seed=3))
    meta = out["meta_info"]
    assert "text" not in out  # skip-tokenizer-init style without a decode fn
    assert len(out["output_ids"]) == 4
    assert meta["id"] == "a"
    assert meta["finish_reason"] == {"type": "length", "length": 4}
    assert meta["prompt_tokens"] == 3 and meta["completion_tokens"] == 4
    assert meta["weight_version"] == "default" and meta["cached_tokens"] == 0
    assert "e2e_latency" in meta
    triples = meta["output_token_logprobs"]
    assert [t[1] for t in triples] == out["output_ids"]
    assert all(t[0] <= 0.0 and t[2] is None for t in triples)


async def test_stop_token_eos_and_ignore_eos(http):
    script = [5, 6, 9, 7, EOS, 8]
    async with FakeSGLangServer(responder=lambda ids, sp: script) as fake:
        stop = await post(http, fake.url, "/generate",
                          gen_body(rid="s", max_new_tokens=6, stop_token_ids=[9]))
        eos = await post(http, fake.url, "/generate", gen_body(rid="e", max_new_tokens=6))
        ign = await post(http, fake.url, "/generate",
                         gen_body(rid="i", max_new_tokens=6, stop_token_ids=[9],
                                  ignore_eos=True))
        prefill = await post(http, fake.url, "/generate", gen_body(rid="p", max_new_tokens=0))
    assert stop["output_ids"] == [5, 6, 9]
    assert stop["meta_info"]["finish_reason"] == {"type": "stop", "matched": 9}
    assert eos["output_ids"] == [5, 6, 9, 7, EOS]
    assert eos["meta_info"]["finish_reason"]["matched"] == EOS
    assert ign["output_ids"] == script
    assert ign["meta_info"]["finish_reason"]["type"] == "length"
    assert prefill["output_ids"] == [] and prefill["meta_info"]["completion_tokens"] == 0


async def test_batch_returns_list_in_order(http):
    async with FakeSGLangServer(responder=lambda ids, sp: [ids[0]] * 2) as fake:
        out = await post(http, fake.url, "/generate",
                         {"input_ids": [[10, 1], [20, 1]], "rid": "b",
                          "sampling_params": {"max_new_tokens": 2}})
    assert [o["output_ids"] for o in out] == [[10, 10], [20, 20]]
    assert [o["meta_info"]["id"] for o in out] == ["b_0", "b_1"]


@pytest.mark.parametrize(("body", "needle"), [
    ({"input_ids": []}, "cannot be empty"),
    ({"sampling_params": {}}, "input_ids"),
    ({"text": "hi"}, "tokenizer"),
    (gen_body(max_new_tokens=100), "context length"),
    (gen_body(ids=[1] * 64), "context length"),
    (gen_body(temperature=-1), "temperature"),
    (gen_body(top_p=0.0), "top_p"),
    (gen_body(top_k=0), "top_k"),
    (gen_body(repetition_penalty=3), "repetition_penalty"),
])
async def test_bad_requests_get_400(http, body, needle):
    async with FakeSGLangServer(max_context_len=64) as fake:
        out = await post(http, fake.url, "/generate", body, status=400)
    assert needle in out["error"]["message"]


async def test_unknown_sampling_key_is_rejected_pydantic_style(http):
    async with FakeSGLangServer() as fake:
        out = await post(http, fake.url, "/generate", gen_body(bogus=1), status=400)
    assert out["object"] == "error" and out["code"] == 400 and "bogus" in out["message"]


async def test_duplicate_rid_in_flight_is_rejected(http):
    async with FakeSGLangServer(latency_s=0.01) as fake:
        slow = asyncio.create_task(post(http, fake.url, "/generate",
                                        gen_body(rid="dup", max_new_tokens=200)))
        await fake.state.wait_until(lambda: "dup" in fake.state.in_flight)
        out = await post(http, fake.url, "/generate", gen_body(rid="dup"), status=400)
        assert "Duplicate" in out["error"]["message"]
        await post(http, fake.url, "/abort_request", {"rid": "dup"})
        assert (await slow)["meta_info"]["finish_reason"]["type"] == "abort"


@pytest.mark.parametrize("incremental", [False, True])
async def test_stream_is_cumulative_then_done(http, incremental):
    async with FakeSGLangServer(incremental_streaming=incremental) as fake:
        full = await post(http, fake.url, "/generate", gen_body(rid="x", sampling_seed=5))
        async with http.post(fake.url + "/generate",
                             json={**gen_body(rid="y", sampling_seed=5), "stream": True}) as r:
            assert r.headers["Content-Type"].startswith("text/event-stream")
            events = await sse_events(r)
    assert len(events) == 5 and events[-1] == b"[DONE]"  # one chunk per token, then DONE
    chunks = [msgspec.json.decode(e) for e in events[:-1]]
    assert [c["meta_info"]["finish_reason"] for c in chunks[:-1]] == [None] * 3
    assert chunks[-1]["meta_info"]["finish_reason"]["type"] == "length"
    for k, c in enumerate(chunks, start=1):
        assert len(c["meta_info"]["output_token_logprobs"]) == k  # logprobs: cumulative
    if incremental:
        assert sum((c["output_ids"] for c in chunks), []) == full["output_ids"]
    else:
        assert [len(c["output_ids"]) for c in chunks] == [1, 2, 3, 4]
        assert chunks[-1]["output_ids"] == full["output_ids"]


async def test_pause_abort_returns_partial_and_holds_new_requests(http):
    async with FakeSGLangServer(latency_s=0.01) as fake:
        st = fake.state
        slow = asyncio.create_task(post(http, fake.url, "/generate",
                                        gen_body(rid="slow", max_new_tokens=500)))
        await st.wait_until(lambda: st.num_tokens_emitted >= 3)
        paused = await post(http, fake.url, "/pause_generation", {"mode": "abort"})
        assert paused == {"message": "Generation paused successfully.", "status": "ok"}
        out = await slow  # pause returns only after in-flight requests came back
        assert out["meta_info"]["finish_reason"]["type"] == "abort"
        assert out["meta_info"]["finish_reason"]["message"] == "Aborted"
        assert 3 <= len(out["output_ids"]) < 500
        assert len(out["meta_info"]["output_token_logprobs"]) == len(out["output_ids"])
        held = asyncio.create_task(post(http, fake.url, "/generate", gen_body(rid="new")))
        await st.wait_until(lambda: st.calls["/generate"] == 2)
        assert not held.done() and "new" not in st.in_flight  # waiting, not rejected
        await post(http, fake.url, "/continue_generation", {})
        assert (await held)["meta_info"]["finish_reason"]["type"] == "length"


async def test_in_place_pause_freezes_and_needs_flush_cache_false(http):
    async with FakeSGLangServer(latency_s=0.005) as fake:
        st = fake.state
        slow = asyncio.create_task(post(http, fake.url, "/generate",
                                        gen_body(rid="f", max_new_tokens=30)))
        await st.wait_until(lambda: st.num_tokens_emitted >= 2)
        await post(http, fake.url, "/pause_generation", {"mode": "in_place"})
        assert "f" in st.in_flight and not slow.done()
        body = {"model_path": "/ckpt", "weight_version": "7"}
        await post(http, fake.url, "/update_weights_from_disk", body, status=500)
        ok = await post(http, fake.url, "/update_weights_from_disk",
                        {**body, "flush_cache": False})
        assert ok["success"] is True and st.weight_version == "7"
        await post(http, fake.url, "/continue_generation", {})
        out = await slow
    assert out["meta_info"]["finish_reason"]["type"] == "length"
    assert len(out["output_ids"]) == 30 and out["meta_info"]["weight_version"] == "7"


async def test_abort_request_by_rid(http):
    async with FakeSGLangServer(latency_s=0.01) as fake:
        slow = asyncio.create_task(post(http, fake.url, "/generate",
                                        gen_body(rid="k", max_new_tokens=500)))
        await fake.state.wait_until(lambda: fake.state.num_tokens_emitted >= 2)
        assert await post(http, fake.url, "/abort_request", {"rid": "nope"}) == b""
        assert await post(http, fake.url, "/abort_request", {"rid": "k"}) == b""
        out = await slow
    assert out["meta_info"]["finish_reason"]["type"] == "abort"
    assert fake.state.aborted_rids == ["nope", "k"]


async def test_abort_in_waiting_queue_has_no_output(http):
    async with FakeSGLangServer(latency_s=0.01, max_running_requests=1) as fake:
        st = fake.state
        first = asyncio.create_task(post(http, fake.url, "/generate",
                                         gen_body(rid="run", max_new_tokens=500)))
        await st.wait_until(lambda: st.num_tokens_emitted >= 1)
        queued = asyncio.create_task(post(http, fake.url, "/generate", gen_body(rid="q")))
        await st.wait_until(lambda: "q" in st.in_flight)
        await post(http, fake.url, "/pause_generation", {})
        run_out, q_out = await first, await queued
    assert run_out["meta_info"]["finish_reason"]["message"] == "Aborted"
    assert q_out["output_ids"] == []
    assert q_out["meta_info"]["finish_reason"]["message"] == "Abort in waiting queue"
    assert "prompt_tokens" not in q_out["meta_info"]


async def test_weight_update_endpoints_set_version(http):
    async with FakeSGLangServer() as fake:
        u = fake.url
        ok = await post(http, u, "/update_weights_from_disk",
                        {"model_path": "/m", "abort_all_requests": True, "weight_version": "1"})
        assert ok["success"] and ok["num_paused_requests"] == 0
        blob = base64.b64encode(b"pickled").decode()
        await post(http, u, "/update_weights_from_tensor",
                   {"serialized_named_tensors": [blob], "weight_version": "2"})
        assert fake.state.weight_version == "2"
        dist = {"names": ["w"], "dtypes": ["bfloat16"], "shapes": [[2, 2]],
                "weight_version": "3"}
        bad = await post(http, u, "/update_weights_from_distributed", dist, status=400)
        assert bad["success"] is False and "not initialized" in bad["message"]
        await post(http, u, "/init_weights_update_group",
                   {"master_address": "127.0.0.1", "master_port": "29500", "rank_offset": 1,
                    "world_size": 2, "group_name": "g", "backend": "nccl"})
        dist["group_name"] = "g"
        torch_prefix = {**dist, "dtypes": ["torch.bfloat16"]}
        await post(http, u, "/update_weights_from_distributed", torch_prefix, status=400)
        assert (await post(http, u, "/update_weights_from_distributed", dist))["success"]
        await post(http, u, "/destroy_weights_update_group", {"group_name": "g"})
        relabel = await post(http, u, "/update_weight_version", {"new_version": "9"})
        assert relabel["new_version"] == "9"
        info = await get(http, u, "/model_info")
        out = await post(http, u, "/generate", gen_body())
    assert info["weight_version"] == "9" and out["meta_info"]["weight_version"] == "9"
    assert fake.state.num_weight_updates == 3


async def test_update_waits_for_requests_in_flight(http):
    async with FakeSGLangServer(latency_s=0.005) as fake:
        st = fake.state
        req = asyncio.create_task(post(http, fake.url, "/generate",
                                       gen_body(rid="w", max_new_tokens=20)))
        await st.wait_until(lambda: st.num_tokens_emitted >= 1)
        await post(http, fake.url, "/update_weights_from_disk",
                   {"model_path": "/m", "weight_version": "1"})
        assert req.done()  # the writer lock waited for the request to finish
        out = await req
    assert out["meta_info"]["finish_reason"]["type"] == "length"
    assert out["meta_info"]["weight_version"] == "default"


async def test_memory_release_resume_and_flush(http):
    async with FakeSGLangServer() as fake:
        u = fake.url
        assert await post(http, u, "/release_memory_occupation", {}) is None
        assert fake.state.released_tags == {"weights", "kv_cache", "cuda_graph"}
        assert await post(http, u, "/resume_memory_occupation", {"tags": ["weights"]}) is None
        await post(http, u, "/resume_memory_occupation", {"tags": ["weights"]}, status=400)
        await post(http, u, "/release_memory_occupation", {"tags": ["gpu"]}, status=400)
        text = await post(http, u, "/flush_cache")
    assert text.startswith(b"Cache flushed.")


async def test_info_health_and_models(http):
    async with FakeSGLangServer(served_model_name="tiny", max_context_len=512) as fake:
        models = await get(http, fake.url, "/v1/models")
        assert await get(http, fake.url, "/health") == b""
        assert await get(http, fake.url, "/health_generate") == b""
        server = await get(http, fake.url, "/server_info")
        await get(http, fake.url, "/get_weight_version", status=404)
    card = models["data"][0]
    assert models["object"] == "list" and card["id"] == "tiny"
    assert card["max_model_len"] == 512 and card["owned_by"] == "sglang"
    assert server["context_length"] == 512 and server["skip_tokenizer_init"] is True


async def test_health_times_out_with_503_while_paused(http):
    async with FakeSGLangServer(health_timeout_s=0.05) as fake:
        await post(http, fake.url, "/pause_generation", {})
        await get(http, fake.url, "/health", status=503)


async def test_api_key(http):
    async with FakeSGLangServer(api_key="sk") as fake:
        assert await post(http, fake.url, "/generate", gen_body(), status=401) == {
            "error": "Unauthorized"}
        assert await get(http, fake.url, "/health") == b""
        async with http.post(fake.url + "/generate", json=gen_body(),
                             headers={"Authorization": "Bearer sk"}) as r:
            assert r.status == 200


async def test_injected_failures(http):
    async with FakeSGLangServer() as fake:
        fake.fail_next(1, 503)
        fake.fail_next(1, "disconnect")
        await post(http, fake.url, "/generate", gen_body(), status=503)
        with pytest.raises(aiohttp.ServerDisconnectedError):
            await post(http, fake.url, "/generate", gen_body())
        await post(http, fake.url, "/generate", gen_body())
    assert fake.state.calls["/generate"] == 3


async def test_text_io_and_stop_strings(http):
    alphabet = "abcdefghij"  # token t decodes to alphabet[t]

    def dec(ids):
        return "".join(alphabet[t] for t in ids)

    script = [3, 4, 5, 6, 7]  # "defgh"
    async with FakeSGLangServer(vocab_size=10, responder=lambda ids, sp: script, decode=dec,
                                encode=lambda s: [alphabet.index(c) for c in s]) as fake:
        out = await post(http, fake.url, "/generate",
                         {"text": "ab", "sampling_params": {"max_new_tokens": 5,
                                                            "stop": ["fg"]}})
    assert out["output_ids"] == [3, 4, 5, 6]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": "fg"}
    assert out["text"] == "de"  # the matched stop string is trimmed
    assert out["meta_info"]["prompt_tokens"] == 2


async def test_prefix_cache_counts_cached_tokens(http):
    prompt = list(range(3, 43))
    async with FakeSGLangServer() as fake:
        first = await post(http, fake.url, "/generate", gen_body(ids=prompt, rid="1"))
        again = await post(http, fake.url, "/generate", gen_body(ids=prompt, rid="2"))
        await post(http, fake.url, "/flush_cache")
        flushed = await post(http, fake.url, "/generate", gen_body(ids=prompt, rid="3"))
    assert first["meta_info"]["cached_tokens"] == 0
    assert 0 < again["meta_info"]["cached_tokens"] < len(prompt)
    assert flushed["meta_info"]["cached_tokens"] == 0


def test_default_tokens_continue_across_resubmission():
    model = FakeModel(vocab_size=100, eos_prob=0.1)
    sp = validate_sampling({"sampling_seed": 11}, vocab_size=100)
    item = Item(input_ids=[1, 2], sampling=sp, rid="a")
    seed = model.seed(item)
    full = [model.token(seed, 2 + i) for i in range(20)]
    other = Item(input_ids=[1, 2] + [t for t, _ in full[:7]], sampling=sp, rid="b")
    assert model.seed(other) == seed
    assert [model.token(seed, 9 + i) for i in range(13)] == full[7:]
    assert all(0 <= t < 100 and -4.0 < lp <= 0.0 for t, lp in full)
