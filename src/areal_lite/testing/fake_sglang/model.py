"""engine/ fake SGLang, model half: request validation and the pretend model (no I/O).

`fake_sglang.py` serves this over HTTP. Here: which `/generate` bodies SGLang rejects
(and with what message), and which tokens/logprobs the fake "samples". Default tokens
are a pure function of (seed, absolute position), so a request resubmitted with its
partial output appended continues exactly as if it had never been interrupted (when
`sampling_seed` is set; otherwise the seed is a hash of the rid).
"""

from __future__ import annotations

import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "BadRequest",
    "FakeModel",
    "Item",
    "SAMPLING_DEFAULTS",
    "parse_generate_items",
    "validate_sampling",
]

# SGLang's SamplingParams keys and defaults (protocol section 1).
SAMPLING_DEFAULTS: dict[str, Any] = {
    "max_new_tokens": 128, "min_new_tokens": 0, "temperature": 1.0, "top_p": 1.0,
    "top_k": -1, "min_p": 0.0, "frequency_penalty": 0.0, "presence_penalty": 0.0,
    "repetition_penalty": 1.0, "stop": None, "stop_token_ids": None, "stop_regex": None,
    "ignore_eos": False, "skip_special_tokens": True,
    "spaces_between_special_tokens": True, "no_stop_trim": False, "n": 1,
    "json_schema": None, "regex": None, "ebnf": None, "structural_tag": None,
    "logit_bias": None, "stream_interval": None, "custom_params": None,
    "sampling_seed": None,
}

_RANGES = {  # key: (low, high, low inclusive)
    "max_new_tokens": (0, None, True), "min_new_tokens": (0, None, True),
    "temperature": (0.0, None, True), "top_p": (0.0, 1.0, False), "min_p": (0.0, 1.0, True),
    "frequency_penalty": (-2.0, 2.0, True), "presence_penalty": (-2.0, 2.0, True),
    "repetition_penalty": (0.0, 2.0, True), "n": (1, None, True),
}

_MASK64 = (1 << 64) - 1


