"""engine/ fake SGLang, server state: requests in flight, pause, aborts, decode loop.

`fake_sglang.py` turns HTTP calls into calls on `FakeSGLangState`; tests read its
counters and wait on it (`wait_until`) instead of sleeping. With `latency_s == 0` a
request's decode loop never awaits, so the fake costs as little as an HTTP echo.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from typing import Any

from areal_lite.testing.fake_sglang.model import BadRequest, FakeModel, Item

__all__ = ["ConnectionDropped", "Decoded", "FakeSGLangState", "Live"]

Emit = Callable[[list[int], list[float]], Awaitable[None]]

_CACHE_BLOCK = 16  # tokens per prefix-cache block
_CACHE_MAX_BLOCKS = 1_000_000  # forget everything past this many blocks


class ConnectionDropped(Exception):
    """Raised in a decode loop told to `drop`: the handler cuts the connection."""


_DROP = "\x00drop"  # abort_message that means: die without answering


class Live:
    """A request registered in flight (SGLang's `rid_to_state`)."""

    __slots__ = ("rid", "abort_message", "num_emitted")

    def __init__(self, rid: str) -> None:
        self.rid = rid
        self.abort_message: str | None = None  # set to stop it at the next token
        self.num_emitted = 0  # tokens sampled so far


class Decoded:
    """What a finished decode loop produced."""

    __slots__ = ("output_ids", "logprobs", "finish", "cached_tokens", "queued", "start")

    def __init__(self, out: list[int], lps: list[float], finish: dict[str, Any],
                 cached: int, start: float, *, queued: bool = False) -> None:
        self.output_ids = out
        self.logprobs = lps
        self.finish = finish  # SGLang finish_reason object
        self.cached_tokens = cached
        self.queued = queued  # aborted before it ever ran ("Abort in waiting queue")
        self.start = start  # perf_counter at arrival


def _abort(message: str) -> dict[str, Any]:
    return {"type": "abort", "message": message, "status_code": None, "err_type": None}


class FakeSGLangState:
    """Everything a fake server knows; safe to read from tests between awaits."""

    def __init__(
        self,
        *,
        model: FakeModel,
        max_context_len: int = 4096,  # prompt + max_new_tokens must stay below this
        latency_s: float = 0.0,  # sleep per sampled token; 0 = never await while decoding
        decode: Callable[[list[int]], str] | None = None,  # enables "text" and stop strings
        encode: Callable[[str], list[int]] | None = None,  # enables "text" input
        incremental_streaming: bool = False,  # --incremental-streaming-output
        max_running_requests: int | None = None,  # beyond it, requests queue
        prefix_cache: bool = True,  # False = --disable-radix-cache
        strict_flush: bool = True,  # fail flushing updates while requests are held
        decode_tensors: bool = False,  # unpickle tensors sent to update_weights_from_tensor
        tp_size: int = 1,  # ranks this server joins a weight-update group with
        group_timeout_s: float = 60.0,  # limit to join a gloo group and for each broadcast
        history: int = 1000,  # /generate bodies kept in `generate_bodies`
    ) -> None:
        self.model = model
        self.max_context_len = max_context_len
        self.latency_s = latency_s
        self.decode = decode
        self.encode = encode
        self.incremental_streaming = incremental_streaming
        self.max_running_requests = max_running_requests
        self.prefix_cache = prefix_cache
        self.strict_flush = strict_flush
        self.decode_tensors = decode_tensors
        self.tp_size = tp_size
        self.group_timeout_s = group_timeout_s
        # observable state
        self.calls: Counter[str] = Counter()  # path -> requests received
        self.last_bodies: dict[str, Any] = {}  # path -> last JSON body
        self.generate_bodies: deque[Any] = deque(maxlen=history)
        self.in_flight: dict[str, Live] = {}
        self.aborted_rids: list[str] = []  # rids named by /abort_request
        self.num_tokens_emitted = 0
        self.num_running = 0  # in flight and not queued
        self.weight_version = "default"
        self.num_weight_updates = 0
        self.paused = False
        self.pause_mode: str | None = None
        self.updating = 0  # weight updates holding the writer lock
        self.released_tags: set[str] = set()
        self.groups: dict[str, Any] = {}  # weight-update groups by name: init body
        self.group_members: dict[str, Any] = {}  # gloo groups joined: GroupMember
        self.received_tensors: dict[str, Any] = {}  # name -> tensor, last tensor/dist update
        self.closing = False  # set by FakeSGLangServer.stop(); wakes every waiter
        self.failures: dict[str, deque[int | str]] = {}  # path -> injected failures
        self._cache: set[int] = set()
        self._pulse: asyncio.Event | None = None

    # -- synchronisation -------------------------------------------------------------

    def notify(self) -> None:
        """Wake every `wait_until` to re-check its predicate."""
        if self._pulse is not None:
            self._pulse.set()
            self._pulse = None

    async def wait_until(self, pred: Callable[[], bool], timeout_s: float | None = 10.0
                         ) -> None:
        """Return once `pred()` holds (checked after every state change)."""
        async with asyncio.timeout(timeout_s):
            while not pred():
                if self._pulse is None:
                    self._pulse = asyncio.Event()
                await self._pulse.wait()

    def fail_next(self, n: int = 1, status: int | str = 500, path: str = "/generate") -> None:
        """The next `n` calls to `path` fail with `status` or 'disconnect'."""
        self.failures.setdefault(path, deque()).extend([status] * n)

    def take_failure(self, path: str) -> int | str | None:
        q = self.failures.get(path)
        return q.popleft() if q else None

    # -- requests in flight --------------------------------------------------------

    def register(self, items: list[Item]) -> list[Live]:
        rids = [it.rid for it in items]
        dup = [r for r in rids if r in self.in_flight] or (
            rids if len(set(rids)) != len(rids) else [])
        if dup:
            raise BadRequest(f"Duplicate request ID: {dup[0]}")
        lives = [Live(r) for r in rids]
        for live in lives:
            self.in_flight[live.rid] = live
        self.notify()
        return lives

    def unregister(self, lives: list[Live]) -> None:
        for live in lives:
            self.in_flight.pop(live.rid, None)
        self.notify()

    def abort(self, rid: str, message: str = "Aborted") -> None:
        live = self.in_flight.get(rid)
        if live is not None and live.abort_message is None:
            live.abort_message = message
            self.notify()

    def drop(self, rid: str) -> None:
        """Cut the connection of request `rid` at its next token (a crash mid-request)."""
        self.abort(rid, _DROP)

    def abort_all(self, message: str = "Aborted") -> None:
        for rid in list(self.in_flight):
            self.abort(rid, message)

    def gate_open(self) -> bool:
        return self.closing or not (self.paused or self.updating)

    def check_context(self, item: Item) -> None:
        n, m, ctx = len(item.input_ids), item.sampling["max_new_tokens"], self.max_context_len
        if n >= ctx:
            raise BadRequest(f"The input ({n} tokens) is longer than the model's context "
                             f"length ({ctx} tokens).")
        if n + m >= ctx:
            raise BadRequest(
                f"Requested token count exceeds the model's maximum context length of {ctx}"
                f" tokens. You requested a total of {n + m} tokens: {n} tokens from the "
                f"input messages and {m} tokens for the completion. Please reduce the "
                "number of tokens in the input messages or the completion to fit within "
                "the limit.")

    # -- decoding ------------------------------------------------------------------

    async def run(self, item: Item, live: Live, *, emit: Emit | None = None,
                  alive: Callable[[], bool] | None = None) -> Decoded:
        """Decode one item to the end; `emit(out, lps)` after each non-final token."""
        start = time.perf_counter()
        limit = self.max_running_requests
        if limit is not None and self.num_running >= limit:
            await self.wait_until(
                lambda: live.abort_message is not None or self.num_running < limit, None)
            if live.abort_message is not None:
                return Decoded([], [], _abort("Abort in waiting queue"), 0, start,
                               queued=True)
        cached = self._match_prefix(item.input_ids)
        self.num_running += 1
        try:
            out, lps, finish = await self._decode(item, live, emit, alive)
        finally:
            self.num_running -= 1
            self.notify()
        self._insert_prefix(item.input_ids + out)
        return Decoded(out, lps, finish, cached, start)

    async def _decode(self, item: Item, live: Live, emit: Emit | None,
                      alive: Callable[[], bool] | None
                      ) -> tuple[list[int], list[float], dict[str, Any]]:
        sp, model = item.sampling, self.model
        script = model.script(item)
        seed, pos = model.seed(item), len(item.input_ids)
        max_new, min_new = sp["max_new_tokens"], sp["min_new_tokens"]
        stops = frozenset() if sp["ignore_eos"] else sp["stop_token_ids"] | {model.eos_token_id}
        stop_strs = sp["stop"] if self.decode is not None else ()
        out: list[int] = []
        lps: list[float] = []
        while len(out) < max_new:
            if self.paused and self.pause_mode != "abort" and not self.closing:
                await self.wait_until(lambda: not self.paused or self.closing, None)
            if self.latency_s:
                await asyncio.sleep(self.latency_s)
                if alive is not None and not alive():
                    live.abort_message = "client disconnected"
            if live.abort_message is not None:
                if live.abort_message == _DROP:
                    raise ConnectionDropped(live.rid)
                return out, lps, _abort(live.abort_message)
            i = len(out)
            if script is None:
                tok, lp = model.token(seed, pos + i)
            elif i < len(script):
                tok, lp = script[i], model.logprob(seed, script[i], pos + i)
            else:  # the script ran out before a stop: report it as a length finish
                return out, lps, {"type": "length", "length": i}
            out.append(tok)
            lps.append(lp)
            live.num_emitted += 1
            self.num_tokens_emitted += 1
            if self._pulse is not None:
                self.notify()
            if i >= min_new and (tok in stops or stop_strs):
                matched = self._matched_stop(tok, out, stops, stop_strs)
                if matched is not None:
                    return out, lps, {"type": "stop", "matched": matched}
            if emit is not None and len(out) < max_new:
                await emit(out, lps)
        return out, lps, {"type": "length", "length": max_new}

    def _matched_stop(self, tok: int, out: list[int], stops: frozenset[int],
                      stop_strs: list[str] | tuple[()]) -> int | str | None:
        if tok in stops:
            return tok
        if stop_strs:
            text = self.decode(out)  # type: ignore[misc]
            for s in stop_strs:
                if s in text:
                    return s
        return None

    def payload(self, item: Item, out: list[int], lps: list[float],
                done: Decoded | None, num_sent: int = 0) -> dict[str, Any]:
        """A /generate reply (or stream chunk when `done` is None), per protocol §1."""
        ids = out[num_sent:] if self.incremental_streaming else out
        meta: dict[str, Any] = {
            "id": item.rid,
            "finish_reason": None if done is None else done.finish,
            "prompt_tokens": len(item.input_ids),
            "completion_tokens": len(out),
            "cached_tokens": 0 if done is None else done.cached_tokens,
            "weight_version": self.weight_version,
            "total_retractions": 0,
        }
        if done is not None:
            if done.queued:
                del meta["prompt_tokens"]
            meta["e2e_latency"] = time.perf_counter() - done.start
        if item.return_logprob:
            meta["output_token_logprobs"] = [[lp, t, None] for lp, t in zip(lps, out)]
            meta["input_token_logprobs"] = []
        body: dict[str, Any] = {"output_ids": ids, "meta_info": meta}
        if self.decode is not None:
            body = {"text": self._text(item, out, done, num_sent), **body}
        return body

    def _text(self, item: Item, out: list[int], done: Decoded | None, num_sent: int) -> str:
        text = self.decode(out)  # type: ignore[misc]
        matched = None if done is None else done.finish.get("matched")
        if isinstance(matched, str) and not item.sampling["no_stop_trim"]:
            text = text[: text.find(matched)]
        if self.incremental_streaming and num_sent:
            text = text[len(self.decode(out[:num_sent])):]  # type: ignore[misc]
        return text

    # -- prefix cache (counts cached_tokens only) ------------------------------------

    def _block_hashes(self, ids: list[int]) -> list[int]:
        hashes, h = [], 0
        for i in range(0, len(ids) - _CACHE_BLOCK + 1, _CACHE_BLOCK):
            h = hash((h, tuple(ids[i:i + _CACHE_BLOCK])))
            hashes.append(h)
        return hashes

    def _match_prefix(self, ids: list[int]) -> int:
        if not self.prefix_cache or len(ids) <= _CACHE_BLOCK:
            return 0
        n = 0
        for h in self._block_hashes(ids[:-1]):
            if h not in self._cache:
                break
            n += _CACHE_BLOCK
        return n

    def _insert_prefix(self, ids: list[int]) -> None:
        if self.prefix_cache and len(ids) >= _CACHE_BLOCK:
            if len(self._cache) > _CACHE_MAX_BLOCKS:
                self._cache.clear()
            self._cache.update(self._block_hashes(ids))

    def flush_prefix_cache(self) -> None:
        self._cache.clear()
