"""The in-process torch inference engine (`rollout.backend = "local"`): token ids in,
sampled token ids + logprobs + weight versions out, with continuous batching.

One scheduler task on the event loop owns the batch. Each iteration it (1) drops
cancelled requests, (2) admits waiting ones within `max_batch_size` and the KV budget,
then runs one *step* on a single worker thread (so the loop stays responsive for
thousands of agent coroutines): remove dropped rows from the KV cache, decode one token
for every running request, prefill the admitted ones as one left-padded batch (their
first token comes from it) and merge them into the running batch, remove finished rows.
New tokens are streamed to their requests as `TokenChunk`s after every step.

KV budget (`max_kv_tokens`): the padded cache holds ``rows x longest row`` tokens, so a
request is admitted only while ``(running + 1) * max(prompt + max_new_tokens over the
batch) <= max_kv_tokens`` -- a bound on the real (padded) memory. Requests beyond it
queue (FIFO). A request that alone exceeds it is rejected with `EngineError`.

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
import random
from collections import deque
from collections.abc import AsyncIterator, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from areal_lite.engine.base import ContextLengthExceeded, EngineError, EngineUnavailable
from areal_lite.engine.kv import PaddedKV
from areal_lite.engine.sampling import choose_tokens, stop_reason, validate_params
from areal_lite.types import GenerateRequest, GenerateResult, SamplingParams, TokenChunk


_MIN_SHARED_PREFIX = 4  # shorter shared prompt prefixes are not worth a separate pass


@dataclass(eq=False)
class _Seq:
    """One request's state, owned by the scheduler (tokens are appended on the step thread
    while the loop thread only reads `cancelled`)."""

    req: GenerateRequest
    queue: asyncio.Queue  # TokenChunk | BaseException, consumed by `stream`
    generator: torch.Generator | None  # per-request RNG (None for greedy)
    reserved: int  # prompt + max_new_tokens: KV tokens this request may hold
    output_ids: list[int] = field(default_factory=list)
    done: bool = False  # final chunk (or error) delivered
    cancelled: bool = False  # the consumer went away: drop at the next step

    @property
    def params(self) -> SamplingParams:
        return self.req.sampling


@dataclass(eq=False)
class _Plan:
    """What one step does, decided on the loop thread between steps."""

    drop_rows: set[int]  # rows of the running batch to remove first (cancelled)
    admit: list[_Seq]  # waiting requests to prefill and merge
    version: int  # weight version stamped on this step's tokens


class LocalEngine:
    """Continuous-batching generation on a Hugging Face causal LM (see module docstring).

    `model` is any HF decoder module (`AutoModelForCausalLM`); `tokenizer` is needed only
    for stop strings. `max_context_len` defaults to the model's
    `max_position_embeddings`. Use as ``async with LocalEngine(model) as engine:`` or call
    `start()`/`close()`; `stream`/`generate` start the scheduler on first use.
    """

    def __init__(self, model, *, tokenizer=None, device: str = "cpu", max_batch_size: int = 64,
                 max_kv_tokens: int = 65536, max_context_len: int | None = None,
                 initial_version: int = 0, seed: int = 0):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        if next(model.parameters()).device != self.device:
            model.to(self.device)  # in place: a shared trainer module moves too
        text_cfg = model.config.get_text_config(decoder=True)
        self._num_layers = text_cfg.num_hidden_layers
        self._max_context_len = int(max_context_len or text_cfg.max_position_embeddings)
        self.max_batch_size = max_batch_size
        self.max_kv_tokens = max_kv_tokens
        self.eos_ids = _eos_ids(model, tokenizer)
        self._version = initial_version
        self._rng = random.Random(seed)  # seeds requests that bring no seed of their own
        self._waiting: deque[_Seq] = deque()
        self._running: list[_Seq] = []  # row r of self._kv belongs to self._running[r]
        self._kv = PaddedKV(self._num_layers, rows_cap=0, cols_cap=0, device=self.device)
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
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        """Requests queued for admission."""
        return len(self._waiting)

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
        for seq in [*self._waiting, *self._running]:
            self._deliver(seq, error)
        self._waiting.clear()
        self._running = []
        self._kv.clear()

    async def __aenter__(self) -> LocalEngine:
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def generate(self, req: GenerateRequest) -> GenerateResult:
        chunks = [chunk async for chunk in self.stream(req)]
        return GenerateResult.from_chunks(chunks, prompt_tokens=len(req.input_ids))

    async def stream(self, req: GenerateRequest) -> AsyncIterator[TokenChunk]:
        """Yield the new tokens of `req` after every decode step; the last chunk carries
        `finish_reason`. Closing or cancelling the consumer removes the request."""
        seq = self._admit_request(req)
        if seq is None:  # max_new_tokens == 0: nothing to generate
            yield TokenChunk(output_ids=[], logprobs=[], versions=[], finish_reason="length")
            return
        await self.start()
        self._waiting.append(seq)
        self._wake.set()
        try:
            while True:
                item = await seq.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
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
        was_paused = self._paused
        await self.pause()
        try:
            if self._executor is not None:
                loop = asyncio.get_running_loop()
                await loop.run_in_executor(self._executor, _copy_into, targets, items)
            else:
                _copy_into(targets, items)
            self._version = version
        finally:
            if not was_paused:
                await self.resume()

    # -- request intake ------------------------------------------------------------------

    def _admit_request(self, req: GenerateRequest) -> _Seq | None:
        """Validate `req`; return its state, or None when it generates nothing."""
        if self._closed:
            raise EngineUnavailable("the local engine is closed; create a new one")
        p = req.sampling
        validate_params(p)
        if not req.input_ids:
            raise EngineError(f"request {req.rid}: input_ids is empty")
        reserved = len(req.input_ids) + p.max_new_tokens
        if reserved > self._max_context_len:
            raise ContextLengthExceeded(
                f"request {req.rid}: prompt ({len(req.input_ids)} tokens) + max_new_tokens "
                f"({p.max_new_tokens}) = {reserved} > max_context_len {self._max_context_len}")
        if reserved > self.max_kv_tokens:
            raise EngineError(
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
        return _Seq(req=req, queue=asyncio.Queue(), generator=generator, reserved=reserved)

    # -- scheduler (event loop thread) -----------------------------------------------------

    async def _schedule(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._drop_cancelled_waiting()
            plan = None if self._paused else self._plan()
            if plan is None:
                self._wake.clear()
                await self._wake.wait()
                continue
            self._idle.clear()
            running = self._running
            try:
                new_running, events = await loop.run_in_executor(
                    self._executor, self._step, running, plan)
            except Exception as exc:  # the step failed: fail its requests, keep serving
                self._fail_batch([*running, *plan.admit], exc)
                continue
            finally:
                self._idle.set()
            self._running = new_running
            for seq, chunk in events:
                self._deliver(seq, chunk)

    def _drop_cancelled_waiting(self) -> None:
        if any(s.cancelled for s in self._waiting):
            self._waiting = deque(s for s in self._waiting if not s.cancelled)

    def _plan(self) -> _Plan | None:
        """Pick this step's work, or None when there is nothing to do."""
        drop = {r for r, s in enumerate(self._running) if s.cancelled}
        live = [s for s in self._running if not s.cancelled]
        admit: list[_Seq] = []
        longest = max((s.reserved for s in live), default=0)
        while self._waiting and len(live) + len(admit) < self.max_batch_size:
            nxt = self._waiting[0]
            rows = len(live) + len(admit) + 1
            if rows * max(longest, nxt.reserved) > self.max_kv_tokens:
                break  # over the KV budget: wait for rows to finish
            admit.append(self._waiting.popleft())
            longest = max(longest, nxt.reserved)
        if not (drop or admit or live):
            return None
        return _Plan(drop_rows=drop, admit=admit, version=self._version)

    def _deliver(self, seq: _Seq, item: TokenChunk | BaseException) -> None:
        if seq.done:
            return
        if isinstance(item, BaseException) or item.finish_reason is not None:
            seq.done = True
        seq.queue.put_nowait(item)

    def _fail_batch(self, seqs: list[_Seq], exc: Exception) -> None:
        self._kv.clear()
        self._running = []
        for seq in seqs:
            err = EngineError(f"local engine step failed ({type(exc).__name__}: {exc})")
            err.__cause__ = exc
            self._deliver(seq, err)

    # -- one step (worker thread) ----------------------------------------------------------

    def _step(self, running: list[_Seq], plan: _Plan):
        """Remove, decode, prefill+merge, remove finished; return (running, events)."""
        with torch.inference_mode():
            if plan.drop_rows:
                order = self._kv.remove(plan.drop_rows)
                running = [running[o] for o in order]
            events: list[tuple[_Seq, TokenChunk]] = []
            finished: set[int] = set()
            if running:
                logits = self._decode(running)
                finished = self._emit(running, logits, plan.version, events)
            if plan.admit:
                prefilled, logits = self._prefill(plan.admit)
                done_new = self._emit(plan.admit, logits, plan.version, events)
                if done_new:
                    prefilled.remove(done_new)
                kept = [s for i, s in enumerate(plan.admit) if i not in done_new]
                hint = max((s.reserved for s in [*running, *kept]), default=0)
                self._kv.merge(prefilled, rows_hint=self.max_batch_size, cols_hint=hint)
                running = running + kept
            if finished:
                order = self._kv.remove(finished)
                running = [running[o] for o in order]
            return running, events

    def _decode(self, running: list[_Seq]) -> torch.Tensor:
        kv = self._kv
        kv.reserve_decode(cols_hint=max(s.reserved for s in running))
        ones = [1] * len(running)
        ids = torch.tensor([[s.output_ids[-1]] for s in running], device=self.device)
        mask, positions = kv.prepare(ones)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                         past_key_values=kv.cache, use_cache=True)
        kv.advance(ones)
        return out.logits[:, -1]

    def _prefill(self, seqs: list[_Seq]) -> tuple[PaddedKV, torch.Tensor]:
        """Prefill `seqs` as one batch; the prompt prefix they all share is computed once
        (a GRPO group, a common system prompt). Returns (their KV, last-token logits)."""
        prompts = [s.req.input_ids for s in seqs]
        shared = _common_prefix_len(prompts) if len(prompts) > 1 else 0
        shared = min(shared, min(len(p) for p in prompts) - 1)  # each row keeps >= 1 token
        suffixes = [p[shared:] for p in prompts]
        width = max(len(t) for t in suffixes)
        kv = PaddedKV(self._num_layers, rows_cap=len(seqs), cols_cap=shared + width,
                      device=self.device)
        if shared >= _MIN_SHARED_PREFIX:
            kv.start_rows(1)
            self._forward(kv, [prompts[0][:shared]], logits=False)
            kv.broadcast_first_row(len(seqs))
        else:
            kv.start_rows(len(seqs))
            suffixes = prompts
        logits = self._forward(kv, suffixes, logits=True)
        kv.zero_padding()
        return kv, logits

    def _forward(self, kv: PaddedKV, rows: list[list[int]], *, logits: bool):
        """Run new tokens (one list per row, left-padded) through the model into `kv`."""
        lens = [len(r) for r in rows]
        width = max(lens)
        ids = torch.tensor([[r[0]] * (width - len(r)) + r for r in rows], device=self.device)
        mask, positions = kv.prepare(lens)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                         past_key_values=kv.cache, use_cache=True, logits_to_keep=1)
        kv.advance(lens)
        return out.logits[:, -1] if logits else None

    def _emit(self, seqs: list[_Seq], logits: torch.Tensor, version: int,
              events: list) -> set[int]:
        """Choose a token per row, record it, queue its chunk; return finished rows."""
        tokens, logprobs = choose_tokens(logits, [s.params for s in seqs],
                                         [s.generator for s in seqs])
        decode_tail = self._decode_tail if self.tokenizer is not None else None
        finished = set()
        for row, (seq, tok, lp) in enumerate(zip(seqs, tokens, logprobs)):
            seq.output_ids.append(tok)
            end = stop_reason(tok, seq.output_ids, seq.params, self.eos_ids, decode_tail)
            chunk = TokenChunk(output_ids=[tok], logprobs=[lp], versions=[version])
            if end is not None:
                chunk.finish_reason, chunk.matched_stop = end
                finished.add(row)
            events.append((seq, chunk))
        return finished

    def _decode_tail(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)


def _copy_into(targets: Mapping[str, torch.Tensor], items: list[tuple[str, object]]) -> None:
    with torch.no_grad():
        for name, tensor in items:
            dst = targets[name]
            if isinstance(tensor, torch.Tensor) and tensor.data_ptr() == dst.data_ptr():
                continue  # shared storage: nothing to copy
            dst.copy_(torch.as_tensor(tensor))


def _common_prefix_len(prompts: list[list[int]]) -> int:
    first = prompts[0]
    n = min(len(p) for p in prompts)
    for i in range(n):
        t = first[i]
        if any(p[i] != t for p in prompts):
            return i
    return n


def _eos_ids(model, tokenizer) -> frozenset[int]:
    """Stop tokens as HF generate would use them: generation_config, else config, else
    the tokenizer's eos."""
    for source in (getattr(model, "generation_config", None), model.config):
        eos = getattr(source, "eos_token_id", None) if source is not None else None
        if eos is not None:
            return frozenset([eos] if isinstance(eos, int) else eos)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        return frozenset([tokenizer.eos_token_id])
    return frozenset()
