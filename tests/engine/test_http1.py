"""The lean HTTP/1.1 pool for /generate: against a raw asyncio server whose replies the
tests choose byte for byte (split packets, chunked, close-delimited, drops, stalls)."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from areal_lite.engine.sglang.http1 import Http1Pool

JSON = b"Content-Type: application/json\r\n"


class RawServer:
    """Reads one request at a time per connection; `reply(conn_no, request)` returns
    the list of byte strings to send (each sent separately), or None to drop."""

    def __init__(self, reply) -> None:
        self.reply = reply
        self.connections = 0
        self.live = 0
        self.max_live = 0
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> RawServer:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.server.wait_closed(), 2)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        conn_no = self.connections
        self.live += 1
        self.max_live = max(self.max_live, self.live)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length"))
                body = await reader.readexactly(length)
                self.requests.append(head + body)
                parts = await self.reply(conn_no, head + body)
                if parts is None:
                    break
                for part in parts:
                    if part == b"CLOSE":
                        return
                    writer.write(part)
                    await writer.drain()
                    await asyncio.sleep(0.01)  # separate packets
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.live -= 1
            writer.close()


def ok(body: bytes, extra: bytes = b"") -> list[bytes]:
    return [b"HTTP/1.1 200 OK\r\nContent-Length: " + str(len(body)).encode() + b"\r\n" + extra
            + b"\r\n" + body]


async def test_content_length_reply_split_across_packets_and_connection_reused():
    async def reply(conn, req):
        return [b"HTTP/1.1 200 OK\r\nContent-Le", b"ngth: 11\r\n\r\n{\"a\": ", b"1234}"]
    async with RawServer(reply) as srv:
        pool = Http1Pool()
        for _ in range(3):
            assert await pool.post(srv.url, "/generate", b'{"x":1}', JSON, 5) == (200, b'{"a": 1234}')
        await pool.close()
    assert srv.connections == 1
    head = srv.requests[0].split(b"\r\n\r\n")[0].split(b"\r\n")
    assert head[0] == b"POST /generate HTTP/1.1"
    assert b"Content-Length: 7" in head and b"Content-Type: application/json" in head
    assert any(h.startswith(b"Host: 127.0.0.1:") for h in head)


async def test_chunked_reply_is_decoded():
    async def reply(conn, req):
        return [b"HTTP/1.1 400 Bad Request\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel",
                b"lo\r\n6;ext=1\r\n world\r\n", b"0\r\n\r\n"]
    async with RawServer(reply) as srv:
        pool = Http1Pool()
        assert await pool.post(srv.url, "/generate", b"{}", JSON, 5) == (400, b"hello world")
        assert await pool.post(srv.url, "/generate", b"{}", JSON, 5) == (400, b"hello world")
        await pool.close()
    assert srv.connections == 1


async def test_a_204_reply_has_no_body_and_keeps_the_connection():
    async def reply(conn, req):
        return [b"HTTP/1.1 204 No Content\r\n\r\n"]
    async with RawServer(reply) as srv:
        pool = Http1Pool()
        assert await pool.post(srv.url, "/g", b"{}", JSON, 5) == (204, b"")
        assert await pool.post(srv.url, "/g", b"{}", JSON, 5) == (204, b"")
        await pool.close()
    assert srv.connections == 1


async def test_close_delimited_and_connection_close_replies_are_not_reused():
    async def reply(conn, req):
        if conn == 1:
            return [b"HTTP/1.1 200 OK\r\n\r\nuntil the end", b"CLOSE"]
        return ok(b"{}", b"Connection: close\r\n") + [b"CLOSE"]
    async with RawServer(reply) as srv:
        pool = Http1Pool()
        assert await pool.post(srv.url, "/g", b"{}", JSON, 5) == (200, b"until the end")
        assert await pool.post(srv.url, "/g", b"{}", JSON, 5) == (200, b"{}")
        assert await pool.post(srv.url, "/g", b"{}", JSON, 5) == (200, b"{}")
        await pool.close()
    assert srv.connections == 3


async def test_idle_connection_closed_by_the_server_is_not_reused():
    async def reply(conn, req):
        return ok(b"{}") + [b"CLOSE"] if conn == 1 else ok(b"{}")
    async with RawServer(reply) as srv:
        pool = Http1Pool()
        assert await pool.post(srv.url, "/g", b"{}", JSON, 5) == (200, b"{}")
        await asyncio.sleep(0.1)  # the server's close arrives while the connection is idle
        assert await pool.post(srv.url, "/g", b"{}", JSON, 5) == (200, b"{}")
        await pool.close()
    assert srv.connections == 2


async def test_stale_idle_connections_are_dropped_after_idle_timeout():
    async def reply(conn, req):
        return ok(b"{}")
    async with RawServer(reply) as srv:
        pool = Http1Pool(idle_timeout_s=0.05)
        await pool.post(srv.url, "/g", b"{}", JSON, 5)
        await asyncio.sleep(0.1)
        await pool.post(srv.url, "/g", b"{}", JSON, 5)
        await pool.close()
    assert srv.connections == 2


@pytest.mark.parametrize("parts", [None, [b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\nhalf",
                                          b"CLOSE"]],
                         ids=["dropped-before-reply", "dropped-mid-body"])
async def test_dropped_connection_raises_connection_error(parts):
    async def reply(conn, req):
        return parts
    async with RawServer(reply) as srv:
        pool = Http1Pool()
        with pytest.raises(ConnectionError, match="closed before the reply"):
            await pool.post(srv.url, "/g", b"{}", JSON, 5)
        await pool.close()


@pytest.mark.parametrize("status_line", [b"SSH-2.0-OpenSSH\r\n\r\n",
                                         b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n"])
async def test_malformed_reply_raises_connection_error(status_line):
    async def reply(conn, req):
        return [status_line]
    async with RawServer(reply) as srv:
        pool = Http1Pool()
        with pytest.raises(ConnectionError, match="malformed HTTP reply"):
            await pool.post(srv.url, "/g", b"{}", JSON, 5)
        await pool.close()


async def test_timeout_and_cancellation_close_the_connection():
    stall = asyncio.Event()

    async def reply(conn, req):
        if conn <= 2:
            await stall.wait()
        return ok(b"{}")
    async with RawServer(reply) as srv:
        pool = Http1Pool()
        with pytest.raises(TimeoutError):
            await pool.post(srv.url, "/g", b"{}", JSON, 0.1)
        task = asyncio.create_task(pool.post(srv.url, "/g", b"{}", JSON, 5))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # neither late reply can be read as the next request's: a new connection
        assert await pool.post(srv.url, "/g", b"{}", JSON, 5) == (200, b"{}")
        stall.set()
        await pool.close()
    assert srv.connections == 3


async def test_connect_failure_raises_connection_error():
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    pool = Http1Pool()
    with pytest.raises(ConnectionError, match="cannot connect"):
        await pool.post(f"http://127.0.0.1:{port}", "/g", b"{}", JSON, 5)


async def test_max_connections_bounds_concurrent_connections():
    async def reply(conn, req):
        await asyncio.sleep(0.05)
        return ok(b"{}")
    async with RawServer(reply) as srv:
        pool = Http1Pool(max_connections=2)
        replies = await asyncio.gather(*[pool.post(srv.url, "/g", b"{}", JSON, 5)
                                         for _ in range(6)])
        await pool.close()
    assert replies == [(200, b"{}")] * 6
    assert srv.max_live <= 2 and srv.connections == 2


def test_supports_plain_http_only():
    pool = Http1Pool()
    assert pool.supports("http://10.0.0.1:30000")
    assert not pool.supports("https://example.com")
    assert not pool.supports("unix:///tmp/s")
