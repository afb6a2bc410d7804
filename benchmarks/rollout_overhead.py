"""Benchmark: what the proxy path costs an agent, from the OpenAI SDK to the engine.

Agents are written with the real OpenAI SDK (what users run): each episode is K chat
turns, every turn appends the reply and a new user message. The inference server is
the fake SGLang server with zero latency and a fixed short reply. For each concurrency
(number of agents running at once) it runs, and prints one JSON line per variant:

    sdk_ceiling       SDK agents -> a canned chat completion (aiohttp, loopback, no work)
                      through ONE shared httpx2 client: what the SDK itself costs
    sdk_ceiling_inproc  the same agents with an in-process httpx2 transport that returns
                      the canned completion (no socket): the SDK alone, the ceiling of
                      the `proxy` variant's transport
    sdk_ceiling_roundtrip  the same, but the transport first makes the engine round trip
                      the proxy would make for that call (its /generate body, pre-encoded,
                      to the fake server over the proxy's keep-alive client): the SDK plus
                      what no proxy can avoid, without the proxy's own work
    floor             the same number of calls straight to the fake server's /generate
                      with pre-tokenized ids over one aiohttp ClientSession (no SDK/proxy)
    proxy             SDK agents -> our proxy through `proxy.http_client()` (in-process
                      transport, no socket): the path inline agents take
    proxy_tcp         the same over loopback TCP with one shared httpx2 client (what an
                      external agent pays)
    proxy_new_client  the same over TCP with a new SDK-default client per episode
    proxy_tcp_raw     agents in a child process sending raw HTTP/1.1 over one keep-alive
                      connection each (one session per connection, K-turn chats, no SDK
                      in the measured process): `cpu_ms_per_call` is the proxy process's
                      CPU alone, `agent_cpu_ms_per_call` the child's

`sdk_ceiling_inproc`, `sdk_ceiling_roundtrip` and `proxy` run `--rounds` times each,
interleaved (round 1 of each, then round 2, ...), so a machine that speeds up or slows
down during the run bills them alike. Their rows are the median round (by requests/s)
with every round's figures in `*_rounds`; the `proxy` row adds the medians over rounds of
the per-round comparisons: `vs_sdk_ceiling_inproc` (requests/s ratio),
`own_cpu_ms_per_call` (CPU per call minus sdk_ceiling_inproc's: the proxy's own cost,
engine client included) and `own_cpu_beyond_roundtrip_ms_per_call` (minus
sdk_ceiling_roundtrip's). With one agent the loop sleeps while each call waits for the
server, and waking costs CPU that a transport answering at once never pays; the second
figure separates that from the proxy's work.

Proxy variants run whole episodes through `RolloutController.run_episode` (session
start, reward, export, session end included). Both servers (fake SGLang and the canned
endpoint) run in a child process, like a real inference server; `cpu_ms_per_call` is
the CPU time (user+sys) of the benchmark process only (agents, SDK, proxy, engine
client), `server_cpu_ms_per_call` that of the child. `added_latency_ms_*` is a
variant's per-call latency percentile minus sdk_ceiling's at the same concurrency;
`peak_rss_mb` is the benchmark process's peak RSS during that variant (Linux VmHWM,
reset before each variant).

Each (variant, concurrency) starts all agents at once; every agent runs the same
number of episodes (at least one, and at least `--min-calls` calls in all), and the
row covers everything from start to the last call, start-up wave included. A variant
still running after `--max-seconds` is cut there (`capped: true`; its numbers are over
the calls done by then): calls in flight through the in-process proxy (and floor
calls) finish unmeasured, the other variants' are cancelled. At saturation latency is
mostly queueing (about agents / throughput).

Usage::

    python benchmarks/rollout_overhead.py                       # 1,64,512,4096 agents
    python benchmarks/rollout_overhead.py --agents 1,64 --quick
    python benchmarks/rollout_overhead.py --agents 512 --variants proxy --profile proxy
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import aiohttp
import httpx2
import msgspec
from bench_support import (
    CannedTransport,
    Recorder,
    RoundTripTransport,
    Servers,
    canned_completion,
    cpu_s,
    peak_rss_mb,
    percentile,
    raise_fd_limit,
    reset_peak_rss,
    round3,
    run_async,
    run_raw_agents,
    start_servers,
    to_ms,
)
from openai import AsyncOpenAI

VARIANTS = ("sdk_ceiling", "floor", "sdk_ceiling_inproc", "sdk_ceiling_roundtrip", "proxy",
            "proxy_tcp", "proxy_new_client", "proxy_tcp_raw")
ROUNDED = ("sdk_ceiling_inproc", "sdk_ceiling_roundtrip", "proxy")  # --rounds, interleaved
REPLY = "Sure, noted."  # the fake model's fixed reply (then eos)
QUESTIONS = ["What is 2 + 3?", "Name a colour.", "Say hello to the team.",
             "Is 7 prime? Answer briefly."]
CALL_TIMEOUT_S = 120.0  # per SDK call; a call that takes longer counts as an error


class BenchAgent:
    """K chat turns through the OpenAI SDK; records each call's latency in `rec`."""

    def __init__(self, turns: int, max_tokens: int) -> None:
        self.turns, self.max_tokens = turns, max_tokens
        self.rec = Recorder()

    async def run(self, data: dict, *, base_url: str, api_key: str,
                  http_client: httpx2.AsyncClient | None = None) -> float:
        client = AsyncOpenAI(base_url=base_url, api_key=api_key, http_client=http_client,
                             max_retries=0, timeout=CALL_TIMEOUT_S)
        messages = [{"role": "user", "content": data["question"]}]
        try:
            for k in range(self.turns):
                if self.rec.stopping:
                    break
                start = time.perf_counter()
                try:
                    resp = await client.chat.completions.create(
                        model="default", messages=messages, max_tokens=self.max_tokens)
                except Exception as e:  # benchmark boundary: count it, end the episode
                    self.rec.error(e)
                    return 0.0
                self.rec.latencies_s.append(time.perf_counter() - start)
                messages += [{"role": "assistant", "content": resp.choices[0].message.content},
                             {"role": "user", "content": f"And then {k}?"}]
            return 1.0
        finally:
            if http_client is None:  # the SDK made its own client: close it with the episode
                await client.close()


