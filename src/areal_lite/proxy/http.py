"""Proxy transport: one handler signature, served over aiohttp TCP and in process.

Handlers take a `ProxyRequest` and return a `ProxyResponse`; they never see aiohttp or
httpx. `serve_aiohttp` adapts them to a TCP server (external and subproc agents), and
`InProcessTransport` adapts them to an `httpx2.AsyncClient` (inline agents: no socket,
no HTTP parsing, same event loop) — decision 6, "one hop".
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
import httpx2
import msgspec
from aiohttp import web

_JSON = {"content-type": "application/json"}
_SSE = {"content-type": "text/event-stream", "cache-control": "no-cache"}


@dataclass(slots=True)
class ProxyRequest:
    method: str  # upper case
    path: str  # without query string
    headers: dict[str, str]  # lower-case names
    body: bytes

    def bearer(self) -> str | None:
        """The bearer token (OpenAI SDK) or x-api-key (Anthropic SDK), if any."""
        auth = self.headers.get("authorization", "")
        if auth[:7].lower() == "bearer ":
            return auth[7:].strip()
        return self.headers.get("x-api-key")


@dataclass(slots=True)
class ProxyResponse:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=lambda: dict(_JSON))
    stream: AsyncIterator[bytes] | None = None  # SSE body, when streaming


Handler = Callable[[ProxyRequest], Awaitable[ProxyResponse]]


def json_response(obj: object, status: int = 200) -> ProxyResponse:
    return ProxyResponse(status=status, body=msgspec.json.encode(obj))


def sse_response(chunks: AsyncIterator[bytes]) -> ProxyResponse:
    return ProxyResponse(status=200, headers=dict(_SSE), stream=chunks)


class _Started:
    """An SSE body whose first event was already produced; closing it closes the body."""

    def __init__(self, first: bytes | None, chunks: AsyncGenerator[bytes]) -> None:
        self._first, self._chunks = first, chunks

    def __aiter__(self) -> _Started:
        return self

    async def __anext__(self) -> bytes:
        if self._first is not None:
            first, self._first = self._first, None
            return first
        return await anext(self._chunks)

    async def aclose(self) -> None:
        await self._chunks.aclose()


async def started_sse(chunks: AsyncGenerator[bytes]) -> ProxyResponse:
    """An SSE reply whose first event is awaited now: whatever fails before it (the
    engine refusing the request) raises here, so the route still answers with an error
    status in its API's shape instead of a 200 stream carrying an error event."""
    first = await anext(chunks, None)
    return sse_response(_Started(first, chunks))


class ApiError(Exception):
    """An OpenAI-shaped error: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = (
            status, message, type, code, param)
        self.engine_error: BaseException | None = None  # the engine failure behind a 5xx

    def response(self) -> ProxyResponse:
        return json_response({"error": {"message": self.message, "type": self.type,
                                        "param": self.param, "code": self.code}},
                             self.status)


def sse_event(obj: object) -> bytes:
    return b"data: " + msgspec.json.encode(obj) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


# --- aiohttp (TCP) -------------------------------------------------------------------

Refuse = Callable[[ProxyRequest], "ProxyResponse | None"]  # from the headers alone
Reject = Callable[[str, ApiError], ProxyResponse]  # (path, error) -> the reply


def _client_gone(exc: BaseException) -> bool:
    """The client closed its connection: nothing to answer, nothing to log."""
    return isinstance(exc, (ConnectionResetError, aiohttp.ClientConnectionResetError))


def make_aiohttp_app(dispatch: Handler, *, refuse: Refuse, reject: Reject,
                     max_request_bytes: int, body_timeout_s: float) -> web.Application:
    """`refuse` sees the method, path and headers before any body byte is read; a
    refusal closes the connection, so an unwanted upload is never read. A body over
    `max_request_bytes` is a 413 and one slower than `body_timeout_s` a 408, both in
    the route's error shape (`reject`)."""
    def early(request: web.Request, presp: ProxyResponse) -> web.Response:
        resp = web.Response(status=presp.status, body=presp.body, headers=presp.headers)
        resp.force_close()  # the unread body (if any) is dropped with the connection
        return resp

    async def handle(request: web.Request) -> web.StreamResponse:
        preq = ProxyRequest(method=request.method, path=request.path,
                            headers={k.lower(): v for k, v in request.headers.items()},
                            body=b"")
        refused = refuse(preq)
        if refused is not None:
            return early(request, refused)
        if (request.content_length or 0) > max_request_bytes:
            return early(request, reject(preq.path, _too_large(max_request_bytes)))
        try:
            async with asyncio.timeout(body_timeout_s):
                preq.body = await request.read()
        except TimeoutError:
            return early(request, reject(preq.path, ApiError(
                408, f"request body not received within {body_timeout_s} s")))
        except web.HTTPRequestEntityTooLarge:  # chunked, no Content-Length
            return early(request, reject(preq.path, _too_large(max_request_bytes)))
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            return web.Response(status=499)  # the client went away mid-request
        presp = await dispatch(preq)
        if presp.stream is None:
            return web.Response(status=presp.status, body=presp.body, headers=presp.headers)
        resp = web.StreamResponse(status=presp.status, headers=presp.headers)
        try:
            await resp.prepare(request)
            async for chunk in presp.stream:
                await resp.write(chunk)
            await resp.write_eof()
        except Exception as e:
            if not _client_gone(e):
                raise
            resp.force_close()  # an agent that leaves mid-stream is not an error
        finally:
            await presp.stream.aclose()  # type: ignore[attr-defined]  # aborts generation
        return resp

    app = web.Application(client_max_size=max_request_bytes)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"request body is larger than {limit} bytes "
                    "(rollout.proxy.max_request_mb)", code="request_too_large")


# --- in process (httpx2) -------------------------------------------------------------

class _ChunkStream(httpx2.AsyncByteStream):
    def __init__(self, chunks: AsyncIterator[bytes]) -> None:
        self._chunks = chunks

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._chunks:
            yield chunk

    async def aclose(self) -> None:
        await self._chunks.aclose()  # type: ignore[attr-defined]


class InProcessTransport(httpx2.AsyncBaseTransport):
    """An httpx2 transport that calls the proxy's handlers directly in this loop."""

    def __init__(self, dispatch: Handler, *, refuse: Refuse, reject: Reject,
                 max_request_bytes: int) -> None:
        self._dispatch, self._refuse, self._reject = dispatch, refuse, reject
        self._max_request_bytes = max_request_bytes

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        """The same checks in the same order as over TCP (refuse, size, dispatch)."""
        preq = ProxyRequest(method=request.method, path=request.url.path,
                            headers=_header_dict(request.headers.raw), body=b"")
        presp = self._refuse(preq)
        if presp is None:
            preq.body = await request.aread()
            if len(preq.body) > self._max_request_bytes:
                presp = self._reject(preq.path, _too_large(self._max_request_bytes))
            else:
                presp = await self._dispatch(preq)
        if presp.stream is None:
            return httpx2.Response(presp.status, headers=presp.headers, content=presp.body,
                                   request=request)
        return httpx2.Response(presp.status, headers=presp.headers,
                               stream=_ChunkStream(presp.stream), request=request)


def _header_dict(raw: list[tuple[bytes, bytes]]) -> dict[str, str]:
    """Lower-case name -> value, repeated names joined with ", " (as httpx's `items()`,
    without its per-item charset checks: latin-1 decodes any bytes)."""
    out: dict[str, str] = {}
    for k, v in raw:
        key, value = k.decode("latin-1").lower(), v.decode("latin-1")
        out[key] = f"{out[key]}, {value}" if key in out else value
    return out
