"""Support for benchmarks/rollout_overhead.py: the servers it measures against (run in a
child process: `python bench_support.py SPEC_JSON`) and its measurement helpers.

The child serves the fake SGLang server (a fixed reply, zero latency) and a canned chat
completion endpoint (the SDK ceiling) until its stdin closes, and reports its own CPU
time at `/bench/stats`, so the parent can tell its CPU from the servers'.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import resource
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import httpx2
import msgspec
from aiohttp import web

# --- servers (child process) ---------------------------------------------------------

def canned_completion(content: str, num_prompt: int, num_out: int) -> bytes:
    return msgspec.json.encode({
        "id": "chatcmpl-canned", "object": "chat.completion", "created": 0,
        "model": "default", "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                                         "message": {"role": "assistant", "content": content}}],
        "usage": {"prompt_tokens": num_prompt, "completion_tokens": num_out,
                  "total_tokens": num_prompt + num_out}})


def make_canned_app(body: bytes) -> web.Application:
    """The SDK ceiling: a fixed chat completion; plus the child's CPU counter."""
    async def chat(_: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    async def stats(_: web.Request) -> web.Response:
        return web.json_response({"cpu_s": cpu_s()})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/bench/stats", stats)
    return app


async def serve(spec: dict) -> None:
    """Child: serve the fake SGLang server and the canned endpoint until stdin closes."""
    from areal_lite.testing.fake_sglang.server import FakeSGLangServer

    reply_ids = spec["reply_ids"]
    async with FakeSGLangServer(vocab_size=spec["vocab_size"], eos_token_id=spec["eos"],
                                max_context_len=spec["max_context_len"],
                                responder=lambda ids, sampling: list(reply_ids),
                                history=1) as fake:
        runner = web.AppRunner(make_canned_app(spec["canned"].encode()), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0, backlog=4096).start()
        port = runner.addresses[0][1]
        print(json.dumps({"fake_url": fake.url, "canned_url": f"http://127.0.0.1:{port}"}),
              flush=True)
        try:
            await asyncio.to_thread(sys.stdin.read)  # returns when the parent closes stdin
        finally:
            await runner.cleanup()


@dataclass
class Servers:
    fake_url: str  # fake SGLang base url
    canned_url: str  # canned endpoint base url (OpenAI base_url is this + /v1)
    session: aiohttp.ClientSession  # for the CPU counter only

    async def cpu_s(self) -> float:
        async with self.session.get(self.canned_url + "/bench/stats") as resp:
            return (await resp.json())["cpu_s"]


@contextlib.asynccontextmanager
async def start_servers(spec: dict) -> AsyncIterator[Servers]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, __file__, json.dumps(spec),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 60)
        if not line:
            raise RuntimeError("benchmark server process exited before listening; see stderr")
        urls = json.loads(line)
        async with aiohttp.ClientSession() as session:
            yield Servers(urls["fake_url"], urls["canned_url"], session)
    finally:
        proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            proc.kill()
            await proc.wait()


class CannedTransport(httpx2.AsyncBaseTransport):
    """An in-process transport answering every request with the same completion."""

    def __init__(self, body: bytes) -> None:
        self._body = body

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        await request.aread()
        await asyncio.sleep(0)  # yield once, as any real transport does: agents interleave
        return self._reply(request)

    def _reply(self, request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, headers={"content-type": "application/json"},
                               content=self._body, request=request)