EpisodeFn = Callable[[dict], Awaitable[object]]


@contextlib.asynccontextmanager
async def agents_running(num_agents: int, num_episodes: int, episode: EpisodeFn,
                         rec: Recorder, drain_timeout_s: float) -> AsyncIterator[list]:
    """`num_agents` tasks, each running `num_episodes` episodes back to back. Tasks
    still running on exit stop starting calls; the calls in flight get
    `drain_timeout_s` to finish (0: cancelled at once), then the rest are cancelled
    and counted in `rec.num_stuck`."""
    async def agent(a: int) -> None:
        for e in range(num_episodes):
            if rec.stopping:
                return
            await episode({"question": QUESTIONS[(a + e) % len(QUESTIONS)]})

    rec.stopping, rec.num_stuck = False, 0
    tasks = [asyncio.create_task(agent(a)) for a in range(num_agents)]
    try:
        yield tasks
    finally:
        rec.stopping = True
        pending = [t for t in tasks if not t.done()]
        if pending and drain_timeout_s > 0:
            _, pending = await asyncio.wait(pending, timeout=drain_timeout_s)
            rec.num_stuck = len(pending)
        for t in pending:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@dataclass
class Plan:
    """How much work one (variant, concurrency) measurement does."""

    turns: int  # chat turns per episode
    min_calls: int  # every agent runs the same number of episodes, >= this many calls
    max_s: float  # stop after this long, whatever is done (slow variants): "capped"
    drain_timeout_s: float = 120.0  # for calls in flight at a cap to finish

    def episodes_per_agent(self, num_agents: int) -> int:
        return max(1, math.ceil(self.min_calls / (num_agents * self.turns)))


@dataclass
class Snapshot:
    seconds: float  # wall time from start to the end (or the cap)
    latencies_s: list[float]  # calls completed by then, sorted
    num_errors: int
    cpu_s: float  # this process
    server_cpu_s: float  # the server child process
    capped: bool  # stopped at plan.max_s before all episodes were done


