"""A minimal keep-alive HTTP/1.1 client for the one hot call: POST /generate, not streamed.

aiohttp costs about 0.18 ms of CPU per request here (request and response objects, a
writer task per request, timers, traces); at thousands of agents that is most of what the
proxy spends per call. This pool sends a request as one pre-built byte string on a
reused connection and parses the reply in its protocol callback: no task, no objects
beyond a future. It speaks only what SGLang's (uvicorn's) JSON replies use:

- a `Content-Length` body, a chunked body, or a body that ends when the server closes;
- keep-alive, with `Connection: close` honoured; idle connections are dropped after
  `idle_timeout_s` (keep it below the server's keep-alive timeout, uvicorn's is 5 s).

A connection failure raises `ConnectionError` (the caller retries the request, as it
does aiohttp's), a `timeout_s` overrun `TimeoutError`, both with the connection closed;
so does a cancellation. A connection the server closed while idle is seen closed and
not reused. Streaming and the control routes stay on aiohttp.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from urllib.parse import urlsplit

__all__ = ["Http1Pool"]

_MAX_HEAD = 64 << 10  # a reply head longer than this is not an HTTP server we know


class _Conn(asyncio.Protocol):
    """One connection; at most one request in flight."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self._reply: asyncio.Future[tuple[int, bytes]] | None = None
        self._buf = bytearray()
        self._head_end = -1  # index past the blank line, once the head is in
        self._status = 0
        self._length: int | None = None  # Content-Length
        self._chunked = False
        self._body = bytearray()  # decoded chunks so far
        self.keep_alive = True

    # --- asyncio.Protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self._reply is None or self._reply.done():
            self.close()  # bytes nobody asked for: this connection is out of step
            return
        self._buf += data
        try:
            if self._head_end < 0 and not self._parse_head():
                return
            self._parse_body()
        except ValueError as e:
            self._fail(ConnectionError(f"malformed HTTP reply: {e}"))

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._reply is None or self._reply.done():
            return
        if (self._head_end >= 0 and self._length is None and not self._chunked):
            self._reply.set_result((self._status, bytes(self._buf[self._head_end:])))
        else:
            self._reply.set_exception(ConnectionError(
                f"connection closed before the reply was complete ({exc or 'by the server'})"))

    # --- one request ----------------------------------------------------------------

    def send(self, request: bytes) -> asyncio.Future[tuple[int, bytes]]:
        self._reply = asyncio.get_running_loop().create_future()
        self._buf.clear()
        self._body.clear()
        self._head_end, self._status, self._length, self._chunked = -1, 0, None, False
        self.transport.write(request)  # type: ignore[union-attr]
        return self._reply

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def _fail(self, err: Exception) -> None:
        if self._reply is not None and not self._reply.done():
            self._reply.set_exception(err)
        self.close()

    def _parse_head(self) -> bool:
        end = self._buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buf) > _MAX_HEAD:
                raise ValueError("reply head too long")
            return False
        lines = bytes(self._buf[:end]).decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise ValueError(f"bad status line {lines[0][:80]!r}")
        self._status = int(parts[1])
        self.keep_alive = parts[0] == "HTTP/1.1"
        for line in lines[1:]:
            name, _, value = line.partition(":")
            name, value = name.strip().lower(), value.strip()
            if name == "content-length":
                if not value.isdigit():
                    raise ValueError(f"bad Content-Length {value[:40]!r}")
                self._length = int(value)
            elif name == "transfer-encoding":
                self._chunked = "chunked" in value.lower()
            elif name == "connection":
                self.keep_alive = value.lower() != "close" and (
                    self.keep_alive or value.lower() == "keep-alive")
        self._head_end = end + 4
        if self._status in (204, 304):
            self._length, self._chunked = 0, False  # no body, whatever the headers say
        elif self._chunked:
            self._length = None
        elif self._length is None:
            self.keep_alive = False  # the body ends when the server closes
        return True

    def _parse_body(self) -> None:
        if self._chunked:
            self._parse_chunks()
        elif self._length is not None and len(self._buf) - self._head_end >= self._length:
            start = self._head_end
            self._done(bytes(self._buf[start:start + self._length]))

    def _parse_chunks(self) -> None:
        pos = self._head_end
        while True:
            line_end = self._buf.find(b"\r\n", pos)
            if line_end < 0:
                break
            size_text = bytes(self._buf[pos:line_end]).split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise ValueError(f"bad chunk size {size_text[:20]!r}") from None
            if size == 0:  # the last chunk; its trailers (none expected) end with "\r\n\r\n"
                if self._buf.find(b"\r\n\r\n", line_end) < 0:
                    break
                self._done(bytes(self._body))
                return
            if len(self._buf) < line_end + 2 + size + 2:
                break
            self._body += self._buf[line_end + 2:line_end + 2 + size]
            pos = line_end + 2 + size + 2
        del self._buf[self._head_end:pos]  # keep only what is not decoded yet

    def _done(self, body: bytes) -> None:
        self.idle_since = time.monotonic()
        assert self._reply is not None
        self._reply.set_result((self._status, body))


