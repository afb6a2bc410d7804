"""engine/ fake SGLang server: the HTTP API of `shared/sglang_protocol.md` over aiohttp.

For tests and overhead benchmarks, no GPU: `/generate` (batches, streaming, logprob
triples, stop rules, context, vocabulary and sampling validation: HTTP 400, or for a
streamed request an SSE error event, as SGLang does), pause/continue/abort with
partial results, weight-update, memory, cache, health and info endpoints. The pretend
model is in `fake_sglang_model.py`, requests in flight in `fake_sglang_state.py`, weight
updates in `fake_sglang_weights.py` (a gloo weight-update group is joined for real).

    async with FakeSGLangServer(latency_s=0.01) as fake:
        ...  # point a client at fake.url; assert on fake.state.calls, .weight_version
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import msgspec
from aiohttp import web

from areal_lite.testing.fake_sglang.model import (
    BadRequest,
    FakeModel,
    Item,
    parse_generate_items,
)
from areal_lite.testing.fake_sglang.state import (
    ConnectionDropped,
    FakeSGLangState,
    Live,
)
from areal_lite.testing.fake_sglang.weights import UPDATE_CHECKS, apply_update

__all__ = ["FAKE_STATE", "FakeSGLangServer", "build_fake_sglang_app"]

FAKE_STATE = web.AppKey("fake_sglang_state", FakeSGLangState)
_INFO = web.AppKey("fake_sglang_info", dict)

_OPEN_PATHS = frozenset({"/health", "/health_generate", "/metrics"})
_MEMORY_TAGS = frozenset({"weights", "kv_cache", "cuda_graph"})
_enc = msgspec.json.Encoder()
_dec = msgspec.json.Decoder()


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.Response(body=_enc.encode(obj), status=status, content_type="application/json")


async def _body(request: web.Request) -> Any:
    raw = await request.read()
    if not raw:
        return {}
    try:
        return _dec.decode(raw)
    except msgspec.DecodeError:
        raise BadRequest("request body is not valid JSON", pydantic=True) from None


@web.middleware
async def _gatekeeper(request: web.Request, handler: Callable) -> web.StreamResponse:
    """Count calls, check the api key, inject failures, turn BadRequest into 400."""
    st, path = request.app[FAKE_STATE], request.path
    st.calls[path] += 1
    st.notify()
    key = request.app[_INFO]["api_key"]
    if key and path not in _OPEN_PATHS and request.headers.get(
            "Authorization") != f"Bearer {key}":
        return _json({"error": "Unauthorized"}, 401)
    if st.failures:
        failure = st.take_failure(path)
        if failure == "disconnect":
            await request.read()
            return _cut(request)
        if failure is not None:
            return _json({"error": {"message": f"injected failure (HTTP {failure})"}},
                         int(failure))
    try:
        return await handler(request)
    except BadRequest as e:
        return _json(e.body(), 400)
    except ConnectionDropped:
        return _cut(request)


def _cut(request: web.Request) -> web.Response:
    """Drop the connection without a reply (the client sees a disconnect)."""
    if request.transport is not None:
        request.transport.abort()
    return web.Response(status=500)  # never sent


# -- /generate ----------------------------------------------------------------------

async def _generate(request: web.Request) -> web.StreamResponse:
    st = request.app[FAKE_STATE]
    body = await _body(request)
    st.generate_bodies.append(body)
    st.last_bodies["/generate"] = body
    try:
        items, batch = parse_generate_items(body, vocab_size=st.model.vocab_size,
                                            encode=st.encode)
        for it in items:
            st.check_context(it)
    except BadRequest as e:  # a streamed request gets its ValueErrors as an SSE event
        if e.pydantic or not (isinstance(body, dict) and body.get("stream")):
            raise
        return await _stream_error(request, e.message)
    if not st.gate_open():  # new requests wait during a pause or a weight update
        await st.wait_until(st.gate_open, None)
    if st.closing:
        return _json({"error": {"message": "server is shutting down"}}, 503)
    lives = st.register(items)
    try:
        if body.get("stream"):
            return await _stream(request, st, items, lives)
        if not batch:
            done = await st.run(items[0], lives[0], alive=_alive(request))
            return _json(st.payload(items[0], done.output_ids, done.logprobs, done))
        dones = await asyncio.gather(*(st.run(it, lv) for it, lv in zip(items, lives)))
        return _json([st.payload(it, d.output_ids, d.logprobs, d)
                      for it, d in zip(items, dones)])
    finally:
        st.unregister(lives)


def _alive(request: web.Request) -> Callable[[], bool]:
    return lambda: request.transport is not None and not request.transport.is_closing()


async def _stream(request: web.Request, st: FakeSGLangState, items: list[Item],
                  lives: list[Live]) -> web.StreamResponse:
    """SSE: one cumulative chunk per token, the last with finish_reason, then [DONE]."""
    resp = await _open_sse(request)
    batch = len(items) > 1
    try:
        for item, live in zip(items, lives):  # batch items one after another
            sent = 0

            async def emit(out: list[int], lps: list[float], item: Item = item) -> None:
                nonlocal sent
                await _send(resp, st.payload(item, out, lps, None, sent), item, batch)
                sent = len(out)

            done = await st.run(item, live, emit=emit)
            await _send(resp, st.payload(item, done.output_ids, done.logprobs, done, sent),
                        item, batch)
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
    except ConnectionResetError:  # client went away: the request is over
        for live in lives:
            live.abort_message = "client disconnected"
    return resp


async def _open_sse(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                       "Cache-Control": "no-cache"})
    await resp.prepare(request)
    return resp


async def _stream_error(request: web.Request, message: str) -> web.StreamResponse:
    """SGLang's streamed ValueError: HTTP 200, one `{"error": ...}` event, `[DONE]`."""
    resp = await _open_sse(request)
    await resp.write(b"data: " + _enc.encode({"error": {"message": message}}) + b"\n\n")
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