async def run_window(num_agents: int, plan: Plan, rec: Recorder, episode: EpisodeFn,
                     servers: Servers, drain: bool) -> Snapshot:
    """Start all agents at once; time them until all their episodes are done or the cap."""
    rec.latencies_s.clear()
    rec.errors.clear()
    srv0, cpu0 = await servers.cpu_s(), cpu_s()
    start = time.perf_counter()
    async with agents_running(num_agents, plan.episodes_per_agent(num_agents), episode,
                              rec, plan.drain_timeout_s if drain else 0.0) as tasks:
        done, pending = await asyncio.wait(tasks, timeout=plan.max_s,
                                           return_when=asyncio.FIRST_EXCEPTION)
        elapsed = time.perf_counter() - start
        for t in done:
            if t.exception() is not None:  # agents catch call errors: a benchmark bug
                raise t.exception()
        cpu1 = cpu_s()
        snap = Snapshot(seconds=elapsed, latencies_s=sorted(rec.latencies_s),
                        num_errors=rec.num_errors(), cpu_s=cpu1 - cpu0, server_cpu_s=0.0,
                        capped=bool(pending))
        snap.server_cpu_s = await servers.cpu_s() - srv0
    return snap


async def measure(variant: str, num_agents: int, plan: Plan, rec: Recorder,
                  episode: EpisodeFn, servers: Servers, profiler=None) -> dict:
    """Run and time one (variant, concurrency); returns the JSON row."""
    reset_peak_rss()
    if profiler is not None:
        profiler.enable()
    # cancelling agents mid-call through the in-process proxy once hung (see report),
    # so those drain; the others are cancelled (draining 4096 TCP calls takes minutes)
    snap = await run_window(num_agents, plan, rec, episode, servers,
                            drain=variant in ("proxy", "floor"))
    if profiler is not None:
        profiler.disable()
    lat, calls = snap.latencies_s, len(snap.latencies_s) + snap.num_errors
    per_call = 1e3 / calls if calls else math.nan  # ms per call, per second of CPU
    row = {"variant": variant, "agents": num_agents, "turns": plan.turns, "calls": calls,
           "seconds": round(snap.seconds, 3),
           "requests_per_s": round(len(lat) / snap.seconds, 1),
           "latency_ms_p50": to_ms(percentile(lat, 0.5)),
           "latency_ms_p99": to_ms(percentile(lat, 0.99)),
           "cpu_ms_per_call": round3(snap.cpu_s * per_call),
           "server_cpu_ms_per_call": round3(snap.server_cpu_s * per_call),
           "peak_rss_mb": round(peak_rss_mb(), 1), "errors": snap.num_errors,
           "capped": snap.capped}
    if rec.errors:
        row["error_kinds"] = dict(rec.errors)
    if rec.num_stuck:  # calls that never returned after the window: a hang to look at
        row["stuck_after_window"] = rec.num_stuck
        row["errors"] += rec.num_stuck
    return row


# --- variants ------------------------------------------------------------------------

