"""engine/ SGLang client: the Engine Protocol over SGLang servers' native HTTP API.

Token-in, token-out: `POST /generate` with `input_ids` and `return_logprob`; plain calls
over our lean HTTP/1.1 pool (`http1.py`), streams and control routes over the caller's
shared keep-alive `aiohttp.ClientSession`.

A request may run as several *segments* (server calls). `pause()` aborts every
request in flight on the servers; each keeps its partial tokens, waits for `resume()`,
and is resubmitted to the same server with the tokens appended to the prompt and the
remaining token budget, so the caller sees one uninterrupted result. A server that
fails (connection error, 5xx, an abort because it is going down) is retried the same
way, on the same server once and then on others (the session moves), at least
`max_retries` times and for as long as `outage_timeout_s` after the first failure.
Any other server-side abort raises `GenerationAborted`: partial output is never a
finished completion. A request the server refuses (HTTP 400, or a stream whose first
event is an error) raises `EngineRejected` or `ContextLengthExceeded` at once: the
values are the client's, so no other server is tried and none is marked unhealthy.
Each token is tagged with the weight version that sampled it: the current version, or
while paused the version that was live when the pause began.

Servers come and go under a supervisor (`fleet.py`): `server_down(url)` takes one out
of routing and control calls; `server_up(url, current=...)` brings it back, routable
once it holds the current weights (at once, or after the next weight update).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import aiohttp
import msgspec

from areal_lite.engine.base import EngineError, EngineUnavailable, GenerationAborted
from areal_lite.engine.sglang.admin import SGLangAdmin
from areal_lite.engine.sglang.control import SGLangControl
from areal_lite.engine.sglang.http1 import Http1Pool
from areal_lite.engine.sglang.routing import SessionRouter
from areal_lite.engine.sglang.wire import (
    Segment,
    generate_body,
    generate_error,
    parse_generate,
    parse_stream_event,
    sse_data,
)
from areal_lite.engine.stats import EngineStats
from areal_lite.types import GenerateRequest, GenerateResult, TokenChunk

__all__ = ["SGLangEngine"]

_MAX_BACKOFF_S = 2.0  # retry delays double up to this


class _Retryable(Exception):
    """A segment failed in a way another attempt may fix (connection error, 5xx)."""


class _Run:
    """Progress of one logical request across its segments."""

    __slots__ = ("req", "url", "generated", "failures", "failed_urls", "num_segments",
                 "rid", "cached", "first_failure")

    def __init__(self, req: GenerateRequest, url: str) -> None:
        self.req = req
        self.url = url
        self.generated: list[int] = []  # tokens produced so far, all segments
        self.failures: list[str] = []  # "url: error" per failed attempt
        self.failed_urls: set[str] = set()
        self.num_segments = 0
        self.rid: str | None = None  # rid of the segment in flight
        self.cached: int | None = None  # cached_tokens of the first segment
        self.first_failure: float | None = None  # loop time of the first failed attempt

    def next_rid(self) -> str:
        """The next segment's rid: the request's, then "<rid>.1", "<rid>.2", ..."""
        n, self.num_segments = self.num_segments, self.num_segments + 1
        return f"{self.req.rid}.{n}" if n else self.req.rid


class SGLangEngine(SGLangAdmin):
    """Engine over one or more SGLang servers (see module docstring for semantics)."""

    def __init__(
        self,
        urls: list[str],
        *,
        session: aiohttp.ClientSession,  # shared keep-alive pool, owned by the caller
        request_timeout_s: float = 3600.0,  # limit for one /generate call
        connect_timeout_s: float = 10.0,  # TCP connect limit, every call
        max_retries: int = 3,  # extra attempts per request after failures
        retry_backoff_s: float = 0.05,  # first retry delay, doubled each retry
        api_key: str | None = None,  # sent as "Authorization: Bearer ..."
        max_context_len: int | None = None,  # None = read max_model_len in start()
        initial_version: int = 0,  # weight version of the servers' current weights
        tp_size: int = 1,  # tensor-parallel ranks per server (weight updates)
        control_timeout_s: float = 60.0,  # limit for pause/continue/info calls
        abort_timeout_s: float = 5.0,  # limit for the best-effort abort on cancel
        unhealthy_cooldown_s: float = 5.0,  # how long routing avoids a failed server
        outage_timeout_s: float = 0.0,  # keep retrying every server call this long, seconds
        lean_http: bool = True,  # non-streaming /generate over http1.Http1Pool, not aiohttp
        max_connections: int = 1024,  # that pool's size over all servers
    ) -> None:
        if not urls:
            raise ValueError("SGLangEngine needs at least one server url, got []")
        self.urls = [u.rstrip("/") for u in urls]
        self._session = session
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._gen_headers = {**self._headers, "Content-Type": "application/json"}
        self._gen_header_bytes = "".join(f"{k}: {v}\r\n" for k, v in
                                         self._gen_headers.items()).encode("latin-1")
        # non-streaming /generate over a lean keep-alive pool (http1.py); None = aiohttp
        self._http1 = Http1Pool(max_connections=max_connections,
                                connect_timeout_s=connect_timeout_s) if lean_http else None
        self._timeout = aiohttp.ClientTimeout(total=request_timeout_s,
                                              sock_connect=connect_timeout_s)
        self._request_timeout_s = request_timeout_s
        self._max_retries = max_retries
        self._outage_timeout_s = outage_timeout_s
        self._retry_backoff_s = retry_backoff_s
        self._abort_timeout_s = abort_timeout_s
        self._tp_size = tp_size
        self._max_context_len = max_context_len
        self.router = SessionRouter(self.urls, cooldown_s=unhealthy_cooldown_s)
        self.control = SGLangControl(self.urls, session=session, headers=self._headers,
                                     timeout_s=control_timeout_s,
                                     connect_timeout_s=connect_timeout_s,
                                     outage_timeout_s=outage_timeout_s,
                                     retry_backoff_s=retry_backoff_s)
        self.server_weight_versions: dict[str, str] = {}  # url -> last meta_info version
        self._stats = EngineStats(step_counts=False)  # from responses (engine/stats.py)
        self._version = initial_version
        self.initial_version = initial_version  # what a freshly started server holds
        self.weights_lock = asyncio.Lock()  # one weight change at a time (updates, catch-ups)
        self.on_disk_weights: Any = None  # async (path, version) hook after a disk update
        self._aborted: dict[str, str] = {}  # session_id -> why a request of it was aborted
        self.num_aborted = 0  # requests failed by a server-side abort
        self.num_resubmitted = 0  # segments sent again after a failure or transient abort
        self._paused_version = initial_version  # live version when the pause began
        self._paused = False
        self._pause_epoch = 0  # +1 per pause(); tells pause aborts from server aborts
        self._running = asyncio.Event()
        self._running.set()
        self._closed = False

    # -- lifecycle -----------------------------------------------------------------

    async def start(self, *, timeout_s: float = 600.0, poll_interval_s: float = 0.5) -> None:
        """Wait until every server answers GET /v1/models; learn max_context_len."""
        lens = await asyncio.gather(*(self._wait_ready(u, timeout_s, poll_interval_s)
                                      for u in self.urls))
        if self._max_context_len is None:
            known = [n for n in lens if n is not None]
            if not known:
                raise EngineError(f"no server reported max_model_len in /v1/models "
                                  f"({self.urls}); pass max_context_len=")
            self._max_context_len = min(known)

    async def _wait_ready(self, url: str, timeout_s: float, poll_s: float) -> int | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            try:
                models = await self.control.models(url, timeout_s=max(poll_s, 5.0))
                return models["data"][0].get("max_model_len")
            except EngineUnavailable as e:  # not up yet; 401 and other errors are final
                if loop.time() + poll_s > deadline:
                    raise EngineUnavailable(
                        f"SGLang server {url} not ready after {timeout_s}s ({e}); check it "
                        f"is running and the url/port/api_key are right") from e
            except (KeyError, IndexError, TypeError, AttributeError) as e:
                raise EngineError(f"{url}/v1/models returned an unexpected body") from e
            await asyncio.sleep(poll_s)

    async def close(self) -> None:
        """Refuse new requests and wake paused ones (the session is the caller's)."""
        self._closed = True
        self._running.set()
        if self._http1 is not None:
            await self._http1.close()

    async def __aenter__(self) -> SGLangEngine:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- Engine Protocol -----------------------------------------------------------

    @property
    def version(self) -> int:
        return self._version

    @property
    def max_context_len(self) -> int:
        if self._max_context_len is None:
            raise RuntimeError("max_context_len unknown: await engine.start() first "
                               "or pass max_context_len= to SGLangEngine")
        return self._max_context_len

    @property
    def paused(self) -> bool:
        return self._paused

    @property
    def stats(self) -> EngineStats:
        """A copy of the totals seen in responses: tokens generated, prompt tokens sent
        and the servers' `cached_tokens` (no steps or busy time: they are the servers')."""
        return self._stats.copy()

    @property
    def tp_size(self) -> int:
        """Tensor-parallel ranks per server (each joins a weight-update group)."""
        return self._tp_size

    async def generate(self, req: GenerateRequest) -> GenerateResult:
        run = _Run(req, self.router.pick(req.session_id))
        chunks = [c async for c in self._drive(run, stream=False)]
        out = GenerateResult.from_chunks(chunks, prompt_tokens=len(req.input_ids))
        out.cached_tokens = run.cached or 0
        return out

    async def stream(self, req: GenerateRequest) -> AsyncIterator[TokenChunk]:
        """Yield new tokens as they arrive. Close it (`contextlib.aclosing`) when
        leaving early, so the server request is aborted at once."""
        run = _Run(req, self.router.pick(req.session_id))
        async with aclosing(self._drive(run, stream=True)) as chunks:
            async for chunk in chunks:
                yield chunk

    async def pause(self) -> None:
        """Hold new requests and abort those in flight (they resume after `resume`)."""
        if not self._paused:
            self._paused = True
            self._paused_version = self._version
            self._pause_epoch += 1
            self._running.clear()
        await self.control.pause_generation("abort")

    async def resume(self) -> None:
        """Let servers and held requests continue; raises if a server did not."""
        try:
            await self.control.continue_generation()
        finally:
            self._paused = False
            self._running.set()

    # -- one request, possibly several segments -------------------------------------

    async def _drive(self, run: _Run, *, stream: bool) -> AsyncIterator[TokenChunk]:
        """Run segments until the request finishes; yield its tokens as chunks."""
        self.router.begin(run.url)
        try:
            while True:
                if not self._running.is_set():
                    await self._running.wait()
                if self._closed:
                    raise EngineUnavailable("SGLangEngine is closed")
                remaining = run.req.sampling.max_new_tokens - len(run.generated)
                if run.generated and remaining <= 0:
                    yield TokenChunk(output_ids=[], logprobs=[], versions=[],
                                     finish_reason="length")
                    return
                epoch = self._pause_epoch
                last: Segment | None = None
                try:
                    if run.url in self.router.offline:  # down, or not on current weights
                        raise _Retryable("server is down (its supervisor restarts it)")
                    if not stream and self._http1 and self._http1.supports(run.url):
                        last = await self._post_generate(run, run.next_rid())  # 1 reply
                    else:
                        async with aclosing(self._segment(run, stream)) as segments:
                            async for last in segments:
                                if last.finish_reason is None and last.output_ids:
                                    yield self._chunk(last, None)
                    if last is None or last.finish_reason is None:
                        raise _Retryable("stream ended without a finish_reason")
                except _Retryable as e:
                    await self._prepare_retry(run, e)
                    continue
                if last.finish_reason == "abort":
                    ours = self._paused or self._pause_epoch != epoch
                    transient = ours or self._going_down(run.url, last.abort_message)
                    if not transient:
                        raise self._aborted_error(run, last.abort_message)
                    if last.output_ids:  # keep the partial tokens, resubmit the rest
                        yield self._chunk(last, None)
                    if not ours:
                        await self._prepare_retry(
                            run, _Retryable(f"aborted: {last.abort_message}"))
                    continue
                yield self._chunk(last, last.finish_reason)
                return
        except (asyncio.CancelledError, GeneratorExit):
            if run.rid is not None:
                await asyncio.shield(self._abort_quietly(run.url, run.rid))
            raise
        finally:
            self.router.end(run.url)

    def _going_down(self, url: str, message: str | None) -> bool:
        """An abort because the server stops (resubmitting elsewhere fixes it)."""
        return (url in self.router.offline or self._closed
                or "shutting down" in (message or "").lower())

    def _aborted_error(self, run: _Run, message: str | None) -> GenerationAborted:
        self.num_aborted += 1
        reason = f"{run.url} aborted request {run.req.rid}: {message or 'no reason given'}"
        if run.req.session_id is not None:
            self._aborted.setdefault(run.req.session_id, reason)
        return GenerationAborted(reason + " (partial output discarded)")

    def _chunk(self, seg: Segment, finish_reason: str | None) -> TokenChunk:
        v = self._paused_version if self._paused else self._version
        return TokenChunk(output_ids=seg.output_ids, logprobs=seg.logprobs,
                          versions=[v] * len(seg.output_ids), finish_reason=finish_reason,
                          matched_stop=seg.matched if finish_reason else None)

    async def _segment(self, run: _Run, stream: bool) -> AsyncIterator[Segment]:
        """POST one /generate for `run` over aiohttp; yield its Segment(s) (new tokens
        only)."""
        rid = run.next_rid()
        body = msgspec.json.encode(
            generate_body(run.req, generated=run.generated, rid=rid, stream=stream))
        url = run.url
        run.rid = rid
        try:
            async with self._session.post(url + "/generate", data=body,
                                          headers=self._gen_headers,
                                          timeout=self._timeout) as resp:
                if resp.status != 200 or not stream:
                    yield self._plain_reply(run, url, resp.status, await resp.read())
                else:
                    async with aclosing(self._sse_segments(resp, run)) as segments:
                        async for seg in segments:
                            yield seg
            run.rid = None
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as e:
            run.rid = None
            raise _Retryable(repr(e)) from e
        except TimeoutError as e:
            raise await self._timed_out(run, url, rid) from e
        self.router.report_success(url)

    def _plain_reply(self, run: _Run, url: str, status: int, raw: bytes) -> Segment:
        """The Segment of a whole (non-streamed) /generate reply; raises on an error."""
        if status != 200:
            if status >= 500:
                raise _Retryable(f"HTTP {status}: {raw[:300]!r}")
            raise generate_error(status, raw, url)  # never retried
        seg = parse_generate(raw)
        self._note(run, seg)
        self._count_prompt(seg)
        run.generated.extend(seg.output_ids)
        return seg

    async def _timed_out(self, run: _Run, url: str, rid: str) -> EngineError:
        await asyncio.shield(self._abort_quietly(url, rid))
        run.rid = None
        return EngineError(f"{url}/generate gave no result within "
                           f"{self._request_timeout_s}s (request_timeout_s)")

    async def _post_generate(self, run: _Run, rid: str) -> Segment:
        """One plain /generate over the lean pool; the outcomes of `_segment`'s."""
        url = run.url
        body = msgspec.json.encode(
            generate_body(run.req, generated=run.generated, rid=rid, stream=False))
        run.rid = rid
        try:
            status, raw = await self._http1.post(url, "/generate", body, self._gen_header_bytes,
                                                 self._request_timeout_s)
        except ConnectionError as e:
            run.rid = None
            raise _Retryable(repr(e)) from e
        except TimeoutError as e:
            raise await self._timed_out(run, url, rid) from e
        run.rid = None
        seg = self._plain_reply(run, url, status, raw)
        self.router.report_success(url)
        return seg

    async def _sse_segments(self, resp: aiohttp.ClientResponse, run: _Run
                            ) -> AsyncIterator[Segment]:
        num_seen, counts = 0, None  # counts: the last event that carried prompt counts
        try:
            async with aclosing(sse_data(resp)) as events:
                async for data in events:
                    delta = parse_stream_event(data, num_seen, server=run.url)
                    num_seen = delta.num_seen
                    self._note(run, delta.segment)
                    if delta.segment.prompt_tokens is not None:
                        counts = delta.segment
                    run.generated.extend(delta.segment.output_ids)
                    yield delta.segment
        finally:
            self._count_prompt(counts)

    def _note(self, run: _Run, seg: Segment) -> None:
        self._stats.generated_tokens += len(seg.output_ids)
        if run.cached is None and seg.prompt_tokens is not None:
            run.cached = seg.cached_tokens
        if seg.weight_version is not None:
            self.server_weight_versions[run.url] = seg.weight_version

    def _count_prompt(self, seg: Segment | None) -> None:
        """Count one /generate call's prompt as its last event reported it (a server may
        send `cached_tokens` only with the final event)."""
        if seg is not None and seg.prompt_tokens is not None:
            self._stats.prompt_tokens += seg.prompt_tokens
            self._stats.prefill_tokens += seg.prompt_tokens - seg.cached_tokens

    async def _prepare_retry(self, run: _Run, err: _Retryable) -> None:
        """Record a failed attempt; wait, pick the next server, or give up once both
        `max_retries` and `outage_timeout_s` are spent."""
        now = asyncio.get_running_loop().time()
        if run.first_failure is None:
            run.first_failure = now
        run.failures.append(f"{run.url}: {err}")
        run.failed_urls.add(run.url)
        self.router.report_failure(run.url)
        waited = now - run.first_failure
        if len(run.failures) > self._max_retries and waited >= self._outage_timeout_s:
            shown = run.failures[:3] + (["..."] if len(run.failures) > 4 else []) + (
                run.failures[3:][-1:])
            raise EngineUnavailable(
                f"request {run.req.rid} failed {len(run.failures)} times in {waited:.1f}s on "
                f"SGLang servers {sorted(run.failed_urls)} (rollout.sglang.max_retries = "
                f"{self._max_retries}, outage_timeout_s = {self._outage_timeout_s}): "
                + "; ".join(shown) + " -- check that the servers are up")
        self.num_resubmitted += 1
        await asyncio.sleep(min(self._retry_backoff_s * 2 ** (len(run.failures) - 1),
                                _MAX_BACKOFF_S))
        if len(run.failures) > 1 or run.url in self.router.offline:
            url = self.router.fallback(run.req.session_id, run.failed_urls)  # moves it
            if len(run.failed_urls) >= len(self.urls):
                run.failed_urls.clear()  # every server failed once: any may be back
            self.router.end(run.url)
            self.router.begin(url)
            run.url = url

    async def _abort_quietly(self, url: str, rid: str) -> None:
        """Best-effort POST /abort_request; the caller is already unwinding."""
        try:
            await self.control.abort_request(url, rid, timeout_s=self._abort_timeout_s)
        except EngineError:
            pass  # the server is gone or already finished the request