async def _send(resp: web.StreamResponse, payload: dict[str, Any], item: Item,
                batch: bool) -> None:
    if batch:
        payload["index"] = item.index
    await resp.write(b"data: " + _enc.encode(payload) + b"\n\n")


# -- control ------------------------------------------------------------------------

async def _pause(request: web.Request) -> web.Response:
    st = request.app[FAKE_STATE]
    body = await _body(request)
    mode = body.get("mode", "abort")
    if mode not in ("abort", "retract", "in_place"):
        raise BadRequest(f"mode must be abort, retract or in_place, got {mode!r}",
                         pydantic=True)
    st.paused, st.pause_mode = True, mode
    st.notify()
    if mode == "abort":  # abort everything in flight and wait until it has returned
        st.abort_all("Aborted")
        await st.wait_until(lambda: not st.in_flight, None)
    return _json({"message": "Generation paused successfully.", "status": "ok"})


async def _continue(request: web.Request) -> web.Response:
    st = request.app[FAKE_STATE]
    await _body(request)
    st.paused, st.pause_mode = False, None
    st.notify()
    return _json({"message": "Generation continued successfully.", "status": "ok"})


async def _abort_request(request: web.Request) -> web.Response:
    st = request.app[FAKE_STATE]
    body = await _body(request)
    rid = body.get("rid", "")
    st.aborted_rids.append(rid)
    st.last_bodies["/abort_request"] = body
    if body.get("abort_all"):
        st.abort_all()
    else:
        st.abort(rid)
    return web.Response(status=200)


async def _flush_cache(request: web.Request) -> web.Response:
    st = request.app[FAKE_STATE]
    if st.num_running or st.in_flight:
        return web.Response(status=400, text="Cache not flushed because there are "
                            "pending requests.")
    st.flush_prefix_cache()
    return web.Response(text="Cache flushed.\nPlease check backend logs for more details. "
                        "(When there are running or waiting requests, the operation will "
                        "not be performed.)")


async def _memory(request: web.Request) -> web.Response:
    st = request.app[FAKE_STATE]
    body = await _body(request)
    st.last_bodies[request.path] = body
    tags = set(body.get("tags") or _MEMORY_TAGS)
    if tags - _MEMORY_TAGS:
        return _json({"error": {"message": f"unknown memory tags {sorted(tags - _MEMORY_TAGS)}"
                                }}, 400)
    if request.path == "/release_memory_occupation":
        if st.in_flight:
            return _json({"error": {"message": "release_memory_occupation needs an idle "
                                    "server; pause or abort requests first"}}, 400)
        st.released_tags |= tags
        if "kv_cache" in tags:
            st.flush_prefix_cache()
    else:
        missing = tags - st.released_tags
        if missing:
            return _json({"error": {"message": f"KeyError: {sorted(missing)} not released"}},
                         400)
        st.released_tags -= tags
    return _json(None)


async def _health(request: web.Request) -> web.Response:
    st = request.app[FAKE_STATE]
    info = request.app[_INFO]
    try:  # the probe is a generate request, so it waits out a pause like one
        await st.wait_until(st.gate_open, info["health_timeout_s"])
    except TimeoutError:
        return web.Response(status=503)
    return web.Response(status=503 if st.closing else 200)


async def _model_info(request: web.Request) -> web.Response:
    st, info = request.app[FAKE_STATE], request.app[_INFO]
    return _json({
        "model_path": info["model_path"], "tokenizer_path": info["model_path"],
        "is_generation": True, "preferred_sampling_params": None,
        "weight_version": st.weight_version, "has_image_understanding": False,
        "has_audio_understanding": False, "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
    })


async def _server_info(request: web.Request) -> web.Response:
    st, info = request.app[FAKE_STATE], request.app[_INFO]
    return _json({
        "model_path": info["model_path"], "served_model_name": info["served_model_name"],
        "context_length": st.max_context_len, "skip_tokenizer_init": st.encode is None,
        "tp_size": st.tp_size, "dp_size": 1, "disable_radix_cache": not st.prefix_cache,
        "incremental_streaming_output": st.incremental_streaming,
        "weight_version": st.weight_version, "version": "fake",
        "internal_states": [{"max_total_num_tokens": st.max_context_len * 8}],
    })