@dataclass
class Bench:
    """Everything the variants share during one run."""

    plan: Plan
    servers: Servers
    stack: object  # areal_lite.rollout.stack.RolloutStack
    agent: BenchAgent
    floor_bodies: list[list[bytes]]  # [question][turn] -> pre-encoded /generate body
    canned_body: bytes  # the canned chat completion
    max_connections: int  # connection pool size of every shared HTTP client
    profile: str | None  # variant to profile with cProfile, if any
    profile_out: str | None = None  # also write the raw stats here (pstats format)

    def tcp_client(self) -> httpx2.AsyncClient:
        n = self.max_connections
        return httpx2.AsyncClient(limits=httpx2.Limits(max_connections=n,
                                                       max_keepalive_connections=n),
                                  timeout=CALL_TIMEOUT_S)

    def controller(self, http_client, num_agents: int):
        from areal_lite.rollout.controller import RolloutController

        return RolloutController(self.stack.proxy, self.agent, http_client=http_client,
                                 episode_timeout_s=10 * CALL_TIMEOUT_S,
                                 max_concurrent=num_agents)

    async def run(self, variant: str, num_agents: int) -> dict:
        if variant == "proxy_tcp_raw":
            return await self._raw_row(num_agents)
        async with contextlib.AsyncExitStack() as es:
            rec = Recorder() if variant == "floor" else self.agent.rec
            episode = await self._episode_fn(variant, num_agents, es, rec)
            profiler = None
            if self.profile == variant:
                import cProfile

                profiler = cProfile.Profile(time.process_time)  # CPU time: less noise
            row = await measure(variant, num_agents, self.plan, rec, episode, self.servers,
                                profiler)
        await self._quiesce()
        if profiler is not None:
            print_profile(profiler, variant, num_agents)
            if self.profile_out:
                profiler.dump_stats(self.profile_out)
        return row

    async def _raw_row(self, num_agents: int) -> dict:
        """proxy_tcp_raw: the agents run in a child process; this one is the proxy."""
        sessions = self.stack.proxy.sessions
        started = [sessions.start() for _ in range(num_agents)]
        calls_each = self.plan.turns * self.plan.episodes_per_agent(num_agents)
        reset_peak_rss()
        srv0, cpu0 = await self.servers.cpu_s(), cpu_s()
        report = await run_raw_agents({
            "port": self.stack.proxy.port, "keys": [s.key for s in started],
            "questions": QUESTIONS, "calls_each": calls_each, "turns": self.plan.turns,
            "max_tokens": self.agent.max_tokens})
        proxy_cpu, server_cpu = cpu_s() - cpu0, await self.servers.cpu_s() - srv0
        for s in started:
            sessions.end(s.id)
        lat = sorted(report["latencies_s"])
        num_errors = sum(report["errors"].values())
        calls = len(lat) + num_errors
        per_call = 1e3 / calls if calls else math.nan
        row = {"variant": "proxy_tcp_raw", "agents": num_agents, "turns": self.plan.turns,
               "calls": calls, "seconds": round(report["seconds"], 3),
               "requests_per_s": round(len(lat) / report["seconds"], 1),
               "latency_ms_p50": to_ms(percentile(lat, 0.5)),
               "latency_ms_p99": to_ms(percentile(lat, 0.99)),
               "cpu_ms_per_call": round3(proxy_cpu * per_call),
               "agent_cpu_ms_per_call": round3(report["cpu_s"] * per_call),
               "server_cpu_ms_per_call": round3(server_cpu * per_call),
               "peak_rss_mb": round(peak_rss_mb(), 1), "errors": num_errors, "capped": False}
        if report["errors"]:
            row["error_kinds"] = report["errors"]
        return row

    async def _quiesce(self, timeout_s: float = 60.0) -> None:
        """Wait until the proxy's engine has nothing in flight (cancelled TCP requests
        are still served), so one variant's leftovers don't bill the next one."""
        router = self.stack.engine.router
        deadline = time.monotonic() + timeout_s
        while sum(router.in_flight.values()) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)  # polling a counter: nothing to wait on
        await asyncio.sleep(0.1)  # let handlers past the engine call finish

    async def _episode_fn(self, variant: str, num_agents: int,
                          es: contextlib.AsyncExitStack, rec: Recorder) -> EpisodeFn:
        if variant == "floor":
            return await self._floor_episode(es, rec)
        if variant == "sdk_ceiling":
            client = await es.enter_async_context(self.tcp_client())
            base_url = self.servers.canned_url + "/v1"
            return lambda data: self.agent.run(data, base_url=base_url, api_key="sk-canned",
                                               http_client=client)
        if variant in ("sdk_ceiling_inproc", "sdk_ceiling_roundtrip"):
            client = await es.enter_async_context(httpx2.AsyncClient(
                transport=self._inproc_transport(variant), timeout=CALL_TIMEOUT_S))
            return lambda data: self.agent.run(data, base_url=self.servers.canned_url + "/v1",
                                               api_key="sk-canned", http_client=client)
        if variant == "proxy":
            client = self.stack.controller.http_client
        elif variant == "proxy_tcp":
            client = await es.enter_async_context(self.tcp_client())
        elif variant == "proxy_new_client":
            client = None
        else:
            raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
        return self._counting(self.controller(client, num_agents).run_episode)

    def _inproc_transport(self, variant: str) -> CannedTransport:
        if variant == "sdk_ceiling_inproc":
            return CannedTransport(self.canned_body)
        bodies = {(q, k): body for q, per_turn in zip(QUESTIONS, self.floor_bodies)
                  for k, body in enumerate(per_turn)}
        return RoundTripTransport(self.canned_body, self.servers.fake_url, bodies,
                                  self.max_connections, CALL_TIMEOUT_S)

    def _counting(self, run_episode: Callable[[dict], Awaitable]) -> EpisodeFn:
        """Failed episodes the agent did not see (export, reward) count as errors too."""
        async def episode(data: dict) -> None:
            result = await run_episode(data)
            if result.failed:
                self.agent.rec.errors[result.error] = self.agent.rec.errors.get(result.error, 0) + 1
        return episode

    async def _floor_episode(self, es: contextlib.AsyncExitStack, rec: Recorder) -> EpisodeFn:
        from areal_lite.engine.sglang.wire import parse_generate

        connector = aiohttp.TCPConnector(limit=self.max_connections, keepalive_timeout=60)
        session = await es.enter_async_context(aiohttp.ClientSession(connector=connector))
        url = self.servers.fake_url + "/generate"
        timeout = aiohttp.ClientTimeout(total=CALL_TIMEOUT_S)
        headers = {"Content-Type": "application/json"}

        async def episode(data: dict) -> None:
            bodies = self.floor_bodies[QUESTIONS.index(data["question"])]
            for body in bodies:
                if rec.stopping:
                    return
                start = time.perf_counter()
                try:
                    async with session.post(url, data=body, headers=headers,
                                            timeout=timeout) as resp:
                        raw = await resp.read()
                        resp.raise_for_status()
                    parse_generate(raw)
                except Exception as e:  # benchmark boundary: count it, end the episode
                    rec.error(e)
                    return
                rec.latencies_s.append(time.perf_counter() - start)
        return episode


