"""Local engine internals: the running batch and one step of it, run on the worker thread.

A step (see `RunningBatch.step`): remove cancelled rows; prepare the admitted requests'
prefill (the prompt prefix they all share -- a GRPO group, a common system prompt -- is
computed once and copied to every row, and whatever part of it an earlier prompt already
computed comes from the prefix cache, engine/prefix.py); run one forward pass that decodes
a token for every running request and prefills the rest of the admitted prompts as one
left-padded batch (one pass for both with the fused Llama-family forward,
engine/fused.py; one Hugging Face forward per batch otherwise); sample, merge the
admitted rows' KV into the batch; remove finished rows. It returns the chunks to stream;
the event loop delivers them.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from dataclasses import dataclass, field

import torch

from areal_lite.engine.local.fused import FusedForward, Part
from areal_lite.engine.local.kv import PaddedKV
from areal_lite.engine.local.prefix import PrefixCache
from areal_lite.engine.local.sampling import choose_tokens, stop_reason
from areal_lite.engine.stats import EngineStats
from areal_lite.types import GenerateRequest, SamplingParams, TokenChunk

MIN_SHARED_PREFIX = 4  # shorter shared prompt prefixes are not worth a separate pass


@dataclass(eq=False)
class Seq:
    """One request's state. The step thread appends tokens; the loop thread sets
    `cancelled` and `done` and reads the rest only between steps."""

    req: GenerateRequest
    queue: asyncio.Queue | None  # stream(): TokenChunk | BaseException per step
    result: asyncio.Future | None  # generate(): all chunks at once, one wakeup
    generator: torch.Generator | None  # per-request RNG (None for greedy)
    reserved: int  # prompt + max_new_tokens: KV tokens this request may hold
    output_ids: list[int] = field(default_factory=list)
    chunks: list[TokenChunk] = field(default_factory=list)  # generate(): collected so far
    done: bool = False  # final chunk (or error) delivered
    cancelled: bool = False  # the consumer went away: drop at the next step
    cached_tokens: int = 0  # prompt tokens taken from the prefix cache

    @property
    def params(self) -> SamplingParams:
        return self.req.sampling


class RunningBatch:
    """The requests holding KV rows; row r of `kv` belongs to `seqs[r]`."""

    def __init__(self, model, *, device: torch.device, num_layers: int,
                 eos_ids: frozenset[int], tokenizer=None, max_batch_size: int,
                 prefix_cache: PrefixCache | None = None, fused: bool = True):
        self.model = model
        self.device = device
        self.num_layers = num_layers
        self.eos_ids = eos_ids
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.kv = PaddedKV(num_layers, rows_cap=0, cols_cap=0, device=device)
        self.seqs: list[Seq] = []
        self._cache_kwarg = cache_kwarg(model)
        self.prefix_cache = prefix_cache  # KV of recent prompts (engine/prefix.py)
        # one pass for several KV batches (engine/fused.py); None: the model's own forward
        self.fused = FusedForward.for_model(model) if fused else None
        self._counts = EngineStats()  # totals, updated during a step (step thread only)
        self.stats = EngineStats()  # a copy of them published after each step (any thread)

    def clear(self) -> None:
        self.kv.clear()
        self.seqs = []

    def step(self, admit: list[Seq], version: int) -> list[tuple[Seq, TokenChunk]]:
        """Advance the batch by one token per request (see module docstring)."""
        start, stats = time.perf_counter(), self._counts
        with torch.inference_mode():
            self._remove({r for r, s in enumerate(self.seqs) if s.cancelled})
            parts: list[tuple[PaddedKV, list[list[int]]]] = []
            if self.seqs:
                self.kv.reserve_decode(cols_hint=max(s.reserved for s in self.seqs))
                parts.append((self.kv, [[s.output_ids[-1]] for s in self.seqs]))
            if admit:
                prefill, rows = self._start_prefill(admit)
                parts.append((prefill, rows))
                stats.prompt_tokens += sum(len(s.req.input_ids) for s in admit)
                stats.prefill_tokens += sum(len(r) for r in rows)
            logits = self._forward_parts(parts)
            events: list[tuple[Seq, TokenChunk]] = []
            finished: set[int] = set()
            if self.seqs:
                finished = self._emit(self.seqs, logits[0], version, events)
                stats.decode_tokens += len(self.seqs)
            if admit:
                self._admit(admit, prefill, logits[-1], version, events)
            self._remove(finished)
        stats.steps += 1
        stats.generated_tokens += len(events)
        stats.busy_s += time.perf_counter() - start
        self.stats = stats.copy()  # one assignment: readers never see half a step
        return events

    def _remove(self, rows: set[int]) -> None:
        if rows:
            order = self.kv.remove(rows)
            self.seqs = [self.seqs[o] for o in order]

    def _admit(self, admit: list[Seq], prefilled: PaddedKV, logits: torch.Tensor,
               version: int, events: list) -> None:
        if len(admit) == 1:  # one row: no padding; cache its prompt's KV
            self._remember(prefilled, admit[0].req.input_ids)
        else:
            prefilled.zero_padding()
        done = self._emit(admit, logits, version, events)
        kept = [admit[o] for o in prefilled.remove(done)] if done else admit
        hint = max((s.reserved for s in [*self.seqs, *kept]), default=0)
        self.kv.merge(prefilled, rows_hint=self.max_batch_size, cols_hint=hint)
        self.seqs = self.seqs + kept

    def _start_prefill(self, seqs: list[Seq]) -> tuple[PaddedKV, list[list[int]]]:
        """A fresh cache for `seqs`, holding what is already known of their prompts (a
        prefix-cache hit, their shared prefix), and the tokens each row still needs."""
        prompts = [s.req.input_ids for s in seqs]
        if len(prompts) == 1:  # the longest cached prefix; the rest runs in the step
            kv = PaddedKV(self.num_layers, rows_cap=1, cols_cap=len(prompts[0]),
                          device=self.device)
            hit = self._start_from_cache(kv, seqs, len(prompts[0]) - 1)
            return kv, [prompts[0][hit:]]
        # the prefix all prompts share is computed once (each row keeps >= 1 own token)
        shared = min(common_prefix_len(prompts), min(len(p) for p in prompts) - 1)
        rows = [p[shared:] for p in prompts]
        kv = PaddedKV(self.num_layers, rows_cap=len(seqs),
                      cols_cap=shared + max(len(r) for r in rows), device=self.device)
        if shared < MIN_SHARED_PREFIX:
            kv.start_rows(len(seqs))
            return kv, prompts
        hit = self._start_from_cache(kv, seqs, shared)
        if shared > hit:
            self._forward(kv, [prompts[0][hit:shared]])
            self._counts.prefill_tokens += shared - hit
            self._remember(kv, prompts[0][:shared])
        kv.broadcast_first_row(len(seqs))
        return kv, rows

    def _start_from_cache(self, kv: PaddedKV, seqs: list[Seq], limit: int) -> int:
        """Start `kv` with one row holding the longest cached prefix of the first prompt's
        first `limit` tokens (all of `seqs` share it); return its length (0: no hit)."""
        kv.start_rows(1)
        if self.prefix_cache is None:
            return 0
        hit, entry = self.prefix_cache.lookup(seqs[0].req.input_ids, limit)
        if entry is not None:
            kv.load_first_row(entry.kv, hit)
            for s in seqs:
                s.cached_tokens = hit
        return hit

    def _remember(self, kv: PaddedKV, ids: list[int]) -> None:
        """Cache row 0's KV of `ids` (row 0 was started alone: no left padding)."""
        if self.prefix_cache is not None:
            self.prefix_cache.store(ids, kv.first_row(len(ids)))

    def _forward(self, kv: PaddedKV, rows: list[list[int]]) -> torch.Tensor:
        """Run new tokens (one list per row, left-padded) into `kv`; last-token logits."""
        return self._forward_parts([(kv, rows)])[0]

    def _forward_parts(self, batches: list[tuple[PaddedKV, list[list[int]]]]
                       ) -> list[torch.Tensor]:
        """`_forward` for several caches: one pass with the fused forward."""
        parts, lens = [], [[len(r) for r in rows] for _, rows in batches]
        for (kv, rows), n in zip(batches, lens):
            width = max(n)
            ids = torch.tensor([[r[0]] * (width - len(r)) + r for r in rows], device=self.device)
            mask, positions = kv.prepare(n)
            parts.append(Part(kv, ids, mask, positions))
        if self.fused is not None:
            logits = self.fused(parts)
        else:
            logits = [self._hf_forward(p) for p in parts]
        for (kv, _), n in zip(batches, lens):
            kv.advance(n)
        return logits

    def _hf_forward(self, part: Part) -> torch.Tensor:
        out = self.model(input_ids=part.ids, attention_mask=part.mask,
                         position_ids=part.positions, **{self._cache_kwarg: part.kv.cache},
                         use_cache=True, logits_to_keep=1)
        return out.logits[:, -1]

    def _emit(self, seqs: list[Seq], logits: torch.Tensor, version: int,
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


def cache_kwarg(model) -> str:
    """The forward() keyword that takes a KV cache: `cache` from transformers 5.24 on
    (`past_key_values` is deprecated there), `past_key_values` before."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def common_prefix_len(prompts: list[list[int]]) -> int:
    """Length of the longest prefix all prompts share."""
    first = prompts[0]
    n = min(len(p) for p in prompts)
    for i in range(n):
        t = first[i]
        if any(p[i] != t for p in prompts):
            return i
    return n