class BadRequest(Exception):
    """A request SGLang answers with HTTP 400; `pydantic` picks the body shape."""

    def __init__(self, message: str, *, pydantic: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.pydantic = pydantic

    def body(self) -> dict[str, Any]:
        if self.pydantic:
            return {"object": "error", "message": self.message, "type": "Bad Request",
                    "param": None, "code": 400}
        return {"error": {"message": self.message}}


def validate_sampling(params: Any, *, vocab_size: int) -> dict[str, Any]:
    """SGLang's defaults merged with `params`; BadRequest like the server would."""
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise BadRequest(f"sampling_params must be an object, got {params!r}", pydantic=True)
    unknown = sorted(set(params) - SAMPLING_DEFAULTS.keys())
    if unknown:  # 0.5.23's schema rejects these (0.5.10 fails with a TypeError)
        raise BadRequest(f"sampling_params: unexpected keyword argument(s) {unknown}",
                         pydantic=True)
    sp = {**SAMPLING_DEFAULTS, **params}
    for key, (low, high, low_inclusive) in _RANGES.items():
        v = sp[key]
        if not isinstance(v, int | float) or isinstance(v, bool):
            raise BadRequest(f"{key} must be a number, got {v!r}", pydantic=True)
        if (v < low if low_inclusive else v <= low) or (high is not None and v > high):
            bound = "[" if low_inclusive else "("
            raise BadRequest(f"{key} must be in {bound}{low}, {high or 'inf'}], got {v}.")
    top_k = sp["top_k"]
    if not isinstance(top_k, int) or not (top_k == -1 or top_k >= 1):
        raise BadRequest(f"top_k must be -1 (disable), or at least 1, got {top_k}.")
    if sp["temperature"] < 1e-6:  # greedy, as SGLang does it
        sp["top_k"] = 1
    stop = sp["stop"]
    sp["stop"] = [stop] if isinstance(stop, str) else list(stop or [])
    ids = sp["stop_token_ids"] or []
    if not all(isinstance(t, int) and 0 <= t < vocab_size for t in ids):
        raise BadRequest(f"stop_token_ids must be token ids below {vocab_size}, got {ids}")
    sp["stop_token_ids"] = frozenset(ids)
    return sp


@dataclass
class Item:
    """One prompt of a (possibly batched) /generate call."""

    input_ids: list[int]
    sampling: dict[str, Any]  # validated, defaults filled in
    rid: str
    index: int = 0  # position in the batch
    return_logprob: bool = False


def _per_item(value: Any, n: int, name: str) -> list[Any]:
    if isinstance(value, list):
        if len(value) != n:
            raise BadRequest(f"{name} has {len(value)} entries for a batch of {n}")
        return value
    return [value] * n


def _rids(rid: Any, n: int, batch: bool) -> list[str]:
    if rid is None:
        return [uuid.uuid4().hex for _ in range(n)]
    if isinstance(rid, str):
        return [f"{rid}_{i}" for i in range(n)] if batch else [rid]
    return [str(r) for r in _per_item(rid, n, "rid")]


def parse_generate_items(
    body: Any,
    *,
    vocab_size: int,
    encode: Callable[[str], list[int]] | None,
) -> tuple[list[Item], bool]:
    """Split a /generate body into items; returns (items, is_batch)."""
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object", pydantic=True)
    if body.get("text") is not None:
        if encode is None:
            raise BadRequest("text input needs a tokenizer; this server runs with "
                             "--skip-tokenizer-init, send input_ids instead")
        text = body["text"]
        prompts = [encode(t) for t in text] if isinstance(text, list) else [encode(text)]
        batch = isinstance(text, list)
    elif body.get("input_ids") is not None:
        ids = body["input_ids"]
        if not isinstance(ids, list) or not ids:
            raise BadRequest("input_ids cannot be empty.")
        batch = isinstance(ids[0], list)
        prompts = ids if batch else [ids]
    else:
        raise BadRequest("Either text, input_ids or input_embeds should be provided.")
    for p in prompts:
        if not p:
            raise BadRequest("input_ids cannot be empty.")
        try:  # min/max run in C; a non-number fails the comparison
            ok = isinstance(p, list) and min(p) >= 0
            in_vocab = ok and max(p) < vocab_size
        except TypeError:
            ok = False
        if not ok:
            raise BadRequest(f"input_ids must be token ids in [0, {vocab_size})")
        if not in_vocab:  # SGLang's TokenizerManager words it so (the check is >=)
            raise BadRequest(f"The input_ids {p} contains values greater than the vocab "
                             f"size ({vocab_size}).")
    sps = [validate_sampling(s, vocab_size=vocab_size)
           for s in _per_item(body.get("sampling_params"), len(prompts), "sampling_params")]
    n = sps[0]["n"]
    if n > 1:  # each sample becomes its own item with a fresh rid (protocol section 1)
        prompts = [p for p in prompts for _ in range(n)]
        sps = [{**s, "n": 1} for s in sps for _ in range(n)]
        rids = [uuid.uuid4().hex for _ in prompts]
        batch = True
    else:
        rids = _rids(body.get("rid"), len(prompts), batch)
    logprob = _per_item(body.get("return_logprob", False), len(prompts), "return_logprob")
    items = [Item(input_ids=p, sampling=s, rid=r, index=i, return_logprob=bool(lp))
             for i, (p, s, r, lp) in enumerate(zip(prompts, sps, rids, logprob))]
    return items, batch


def _mix(x: int) -> int:
    """splitmix64 finaliser: a cheap, well-spread hash of an int."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


@dataclass
class FakeModel:
    """Chooses the fake's tokens and logprobs.

    `responder(input_ids, sampling_params) -> tokens` scripts the output exactly (it is
    called once per server call, with the prompt as sent); without one, tokens are
    pseudo-random and end in `eos_token_id` with probability `eos_prob` per token.
    `logprob_fn(token_id, position) -> float` overrides the default logprobs.
    """

    vocab_size: int = 1024
    eos_token_id: int = 2
    eos_prob: float = 0.0  # chance per token that the default model emits eos
    responder: Callable[[list[int], dict[str, Any]], list[int]] | None = None
    logprob_fn: Callable[[int, int], float] | None = None
    _eos_cut: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        if not 0 <= self.eos_token_id < self.vocab_size:
            raise ValueError(f"eos_token_id must be in [0, vocab_size), got "
                             f"{self.eos_token_id} with vocab_size {self.vocab_size}")
        self._eos_cut = int(self.eos_prob * (1 << 20))

    def script(self, item: Item) -> list[int] | None:
        if self.responder is None:
            return None
        return [int(t) for t in self.responder(list(item.input_ids), dict(item.sampling))]

    def seed(self, item: Item) -> int:
        seed = item.sampling["sampling_seed"]
        return int(seed) if seed is not None else zlib.crc32(item.rid.encode())

    def token(self, seed: int, position: int) -> tuple[int, float]:
        """The default model's (token, logprob) at absolute `position`."""
        x = (((seed << 32) ^ position) + 0x9E3779B97F4A7C15) & _MASK64  # splitmix64
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
        h = x ^ (x >> 31)
        if (h & 0xFFFFF) < self._eos_cut:
            tok = self.eos_token_id
        else:
            tok = (h >> 20) % self.vocab_size
            if tok == self.eos_token_id:
                tok = (tok + 1) % self.vocab_size
        if self.logprob_fn is not None:
            return tok, float(self.logprob_fn(tok, position))
        return tok, -((h >> 44) & 0xFFFFF) / (1 << 20) * 4.0  # in (-4, 0]

    def logprob(self, seed: int, token: int, position: int) -> float:
        """Logprob reported for a scripted `token` at `position`."""
        if self.logprob_fn is not None:
            return float(self.logprob_fn(token, position))
        return -((_mix((seed << 32) ^ position) >> 44) & 0xFFFFF) / (1 << 20) * 4.0