def print_profile(profiler, variant: str, num_agents: int, top: int = 60) -> None:
    import io
    import pstats

    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(top)
    print(f"--- cProfile {variant} @ {num_agents} agents (sorted by tottime) ---\n"
          f"{out.getvalue()}", file=sys.stderr)


# --- setup ---------------------------------------------------------------------------

def floor_bodies(tokenizer, turns: int, max_tokens: int, reply: str) -> list[list[bytes]]:
    """Per question, per turn: the /generate body the proxy would send (chat template)."""
    from areal_lite.engine.sglang.wire import generate_body
    from areal_lite.types import GenerateRequest, SamplingParams

    stop = (tokenizer.eos_token_id,)
    out = []
    for q_i, question in enumerate(QUESTIONS):
        messages, bodies = [{"role": "user", "content": question}], []
        for k in range(turns):
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                tokenize=True, return_dict=False)
            req = GenerateRequest(rid="", input_ids=list(ids), sampling=SamplingParams(
                max_new_tokens=max_tokens, stop_token_ids=stop))
            bodies.append(msgspec.json.encode(
                generate_body(req, generated=[], rid=f"floor-{q_i}-{k}", stream=False)))
            messages += [{"role": "assistant", "content": reply},
                         {"role": "user", "content": f"And then {k}?"}]
        out.append(bodies)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--agents", default="1,64,512,4096", help="comma-separated concurrencies")
    p.add_argument("--turns", type=int, default=3, help="chat turns per episode")
    p.add_argument("--min-calls", type=int, default=2000,
                   help="calls per (variant, concurrency) at least; every agent runs the "
                   "same number of episodes (at least one)")
    p.add_argument("--max-seconds", type=float, default=25.0,
                   help="cap per (variant, concurrency); a capped row says capped: true")
    p.add_argument("--max-tokens", type=int, default=8, help="max_tokens of each call")
    p.add_argument("--max-connections", type=int, default=1024,
                   help="pool size of each shared HTTP client (rollout.sglang.max_connections)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset")
    p.add_argument("--new-client-max-agents", type=int, default=512,
                   help="run proxy_new_client only up to this concurrency: every new SDK "
                   "client costs ~20-60 ms of CPU, so 4096 agents take minutes to start")
    p.add_argument("--profile", default=None, help="cProfile this variant, stats to stderr")
    p.add_argument("--profile-out", default=None,
                   help="with --profile: also dump the raw stats to this file (pstats)")
    p.add_argument("--rounds", type=int, default=3,
                   help=f"interleaved runs of {', '.join(ROUNDED)} (median round reported)")
    p.add_argument("--quick", action="store_true", help="tiny run for smoke tests")
    args = p.parse_args(argv)
    args.agents = [int(a) for a in args.agents.split(",")]
    args.variants = [v for v in VARIANTS if v in args.variants.split(",")]
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    if args.quick:
        args.min_calls, args.max_seconds, args.rounds = 1, 20.0, min(args.rounds, 2)
    return args