class Http1Pool:
    """Keep-alive connections per server, `max_connections` in all."""

    def __init__(self, *, max_connections: int = 1024, connect_timeout_s: float = 10.0,
                 idle_timeout_s: float = 4.0) -> None:
        self._limit = asyncio.Semaphore(max_connections)
        self._connect_timeout_s = connect_timeout_s
        self._idle_timeout_s = idle_timeout_s
        self._idle: dict[tuple[str, int], deque[_Conn]] = {}
        self._targets: dict[str, tuple[str, int, bytes]] = {}  # url -> host, port, Host:
        self._supported: dict[str, bool] = {}
        self._closed = False

    def supports(self, url: str) -> bool:
        """Plain http:// with a host (https and unix sockets stay on aiohttp)."""
        ok = self._supported.get(url)
        if ok is None:
            parts = urlsplit(url)
            ok = self._supported[url] = parts.scheme == "http" and bool(parts.hostname)
        return ok

    async def post(self, url: str, path: str, body: bytes, headers: bytes,
                   timeout_s: float) -> tuple[int, bytes]:
        """POST `body` to `url + path`; `headers` are pre-encoded `Name: value\\r\\n`
        lines (Content-Type among them). Returns (status, body)."""
        if self._closed:
            raise ConnectionError("the HTTP pool is closed")
        host, port, host_line = self._target(url)
        request = b"".join((b"POST ", path.encode(), b" HTTP/1.1\r\n", host_line, headers,
                            b"Content-Length: ", str(len(body)).encode(), b"\r\n\r\n", body))
        async with self._limit, asyncio.timeout(timeout_s):
            conn = await self._acquire(host, port)
            try:
                status, reply = await conn.send(request)
            except BaseException:  # failed, timed out or cancelled: the reply is unread
                conn.close()
                raise
            self._release(host, port, conn)
            return status, reply

    async def close(self) -> None:
        self._closed = True
        for idle in self._idle.values():
            while idle:
                idle.pop().close()

    def _target(self, url: str) -> tuple[str, int, bytes]:
        target = self._targets.get(url)
        if target is None:
            parts = urlsplit(url)
            host, port = parts.hostname or "", parts.port or 80
            target = self._targets[url] = (host, port, f"Host: {parts.netloc}\r\n".encode())
        return target

    async def _acquire(self, host: str, port: int) -> _Conn:
        idle = self._idle.get((host, port))
        now = time.monotonic()
        while idle:
            conn = idle.pop()  # the most recently used: the least likely to be stale
            if not conn.closed and now - conn.idle_since < self._idle_timeout_s:
                return conn
            conn.close()
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                _, conn = await loop.create_connection(_Conn, host, port)
        except TimeoutError:
            raise ConnectionError(f"connecting to {host}:{port} took over "
                                  f"{self._connect_timeout_s}s") from None
        except OSError as e:
            raise ConnectionError(f"cannot connect to {host}:{port}: {e}") from e
        return conn

    def _release(self, host: str, port: int, conn: _Conn) -> None:
        if conn.closed or not conn.keep_alive or self._closed:
            conn.close()
            return
        idle = self._idle.setdefault((host, port), deque())
        idle.append(conn)
        now = time.monotonic()
        while idle and now - idle[0].idle_since >= self._idle_timeout_s:
            idle.popleft().close()  # the oldest ones went stale
