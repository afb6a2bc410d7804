"""engine/ SGLang control plane: pause, continue, abort, memory, cache, info, health.

Everything except `/generate` goes through `SGLangControl`: one bounded-timeout JSON
call to one server (`call`) or the same call to every server at once (`call_all`),
retried through an outage of up to `outage_timeout_s` (a server a supervisor took out
of `urls` meanwhile is skipped: it catches up when it is back).
Weight updates build on it in `sglang_weights.py`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import aiohttp
import msgspec

from areal_lite.engine.base import EngineError, EngineUnavailable
from areal_lite.engine.sglang.wire import error_for_status

__all__ = ["MEMORY_TAGS", "SKIPPED", "SGLangControl"]

MEMORY_TAGS = ("weights", "kv_cache", "cuda_graph")  # what release/resume can act on
SKIPPED = object()  # call_retrying's reply for a server that went down meanwhile

_decoder = msgspec.json.Decoder()


class SGLangControl:
    """Control calls to a fixed set of SGLang servers over a caller-owned session."""

    def __init__(
        self,
        urls: list[str],
        *,
        session: aiohttp.ClientSession,
        headers: dict[str, str],
        timeout_s: float = 60.0,  # default limit for one control call
        connect_timeout_s: float = 10.0,
        outage_timeout_s: float = 0.0,  # how long call_all retries an unreachable server
        retry_backoff_s: float = 0.05,  # first retry delay, doubled per retry (max 2 s)
    ) -> None:
        self.urls = list(urls)  # the servers call_all reaches (a supervisor drops dead ones)
        self._session = session
        self._headers = headers
        self._timeout_s = timeout_s
        self._connect_timeout_s = connect_timeout_s
        self.outage_timeout_s = outage_timeout_s
        self._retry_backoff_s = retry_backoff_s
        self.num_retries = 0  # control calls repeated after an unreachable server

    def only(self, url: str) -> SGLangControl:
        """The same control plane restricted to one server."""
        one = SGLangControl([url], session=self._session, headers=self._headers,
                            timeout_s=self._timeout_s, connect_timeout_s=self._connect_timeout_s,
                            outage_timeout_s=self.outage_timeout_s,
                            retry_backoff_s=self._retry_backoff_s)
        return one

    def timeout(self, total_s: float | None) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(
            total=self._timeout_s if total_s is None else total_s,
            sock_connect=self._connect_timeout_s,
        )

    async def call(
        self,
        url: str,
        path: str,
        body: Any = None,
        *,
        method: str = "POST",
        timeout_s: float | None = None,
    ) -> Any:
        """One call; returns the decoded JSON reply (text for non-JSON, None if empty).

        Raises EngineUnavailable when the server cannot be reached or times out, and
        EngineError for HTTP errors (with the server's message).
        """
        data = None if body is None else msgspec.json.encode(body)
        headers = self._headers
        if data is not None:
            headers = {**headers, "Content-Type": "application/json"}
        try:
            async with self._session.request(
                method, url + path, data=data, headers=headers,
                timeout=self.timeout(timeout_s),
            ) as resp:
                raw = await resp.read()
                status = resp.status
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as e:
            raise EngineUnavailable(f"{url}{path}: cannot reach server ({e!r})") from e
        except TimeoutError as e:
            limit = self._timeout_s if timeout_s is None else timeout_s
            raise EngineUnavailable(f"{url}{path}: no reply within {limit}s") from e
        if status >= 400:
            raise _failure(status, raw, url, path)
        return _decode(raw)

    async def call_retrying(self, url: str, path: str, body: Any = None, *,
                            method: str = "POST", timeout_s: float | None = None) -> Any:
        """`call`, repeated with backoff while the server is unreachable, for up to
        `outage_timeout_s`. Returns `SKIPPED` when the server left `urls` meanwhile (its
        supervisor saw it exit; it is brought up to date when it comes back)."""
        loop = asyncio.get_running_loop()
        start, attempt = loop.time(), 0
        while True:
            try:
                return await self.call(url, path, body, method=method, timeout_s=timeout_s)
            except EngineUnavailable as e:
                if url not in self.urls:
                    return SKIPPED
                waited = loop.time() - start
                if waited >= self.outage_timeout_s:
                    if self.outage_timeout_s:
                        raise EngineUnavailable(
                            f"{e} -- still unreachable after {waited:.0f}s "
                            f"(rollout.sglang.outage_timeout_s = {self.outage_timeout_s})"
                        ) from e
                    raise
            attempt += 1
            self.num_retries += 1
            await asyncio.sleep(min(self._retry_backoff_s * 2 ** (attempt - 1), 2.0))
            if url not in self.urls:
                return SKIPPED

    async def call_each(
        self,
        path: str,
        body: Any | Callable[[int, str], Any] = None,
        *,
        method: str = "POST",
        timeout_s: float | None = None,
    ) -> dict[str, Any]:
        """The same call on every server in `urls` concurrently (each retried through an
        outage, see `call_retrying`); url -> reply, without servers that went down.

        `body` may be a function (server index, url) -> body for per-server bodies.
        Every server is tried; if any fails, one EngineError names all failures
        (EngineUnavailable when every failure was an unreachable server).
        """
        urls = list(self.urls)
        bodies = [body(i, u) if callable(body) else body for i, u in enumerate(urls)]
        results = await asyncio.gather(
            *(self.call_retrying(u, path, b, method=method, timeout_s=timeout_s)
              for u, b in zip(urls, bodies)),
            return_exceptions=True,
        )
        for r in results:  # never swallow cancellation or interpreter exits
            if isinstance(r, BaseException) and not isinstance(r, Exception):
                raise r
        errors = [r for r in results if isinstance(r, Exception)]
        if errors:
            msg = f"{path} failed on {len(errors)}/{len(urls)} servers: " + "; ".join(
                str(e) for e in errors)
            if all(isinstance(e, EngineUnavailable) for e in errors):
                raise EngineUnavailable(msg)
            raise EngineError(msg)
        return {u: r for u, r in zip(urls, results) if r is not SKIPPED}

    async def call_all(self, path: str, body: Any | Callable[[int, str], Any] = None, *,
                       method: str = "POST", timeout_s: float | None = None) -> list[Any]:
        """`call_each`'s replies, in server order."""
        replies = await self.call_each(path, body, method=method, timeout_s=timeout_s)
        return list(replies.values())

    async def pause_generation(self, mode: str = "abort") -> None:
        await self.call_all("/pause_generation", {"mode": mode})

    async def continue_generation(self) -> None:
        await self.call_all("/continue_generation", {})

    async def abort_request(self, url: str, rid: str, *, timeout_s: float = 5.0) -> None:
        await self.call(url, "/abort_request", {"rid": rid}, timeout_s=timeout_s)

    async def release_memory_occupation(self, tags: list[str] | None = None) -> None:
        """Free GPU memory (call while paused; the server must be idle)."""
        await self.call_all("/release_memory_occupation", _tags_body(tags))

    async def resume_memory_occupation(self, tags: list[str] | None = None) -> None:
        """Take the memory back; resumed weights are garbage until the next update."""
        await self.call_all("/resume_memory_occupation", _tags_body(tags))

    async def flush_cache(self) -> None:
        """Reset every server's radix cache (fails with EngineError if one is busy)."""
        await self.call_all("/flush_cache")

    async def model_info(self, url: str | None = None) -> dict[str, Any]:
        return await self.call(url or self.urls[0], "/model_info", method="GET")

    async def server_info(self, url: str | None = None) -> dict[str, Any]:
        return await self.call(url or self.urls[0], "/server_info", method="GET")

    async def models(self, url: str, *, timeout_s: float | None = None) -> dict[str, Any]:
        return await self.call(url, "/v1/models", method="GET", timeout_s=timeout_s)

    async def check_health(self, *, timeout_s: float = 30.0) -> dict[str, bool]:
        """url -> whether GET /health answered 200 within `timeout_s`."""
        async def one(url: str) -> bool:
            try:
                await self.call(url, "/health", method="GET", timeout_s=timeout_s)
            except EngineError:
                return False
            return True

        return dict(zip(self.urls, await asyncio.gather(*(one(u) for u in self.urls))))


def _tags_body(tags: list[str] | None) -> dict[str, Any]:
    if tags is None:
        return {}
    bad = [t for t in tags if t not in MEMORY_TAGS]
    if bad:
        raise ValueError(f"memory tags must be among {MEMORY_TAGS}, got {bad}")
    return {"tags": list(tags)}


def _decode(raw: bytes) -> Any:
    if not raw:
        return None
    try:
        return _decoder.decode(raw)
    except msgspec.DecodeError:
        return raw.decode(errors="replace")


def _failure(status: int, raw: bytes, url: str, path: str) -> EngineError:
    if status == 503:  # starting, shutting down, or health probe timed out
        return EngineUnavailable(f"{url}{path} answered HTTP 503: "
                                 f"{raw.decode(errors='replace')[:500]}")
    return error_for_status(status, raw, url + path)