async def _models(request: web.Request) -> web.Response:
    st, info = request.app[FAKE_STATE], request.app[_INFO]
    name = info["served_model_name"] or info["model_path"]
    return _json({"object": "list", "data": [{
        "id": name, "object": "model", "created": info["created"], "owned_by": "sglang",
        "root": info["model_path"], "parent": None, "max_model_len": st.max_context_len,
    }]})


# -- weight updates ----------------------------------------------------------------

async def _update(request: web.Request) -> web.Response:
    """Any weight endpoint (see `fake_sglang_weights.apply_update`)."""
    st, path = request.app[FAKE_STATE], request.path
    body = await _body(request)
    st.last_bodies[path] = body
    return _json(*await apply_update(st, path, body))


# -- app and server ----------------------------------------------------------------

def build_fake_sglang_app(
    *,
    vocab_size: int = 1024,
    eos_token_id: int = 2,
    eos_prob: float = 0.0,  # per-token chance that the default model emits eos
    max_context_len: int = 4096,
    latency_s: float = 0.0,  # per sampled token; 0 = no sleeping or yielding at all
    responder: Callable[[list[int], dict[str, Any]], list[int]] | None = None,
    logprob_fn: Callable[[int, int], float] | None = None,  # (token, position) -> lp
    decode: Callable[[list[int]], str] | None = None,  # enables "text" + stop strings
    encode: Callable[[str], list[int]] | None = None,  # enables "text" input
    api_key: str | None = None,
    served_model_name: str | None = None,
    model_path: str = "fake/model",
    incremental_streaming: bool = False,
    max_running_requests: int | None = None,
    prefix_cache: bool = True,
    strict_flush: bool = True,
    decode_tensors: bool = False,  # unpickle update_weights_from_tensor (same host only)
    tp_size: int = 1,  # ranks this server joins a weight-update group with
    group_timeout_s: float = 60.0,  # limit to join that group and for each broadcast
    health_timeout_s: float = 20.0,
    history: int = 1000,
) -> web.Application:
    """A fake SGLang server app; its state is `app[FAKE_STATE]`."""
    model = FakeModel(vocab_size=vocab_size, eos_token_id=eos_token_id, eos_prob=eos_prob,
                      responder=responder, logprob_fn=logprob_fn)
    state = FakeSGLangState(
        model=model, max_context_len=max_context_len, latency_s=latency_s, decode=decode,
        encode=encode, incremental_streaming=incremental_streaming,
        max_running_requests=max_running_requests, prefix_cache=prefix_cache,
        strict_flush=strict_flush, decode_tensors=decode_tensors, tp_size=tp_size,
        group_timeout_s=group_timeout_s, history=history)
    app = web.Application(middlewares=[_gatekeeper], client_max_size=1 << 31)
    app[FAKE_STATE] = state
    app[_INFO] = {"api_key": api_key, "served_model_name": served_model_name,
                  "model_path": model_path, "created": int(time.time()),
                  "health_timeout_s": health_timeout_s}
    r = app.router
    r.add_post("/generate", _generate)
    r.add_put("/generate", _generate)
    for path, handler in (("/pause_generation", _pause),
                          ("/continue_generation", _continue),
                          ("/abort_request", _abort_request)):
        r.add_post(path, handler)
    for path in UPDATE_CHECKS:
        r.add_post(path, _update)
    for path, handler in (("/flush_cache", _flush_cache),
                          ("/release_memory_occupation", _memory),
                          ("/resume_memory_occupation", _memory)):
        r.add_post(path, handler)
        r.add_get(path, handler)
    for path, handler in (("/health", _health), ("/health_generate", _health),
                          ("/model_info", _model_info), ("/get_model_info", _model_info),
                          ("/server_info", _server_info), ("/get_server_info", _server_info),
                          ("/v1/models", _models)):
        r.add_get(path, handler)
    return app


class FakeSGLangServer:
    """`async with FakeSGLangServer(**opts) as fake:` serves on 127.0.0.1:<free port>.

    `opts` are `build_fake_sglang_app`'s. `fake.url` is the base url, `fake.state` the
    `FakeSGLangState` to assert on and wait on.
    """

    def __init__(self, **opts: Any) -> None:
        self.app = build_fake_sglang_app(**opts)
        self.state: FakeSGLangState = self.app[FAKE_STATE]
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> None:
        self._runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"

    async def stop(self) -> None:
        """Abort everything in flight and stop listening (the url then refuses)."""
        self.state.closing = True
        self.state.abort_all("server shutting down")
        self.state.notify()
        for member in self.state.group_members.values():
            member.close()
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    def fail_next(self, n: int = 1, status: int | str = 500, path: str = "/generate") -> None:
        self.state.fail_next(n, status, path)

    async def __aenter__(self) -> FakeSGLangServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