class RoundTripTransport(CannedTransport):
    """The canned completion, after the engine round trip the proxy would make for the
    same call: the pre-encoded /generate body of that question and turn, POSTed to the
    fake server over the proxy's own keep-alive client (`Http1Pool`), reply parsed.
    What the proxy cannot avoid (the SDK, one loopback round trip, waiting for it),
    without its own work (parse, render, tokenize, sessions, export)."""

    def __init__(self, body: bytes, fake_url: str, bodies: dict[tuple[str, int], bytes],
                 max_connections: int, timeout_s: float) -> None:
        from areal_lite.engine.sglang.http1 import Http1Pool

        super().__init__(body)
        self._url, self._bodies, self._timeout_s = fake_url, bodies, timeout_s
        self._pool = Http1Pool(max_connections=max_connections)
        self._header = b"Content-Type: application/json\r\n"

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        from areal_lite.engine.sglang.wire import parse_generate

        messages = msgspec.json.decode(await request.aread())["messages"]
        gen_body = self._bodies[(messages[0]["content"], len(messages) // 2)]
        status, raw = await self._pool.post(self._url, "/generate", gen_body, self._header,
                                            self._timeout_s)
        if status != 200:
            raise RuntimeError(f"fake server answered {status}: {raw[:200]!r}")
        parse_generate(raw)
        return self._reply(request)

    async def aclose(self) -> None:
        await self._pool.close()


# --- measurement ---------------------------------------------------------------------

def cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def reset_peak_rss() -> None:
    with contextlib.suppress(OSError):  # not Linux: peak_rss_mb is then the run's peak
        Path("/proc/self/clear_refs").write_text("5")


def peak_rss_mb() -> float:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def round3(x: float) -> float | None:
    return None if math.isnan(x) else round(x, 3)  # JSON has no NaN


def to_ms(seconds: float) -> float | None:
    return round3(seconds * 1e3)


def percentile(sorted_xs: list[float], q: float) -> float:
    if not sorted_xs:
        return math.nan
    return sorted_xs[min(len(sorted_xs) - 1, int(q * len(sorted_xs)))]


@dataclass
class Recorder:
    latencies_s: list[float] = field(default_factory=list)  # one per successful call
    errors: dict[str, int] = field(default_factory=dict)  # exception type -> count
    stopping: bool = False  # set at the end of a window: agents make no new calls
    num_stuck: int = 0  # agents whose in-flight call did not finish within the drain

    def num_errors(self) -> int:
        return sum(self.errors.values())

    def num_calls(self) -> int:
        return len(self.latencies_s) + self.num_errors()

    def error(self, exc: BaseException) -> None:
        kind = type(exc).__name__
        self.errors[kind] = self.errors.get(kind, 0) + 1


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def run_async(coro: Awaitable) -> object:
    """On uvloop when installed (like the trainer), else the default asyncio loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


# --- raw HTTP agents in a child process (the proxy_tcp_raw variant) ------------------

async def raw_agent(port: int, key: str, questions: list[str], num_calls: int, turns: int,
                    max_tokens: int, latencies: list[float], errors: dict[str, int]) -> None:
    """One keep-alive connection: `num_calls` chat calls, `turns`-turn conversations."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n")
    messages: list[dict] = []
    try:
        for k in range(num_calls):
            if k % turns == 0:
                messages = [{"role": "user", "content": questions[k // turns % len(questions)]}]
            body = json.dumps({"model": "default", "messages": messages,
                               "max_tokens": max_tokens}).encode()
            start = time.perf_counter()
            writer.write(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
            status_line = await reader.readline()
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode().partition(":")
                if name.lower() == "content-length":
                    length = int(value)
            reply = await reader.readexactly(length)
            if not status_line.startswith(b"HTTP/1.1 200"):
                kind = status_line.decode().strip()
                errors[kind] = errors.get(kind, 0) + 1
                return
            latencies.append(time.perf_counter() - start)
            content = json.loads(reply)["choices"][0]["message"]["content"]
            messages += [{"role": "assistant", "content": content},
                         {"role": "user", "content": f"And then {k}?"}]
    except (OSError, asyncio.IncompleteReadError, ValueError) as e:
        errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
    finally:
        writer.close()


async def raw_agents_main(spec: dict) -> dict:
    latencies: list[float] = []
    errors: dict[str, int] = {}
    cpu0, start = cpu_s(), time.perf_counter()
    async with asyncio.TaskGroup() as tg:
        for key in spec["keys"]:
            tg.create_task(raw_agent(spec["port"], key, spec["questions"], spec["calls_each"],
                                     spec["turns"], spec["max_tokens"], latencies, errors))
    return {"latencies_s": latencies, "errors": errors, "seconds": time.perf_counter() - start,
            "cpu_s": cpu_s() - cpu0}


async def run_raw_agents(spec: dict) -> dict:
    """Run `raw_agents_main(spec)` in a child process (`python bench_support.py
    --raw-agents`, spec on stdin); returns its report."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(Path(__file__)), "--raw-agents", stdin=subprocess.PIPE,
        stdout=subprocess.PIPE)
    out, _ = await proc.communicate(json.dumps(spec).encode())
    if proc.returncode:
        raise RuntimeError(f"raw agents child failed with exit code {proc.returncode}")
    return json.loads(out)


if __name__ == "__main__":
    if sys.argv[1:] == ["--raw-agents"]:
        raise_fd_limit()
        print(json.dumps(run_async(raw_agents_main(json.loads(sys.stdin.read())))))
    else:
        run_async(serve(json.loads(sys.argv[1])))
