"""engine/ SGLang client: the Engine Protocol over SGLang servers' native HTTP API.

Token-in, token-out: `POST /generate` with `input_ids` and `return_logprob`, one shared
keep-alive `aiohttp.ClientSession` (owned by the caller) for every server.

A request may run as several *segments* (server calls). `pause()` aborts every
request in flight on the servers; each keeps its partial tokens, waits for `resume()`,
and is resubmitted to the same server with the tokens appended to the prompt and the
remaining token budget, so the caller sees one uninterrupted result. A server that
fails (connection error, 5xx) is retried the same way, on the same server once and
then on others, at most `max_retries` times. Each token is tagged with the weight
version that sampled it: the current version, or while paused the version that was
live when the pause began.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import aclosing
from typing import Any

import aiohttp
import msgspec

from areal_lite.engine.base import EngineError, EngineUnavailable
from areal_lite.engine.sglang import weights as weights
from areal_lite.engine.sglang.control import SGLangControl
from areal_lite.engine.sglang.routing import SessionRouter
from areal_lite.engine.sglang.wire import (
    Segment,
    error_for_status,
    generate_body,
    parse_generate,
    parse_stream_event,
    sse_data,
)
from areal_lite.engine.stats import EngineStats
from areal_lite.types import GenerateRequest, GenerateResult, TokenChunk

__all__ = ["SGLangEngine"]


class _Retryable(Exception):
    """A segment failed in a way another attempt may fix (connection error, 5xx)."""


class _Run:
    """Progress of one logical request across its segments."""

    __slots__ = ("req", "url", "generated", "failures", "failed_urls", "num_segments",
                 "rid", "cached")

    def __init__(self, req: GenerateRequest, url: str) -> None:
        self.req = req
        self.url = url
        self.generated: list[int] = []  # tokens produced so far, all segments
        self.failures: list[str] = []  # "url: error" per failed attempt
        self.failed_urls: set[str] = set()
        self.num_segments = 0
        self.rid: str | None = None  # rid of the segment in flight
        self.cached: int | None = None  # cached_tokens of the first segment


class SGLangEngine:
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
    ) -> None:
        if not urls:
            raise ValueError("SGLangEngine needs at least one server url, got []")
        self.urls = [u.rstrip("/") for u in urls]
        self._session = session
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._gen_headers = {**self._headers, "Content-Type": "application/json"}
        self._timeout = aiohttp.ClientTimeout(total=request_timeout_s,
                                              sock_connect=connect_timeout_s)
        self._request_timeout_s = request_timeout_s
        self._max_retries = max_retries
        self._retry_backoff_s = retry_backoff_s
        self._abort_timeout_s = abort_timeout_s
        self._tp_size = tp_size
        self._max_context_len = max_context_len
        self.router = SessionRouter(self.urls, cooldown_s=unhealthy_cooldown_s)
        self.control = SGLangControl(self.urls, session=session, headers=self._headers,
                                     timeout_s=control_timeout_s,
                                     connect_timeout_s=connect_timeout_s)
        self.server_weight_versions: dict[str, str] = {}  # url -> last meta_info version
        self._stats = EngineStats(step_counts=False)  # from responses (engine/stats.py)
        self._version = initial_version
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

    # -- weights -------------------------------------------------------------------

    async def update_weights(
        self,
        named_tensors: Mapping[str, object] | Iterable[tuple[str, object]],
        version: int,
        *,
        flush_cache: bool | None = None,
        load_format: str | None = None,
    ) -> None:
        """Colocated update by CUDA IPC handles (`/update_weights_from_tensor`)."""
        await weights.update_weights_from_tensor(
            self.control, named_tensors, version, tp_size=self._tp_size,
            flush_cache=flush_cache, load_format=load_format)
        self._version = version

    async def update_weights_from_disk(
        self, model_path: str, version: int, *, load_format: str | None = None
    ) -> None:
        """Load a checkpoint directory on every server (aborts requests in flight)."""
        await weights.update_weights_from_disk(self.control, model_path, version,
                                               load_format=load_format)
        self._version = version

    async def init_weights_update_group(
        self, master_address: str, master_port: int, rank_offset: int, world_size: int,
        group_name: str = "weight_update_group", backend: str = "nccl", *,
        timeout_s: float = 600.0,
    ) -> None:
        """Servers join the trainer's process group (see sglang_weights for ranks)."""
        await weights.init_weights_update_group(
            self.control, master_address=master_address, master_port=master_port,
            rank_offset=rank_offset, world_size=world_size, group_name=group_name,
            backend=backend, tp_size=self._tp_size, timeout_s=timeout_s)

    async def destroy_weights_update_group(self, group_name: str = "weight_update_group"
                                           ) -> None:
        await weights.destroy_weights_update_group(self.control, group_name)

    async def update_weights_from_distributed(
        self, names: Sequence[str], dtypes: Sequence[Any], shapes: Sequence[Sequence[int]],
        version: int, group_name: str = "weight_update_group", *,
        flush_cache: bool | None = None, load_format: str | None = None,
        timeout_s: float = 600.0,
    ) -> None:
        """HTTP half of a broadcast update; the trainer broadcasts the tensors meanwhile."""
        await weights.update_weights_from_distributed(
            self.control, names, dtypes, shapes, version, group_name=group_name,
            flush_cache=flush_cache, load_format=load_format, timeout_s=timeout_s)
        self._version = version

    async def release_memory_occupation(self, tags: list[str] | None = None) -> None:
        await self.control.release_memory_occupation(tags)

    async def resume_memory_occupation(self, tags: list[str] | None = None) -> None:
        await self.control.resume_memory_occupation(tags)

    async def flush_cache(self) -> None:
        await self.control.flush_cache()

    async def get_model_info(self, url: str | None = None) -> dict[str, Any]:
        return await self.control.model_info(url)

    async def get_server_info(self, url: str | None = None) -> dict[str, Any]:
        return await self.control.server_info(url)

    async def check_health(self) -> dict[str, bool]:
        return await self.control.check_health()

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
                    async with aclosing(self._segment(run, stream)) as segments:
                        async for last in segments:
                            if last.finish_reason is None and last.output_ids:
                                yield self._chunk(last, None)
                    if last is None or last.finish_reason is None:
                        raise _Retryable("stream ended without a finish_reason")
                except _Retryable as e:
                    await self._prepare_retry(run, e)
                    continue
                if last.finish_reason == "abort" and (
                        self._paused or self._pause_epoch != epoch):
                    if last.output_ids:  # aborted by our pause: keep tokens, resubmit
                        yield self._chunk(last, None)
                    continue
                yield self._chunk(last, last.finish_reason)
                return
        except (asyncio.CancelledError, GeneratorExit):
            if run.rid is not None:
                await asyncio.shield(self._abort_quietly(run.url, run.rid))
            raise
        finally:
            self.router.end(run.url)

    def _chunk(self, seg: Segment, finish_reason: str | None) -> TokenChunk:
        v = self._paused_version if self._paused else self._version
        return TokenChunk(output_ids=seg.output_ids, logprobs=seg.logprobs,
                          versions=[v] * len(seg.output_ids), finish_reason=finish_reason,
                          matched_stop=seg.matched if finish_reason else None)

    async def _segment(self, run: _Run, stream: bool) -> AsyncIterator[Segment]:
        """POST one /generate for `run`; yield its Segment(s) (new tokens only)."""
        rid = run.req.rid if run.num_segments == 0 else f"{run.req.rid}.{run.num_segments}"
        run.num_segments += 1
        body = msgspec.json.encode(
            generate_body(run.req, generated=run.generated, rid=rid, stream=stream))
        url = run.url
        run.rid = rid
        try:
            async with self._session.post(url + "/generate", data=body,
                                          headers=self._gen_headers,
                                          timeout=self._timeout) as resp:
                if resp.status != 200:
                    raw = await resp.read()
                    if resp.status >= 500:
                        raise _Retryable(f"HTTP {resp.status}: {raw[:300]!r}")
                    raise error_for_status(resp.status, raw, url)
                if stream:
                    async with aclosing(self._sse_segments(resp, run)) as segments:
                        async for seg in segments:
                            yield seg
                else:
                    seg = parse_generate(await resp.read())
                    self._note(run, seg)
                    self._count_prompt(seg)
                    run.generated.extend(seg.output_ids)
                    yield seg
            run.rid = None
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as e:
            run.rid = None
            raise _Retryable(repr(e)) from e
        except TimeoutError as e:
            await asyncio.shield(self._abort_quietly(url, rid))
            run.rid = None
            raise EngineError(f"{url}/generate gave no result within "
                              f"{self._request_timeout_s}s (request_timeout_s)") from e
        self.router.report_success(url)

    async def _sse_segments(self, resp: aiohttp.ClientResponse, run: _Run
                            ) -> AsyncIterator[Segment]:
        num_seen, counts = 0, None  # counts: the last event that carried prompt counts
        try:
            async with aclosing(sse_data(resp)) as events:
                async for data in events:
                    delta = parse_stream_event(data, num_seen)
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
        """Record a failed attempt; pick the next server or give up."""
        run.failures.append(f"{run.url}: {err}")
        run.failed_urls.add(run.url)
        self.router.report_failure(run.url)
        if len(run.failures) > self._max_retries:
            raise EngineUnavailable(
                f"request {run.req.rid} failed {len(run.failures)} times on SGLang "
                f"servers {sorted(run.failed_urls)}: " + "; ".join(run.failures)
                + " -- check that the servers are up")
        if len(run.failures) > 1:  # first retry: same server; then others
            url = self.router.fallback(run.req.session_id, run.failed_urls)
            self.router.end(run.url)
            self.router.begin(url)
            run.url = url
        await asyncio.sleep(self._retry_backoff_s * 2 ** (len(run.failures) - 1))

    async def _abort_quietly(self, url: str, rid: str) -> None:
        """Best-effort POST /abort_request; the caller is already unwinding."""
        try:
            await self.control.abort_request(url, rid, timeout_s=self._abort_timeout_s)
        except EngineError:
            pass  # the server is gone or already finished the request