async def run_benchmark(args: argparse.Namespace) -> list[dict]:
    from areal_lite.config_toml import loads_config
    from areal_lite.models import load_tokenizer
    from areal_lite.rollout.stack import open_rollout
    from areal_lite.testing.tiny import make_tiny_model_dir

    raise_fd_limit()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = await asyncio.to_thread(make_tiny_model_dir, tmp)
        tok = load_tokenizer(model_dir)
        reply_ids = tok.encode(REPLY, add_special_tokens=False) + [tok.eos_token_id]
        spec = {"reply_ids": reply_ids, "eos": tok.eos_token_id, "vocab_size": len(tok),
                "max_context_len": 4096,
                "canned": canned_completion(REPLY, 32, len(reply_ids)).decode()}
        agent = BenchAgent(args.turns, args.max_tokens)
        async with start_servers(spec) as servers:
            cfg = loads_config("", [
                f"actor.path={model_dir}", "rollout.backend=sglang",
                f'rollout.sglang.urls=["{servers.fake_url}"]',
                f"rollout.sglang.max_connections={args.max_connections}",
                f"rollout.max_concurrent_rollouts={max(args.agents)}",
                f"rollout.episode_timeout_s={10 * CALL_TIMEOUT_S}"])
            async with open_rollout(cfg, agent) as stack:
                plan = Plan(turns=args.turns, min_calls=args.min_calls,
                            max_s=args.max_seconds,
                            drain_timeout_s=20.0 if args.quick else 120.0)
                bench = Bench(plan=plan,
                              servers=servers, stack=stack, agent=agent,
                              floor_bodies=floor_bodies(tok, args.turns, args.max_tokens, REPLY),
                              canned_body=spec["canned"].encode(),
                              max_connections=args.max_connections, profile=args.profile,
                              profile_out=args.profile_out)
                for num_agents in args.agents:
                    variants = [v for v in args.variants if v != "proxy_new_client"
                                or num_agents <= args.new_client_max_agents]
                    rows += await run_concurrency(bench, variants, num_agents, args.rounds)
    return rows


async def run_concurrency(bench: Bench, variants: list[str], num_agents: int,
                          rounds: int = 1) -> list[dict]:
    """All variants at one concurrency; sdk_ceiling first (the others are relative to
    it); the ROUNDED ones `rounds` times, interleaved, reported together."""
    rows, ceiling = [], None
    rounded = [v for v in variants if v in ROUNDED]
    for variant in variants:
        if variant in rounded and variant != rounded[0]:
            continue  # ran with the first rounded variant
        if variant in rounded:
            runs: dict[str, list[dict]] = {v: [] for v in rounded}
            for _ in range(rounds):
                for v in rounded:
                    runs[v].append(await bench.run(v, num_agents))
            new = merge_rounds(runs)
        else:
            new = [await bench.run(variant, num_agents)]
        for row in new:
            if row["variant"] == "sdk_ceiling":
                ceiling = row
            for q in ("p50", "p99"):
                mine, base = row[f"latency_ms_{q}"], ceiling and ceiling[f"latency_ms_{q}"]
                added = None if mine is None or base is None else round(mine - base, 3)
                row[f"added_latency_ms_{q}"] = added
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def merge_rounds(runs: dict[str, list[dict]]) -> list[dict]:
    """One row per variant: its median round (by requests/s), every round's requests/s
    and CPU, errors over all rounds; the proxy row adds the per-round comparisons'
    medians (module docstring)."""
    import statistics

    out = {}
    for variant, rs in runs.items():
        row = dict(sorted(rs, key=lambda r: r["requests_per_s"])[(len(rs) - 1) // 2])
        row["rounds"] = len(rs)
        row["requests_per_s_rounds"] = [r["requests_per_s"] for r in rs]
        row["cpu_ms_per_call_rounds"] = [r["cpu_ms_per_call"] for r in rs]
        row["errors"] = sum(r["errors"] for r in rs)
        out[variant] = row
    def per_round(base: str, f: Callable[[dict, dict], float]) -> float:
        """The median over rounds of f(proxy's row, base's row of the same round)."""
        return statistics.median(f(p, b) for p, b in zip(runs["proxy"], runs[base]))

    def cpu_over(p: dict, b: dict) -> float:
        return p["cpu_ms_per_call"] - b["cpu_ms_per_call"]

    proxy = out.get("proxy")
    if proxy is not None and "sdk_ceiling_inproc" in runs:
        proxy["vs_sdk_ceiling_inproc"] = round(per_round(
            "sdk_ceiling_inproc", lambda p, b: p["requests_per_s"] / b["requests_per_s"]), 3)
        proxy["own_cpu_ms_per_call"] = round3(per_round("sdk_ceiling_inproc", cpu_over))
    if proxy is not None and "sdk_ceiling_roundtrip" in runs:
        proxy["own_cpu_beyond_roundtrip_ms_per_call"] = round3(
            per_round("sdk_ceiling_roundtrip", cpu_over))
    return list(out.values())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows = run_async(run_benchmark(args))
    return 1 if any(r["errors"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
