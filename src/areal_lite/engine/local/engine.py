"""The in-process torch inference engine (`rollout.backend = "local"`): token ids in,
sampled token ids + logprobs + weight versions out, with continuous batching.

One scheduler task on the event loop owns the batch. Each iteration it drops cancelled
waiting requests, admits waiting ones within `max_batch_size` and the KV budget, and runs
one step of the `RunningBatch` (engine/batch.py: remove cancelled rows, decode one token
for every running request, prefill the admitted ones, remove finished rows) on a single
worker thread, so the loop stays responsive for thousands of agent coroutines. The chunks
of one step are delivered while the next step already runs: `stream` consumers get a
`TokenChunk` per step, `generate` callers are woken once, at the end. A cancelled
consumer's row (and KV) is freed at the next step.

KV budget (`max_kv_tokens`): the padded cache holds ``rows x longest row`` tokens, so a
request is admitted only while ``(running + 1) * max(prompt + max_new_tokens over the
batch) <= max_kv_tokens`` -- a bound on the real (padded) memory. Requests beyond it
queue (FIFO). A request that alone exceeds it is rejected with `EngineRejected` (a 400).

Weights: `pause()` lets the current step finish and runs no more; in-flight requests keep
their rows and KV. `update_weights` copies tensors into the existing parameters in place
(`copy_`, shapes checked, no reallocation); `resume()` continues, and new tokens carry the
new version (the KV computed under the old weights is kept: the usual async-RL
approximation). The engine may also run on the very module the trainer optimizes (shared
parameter storage): then the trainer must `pause()` the engine around its optimizer step
and call `update_weights({}, version)` to bump the version; the engine never changes the
module's train/eval mode, so keep dropout off in that setup.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import deque
from collections.abc import AsyncIterator, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor

import torch

from areal_lite.engine.base import (
    ContextLengthExceeded,
    EngineError,
    EngineRejected,
    EngineUnavailable,
)
from areal_lite.engine.local.batch import RunningBatch, Seq
from areal_lite.engine.local.prefix import PrefixCache
from areal_lite.engine.local.sampling import validate_params
from areal_lite.engine.stats import EngineStats
from areal_lite.models import model_device, stop_token_ids
from areal_lite.types import GenerateRequest, GenerateResult, TokenChunk


class LocalEngine:
    """Continuous-batching generation on a Hugging Face causal LM (see module docstring).

    `model` is any HF decoder module (`AutoModelForCausalLM`); `tokenizer` is needed only
    for stop strings. `max_context_len` defaults to the model's
    `max_position_embeddings`. `max_prefill_tokens` caps the padded tokens (rows x longest
    prompt) prefilled in one step; a longer single prompt is still prefilled alone.
    `prefix_cache_tokens` bounds the KV of recent prompts kept for reuse by later prompts
    with the same beginning (engine/prefix.py; 0 = off); it is outside `max_kv_tokens`
    and cleared on every weight update. `fused_forward`: Llama-family models run decode and
    joining prompts in one pass (engine/fused.py); False or other models: HF forward. Use as
    ``async with LocalEngine(model) as engine:`` or call `start()`/`close()`;
    `stream`/`generate` start the scheduler on first use.
    """

    def __init__(self, model, *, tokenizer=None, device: str = "cpu", max_batch_size: int = 64,
                 max_kv_tokens: int = 65536, max_context_len: int | None = None,
                 initial_version: int = 0, seed: int = 0, max_prefill_tokens: int = 8192,
                 prefix_cache_tokens: int = 8192, fused_forward: bool = True):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.device = model_device(model, torch.device(device))
        text_cfg = model.config.get_text_config(decoder=True)
        self._num_layers = text_cfg.num_hidden_layers
        self._max_context_len = int(max_context_len or text_cfg.max_position_embeddings)
        self.max_batch_size = max_batch_size
        self.max_kv_tokens = max_kv_tokens
        self.max_prefill_tokens = max_prefill_tokens
        self.eos_ids = stop_token_ids(model, tokenizer)
        self._version = initial_version
        self._rng = random.Random(seed)  # seeds requests that bring no seed of their own
        self._waiting: deque[Seq] = deque()
        self.prefix_cache = PrefixCache(prefix_cache_tokens) if prefix_cache_tokens else None
        self._batch = RunningBatch(model, device=self.device, num_layers=self._num_layers,
                                   eos_ids=self.eos_ids, tokenizer=tokenizer,
                                   max_batch_size=max_batch_size, prefix_cache=self.prefix_cache,
                                   fused=fused_forward)
        self._paused = False
        self._closed = False
        self._wake = asyncio.Event()  # set when there may be work (or a state change)
        self._idle = asyncio.Event()  # set while no step is in flight
        self._idle.set()
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None

    @classmethod
    def from_pretrained(cls, path: str, *, device: str = "cpu", dtype: str = "auto",
                        cache_dir: str | None = None, **kwargs) -> LocalEngine:
        """Load `path` (local dir, hub id or `smollm2-135m-instruct`) with its tokenizer.

        Blocking (seconds to tens of seconds): call it via `asyncio.to_thread` from a loop.
        """
        from areal_lite.models import load_causal_lm, load_tokenizer, resolve_model_dir

        model_dir = resolve_model_dir(path, cache_dir=cache_dir)
        model = load_causal_lm(model_dir, device=device, dtype=dtype)
        return cls(model, tokenizer=load_tokenizer(model_dir), device=device, **kwargs)

    # -- Engine protocol -----------------------------------------------------------------

    @property
    def version(self) -> int:
        return self._version

    @property
    def max_context_len(self) -> int:
        return self._max_context_len

    @property
    def num_running(self) -> int:
        """Requests holding a row (and KV) in the running batch."""
        return len(self._batch.seqs)

    @property
    def num_waiting(self) -> int:
        """Requests queued for admission."""
        return len(self._waiting)

    @property
    def stats(self) -> EngineStats:
        """A copy of the totals counted since start, as of the last finished step
        (engine/stats.py)."""
        return self._batch.stats.copy()

    async def start(self) -> None:
        """Start the scheduler task (idempotent)."""
        if self._closed:
            raise EngineUnavailable("the local engine is closed; create a new one")
        if self._task is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="areal-lite-engine")
            self._task = asyncio.create_task(self._schedule(), name="local-engine-scheduler")

    async def close(self) -> None:
        """Stop the scheduler; pending and running requests fail with EngineUnavailable."""
        if self._closed:
            return
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                if asyncio.current_task().cancelling():
                    raise
        if self._executor is not None:
            await asyncio.to_thread(self._executor.shutdown, wait=True)
        error = EngineUnavailable("the local engine was closed")
        for seq in [*self._waiting, *self._batch.seqs]:
            self._deliver(seq, error)
        self._waiting.clear()
        self._batch.clear()

    async def __aenter__(self) -> LocalEngine:
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def generate(self, req: GenerateRequest) -> GenerateResult:
        """Run `req` to the end (one wakeup, however many tokens). Cancelling the caller
        removes the request from the batch."""
        seq = self._admit_request(req, collect=True)
        if seq is not None:
            await self._submit(seq)
            try:
                chunks = await seq.result
            finally:
                self._abandon(seq)
        else:  # max_new_tokens == 0
            chunks = [_empty_final_chunk()]
        result = GenerateResult.from_chunks(chunks, prompt_tokens=len(req.input_ids))
        result.cached_tokens = seq.cached_tokens if seq is not None else 0
        return result

    async def stream(self, req: GenerateRequest) -> AsyncIterator[TokenChunk]:
        """Yield the new tokens of `req` after every decode step; the last chunk carries
        `finish_reason`. Closing or cancelling the consumer removes the request."""
        seq = self._admit_request(req, collect=False)
        if seq is None:  # max_new_tokens == 0: nothing to generate
            yield _empty_final_chunk()
            return
        await self._submit(seq)
        try:
            while True:
                item = await seq.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            self._abandon(seq)

    async def _submit(self, seq: Seq) -> None:
        await self.start()
        self._waiting.append(seq)
        self._wake.set()

    def _abandon(self, seq: Seq) -> None:
        """The consumer is gone: if the request is still going, drop it at the next step."""
        if not seq.done:
            seq.cancelled = True
            self._wake.set()

    async def pause(self) -> None:
        """Return once the current step (if any) has finished; no further steps run."""
        self._paused = True
        await self._idle.wait()

    async def resume(self) -> None:
        self._paused = False
        self._wake.set()

    async def update_weights(
        self,
        named_tensors: Mapping[str, object] | Iterable[tuple[str, object]],
        version: int,
    ) -> None:
        """Copy tensors into the model's parameters/buffers in place and set `version`.

        Names are the model's `state_dict` keys. Checks every name and shape before copying
        anything (ValueError names the offender). Pauses around the copy if not paused.
        """
        if self._closed:
            raise EngineUnavailable("the local engine is closed; create a new one")
        items = list(named_tensors.items() if isinstance(named_tensors, Mapping)
                     else named_tensors)
        targets = self.model.state_dict(keep_vars=True)
        for name, tensor in items:
            if name not in targets:
                raise ValueError(f"update_weights: unknown parameter {name!r} (not in the "
                                 f"model's state_dict; e.g. {next(iter(targets))!r})")
            if tuple(tensor.shape) != tuple(targets[name].shape):
                raise ValueError(f"update_weights: {name!r} has shape {tuple(tensor.shape)}, "
                                 f"the model expects {tuple(targets[name].shape)}")
        async with self._between_steps():
            if self._executor is not None:
                loop = asyncio.get_running_loop()
                await loop.run_in_executor(self._executor, _copy_into, targets, items)
            else:
                _copy_into(targets, items)
            if self.prefix_cache is not None:  # its KV was computed with the old weights
                self.prefix_cache.clear()
            self._version = version

    def has_work(self) -> bool:
        """Whether a request is waiting or being decoded (safe to read from any thread:
        a snapshot, which a core split re-reads before every learner micro-batch)."""
        return bool(self._waiting) or bool(self._batch.seqs)

    async def run_on_step_thread(self, fn, *args):
        """Run the blocking `fn(*args)` on the engine's step thread between steps; return
        its result. For torch work sharing a small CPU with the engine: a thread's parallel
        torch ops get their own OpenMP pool, and once pools outnumber cores libgomp barely
        spins, so later decode steps pay wake-ups (~30% slower on 2 cores)."""
        await self.start()
        async with self._between_steps():
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    @contextlib.asynccontextmanager
    async def _between_steps(self):
        """Paused for the body (no step in flight); resumes unless already paused."""
        was_paused = self._paused
        await self.pause()
        try:
            yield
        finally:
            if not was_paused:
                await self.resume()

    # -- request intake ------------------------------------------------------------------

    def _admit_request(self, req: GenerateRequest, *, collect: bool) -> Seq | None:
        """Validate `req`; return its state, or None when it generates nothing."""
        if self._closed:
            raise EngineUnavailable("the local engine is closed; create a new one")
        p = req.sampling
        validate_params(p)
        if not req.input_ids:
            raise EngineRejected(f"request {req.rid}: input_ids is empty")
        reserved = len(req.input_ids) + p.max_new_tokens
        if reserved > self._max_context_len:
            raise ContextLengthExceeded(
                f"request {req.rid}: prompt ({len(req.input_ids)} tokens) + max_new_tokens "
                f"({p.max_new_tokens}) = {reserved} > max_context_len {self._max_context_len}")
        if reserved > self.max_kv_tokens:
            raise EngineRejected(
                f"request {req.rid}: needs {reserved} KV tokens but max_kv_tokens is "
                f"{self.max_kv_tokens}; raise max_kv_tokens or lower max_new_tokens")
        if p.stop and self.tokenizer is None:
            raise EngineError("stop strings need a tokenizer: LocalEngine(model, tokenizer=...)")
        if p.max_new_tokens == 0:
            return None
        generator = None
        if not p.greedy:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(p.seed if p.seed is not None else self._rng.getrandbits(63))
        if collect:
            sink = dict(queue=None, result=asyncio.get_running_loop().create_future())
        else:
            sink = dict(queue=asyncio.Queue(), result=None)
        return Seq(req=req, generator=generator, reserved=reserved, **sink)

    # -- scheduler (event loop thread) -----------------------------------------------------

    async def _schedule(self) -> None:
        try:
            await self._run_steps()
        except Exception as exc:  # a bug in the scheduler: fail loudly, never hang callers
            self._closed = True
            error = EngineUnavailable(f"the local engine's scheduler crashed: {exc!r}")
            for seq in [*self._waiting, *self._batch.seqs]:
                self._deliver(seq, error)
            raise

    async def _run_steps(self) -> None:
        loop = asyncio.get_running_loop()
        undelivered: list = []  # the previous step's chunks, delivered while the next runs
        while True:
            self._drop_cancelled_waiting()
            admit = None if self._paused else self._plan()
            if admit is None:
                self._deliver_all(undelivered)
                undelivered = []
                self._wake.clear()
                await self._wake.wait()
                continue
            self._idle.clear()
            involved = [*self._batch.seqs, *admit]
            step = loop.run_in_executor(self._executor, self._batch.step, admit, self._version)
            self._deliver_all(undelivered)
            try:
                undelivered = await step
            except Exception as exc:  # the step failed: fail its requests, keep serving
                undelivered = []
                self._fail_batch(involved, exc)
            finally:
                self._idle.set()

    def _deliver_all(self, events: list) -> None:
        for seq, chunk in events:
            self._deliver(seq, chunk)

    def _drop_cancelled_waiting(self) -> None:
        if any(s.cancelled for s in self._waiting):
            self._waiting = deque(s for s in self._waiting if not s.cancelled)

    def _plan(self) -> list[Seq] | None:
        """Requests to admit this step ([] = just decode), or None when idle."""
        live = [s for s in self._batch.seqs if not s.cancelled]
        admit: list[Seq] = []
        longest = max((s.reserved for s in live), default=0)
        widest = 0  # longest prompt among the admitted (padded prefill width)
        while self._waiting and len(live) + len(admit) < self.max_batch_size:
            nxt = self._waiting[0]
            rows = len(live) + len(admit) + 1
            if rows * max(longest, nxt.reserved) > self.max_kv_tokens:
                break  # over the KV budget: wait for rows to finish
            width = max(widest, len(nxt.req.input_ids))
            if admit and (len(admit) + 1) * width > self.max_prefill_tokens:
                break  # prefill the rest next step, so decoding rows don't stall long
            admit.append(self._waiting.popleft())
            longest, widest = max(longest, nxt.reserved), width
        if not (admit or self._batch.seqs):
            return None
        return admit

    def _deliver(self, seq: Seq, item: TokenChunk | BaseException) -> None:
        if seq.done:
            return
        failed = isinstance(item, BaseException)
        final = failed or item.finish_reason is not None
        seq.done = final
        if seq.queue is not None:
            seq.queue.put_nowait(item)
        elif not failed:
            seq.chunks.append(item)
        if final and seq.result is not None and not seq.result.done():
            if failed:
                seq.result.set_exception(item)
            else:
                seq.result.set_result(seq.chunks)

    def _fail_batch(self, seqs: list[Seq], exc: Exception) -> None:
        self._batch.clear()
        for seq in seqs:
            err = EngineError(f"local engine step failed ({type(exc).__name__}: {exc})")
            err.__cause__ = exc
            self._deliver(seq, err)


def _empty_final_chunk() -> TokenChunk:
    return TokenChunk(output_ids=[], logprobs=[], versions=[], finish_reason="length")


def _copy_into(targets: Mapping[str, torch.Tensor], items: list[tuple[str, object]]) -> None:
    with torch.no_grad():
        for name, tensor in items:
            dst = targets[name]
            if isinstance(tensor, torch.Tensor) and tensor.data_ptr() == dst.data_ptr():
                continue  # shared storage: nothing to copy
            dst.copy_(torch.as_tensor(tensor))
