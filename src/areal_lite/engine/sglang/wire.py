"""engine/ SGLang wire format: request bodies and response parsing (no connections of
its own: `sse_data` only splits the stream of a response it is handed).

The HTTP client (`sglang.py`) builds every `/generate` body here and decodes every
reply here, so the mapping to the protocol in `shared/sglang_protocol.md` lives in one
place and can be tested without a server.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import msgspec

from areal_lite.engine.base import ContextLengthExceeded, EngineError, EngineRejected
from areal_lite.types import GenerateRequest, SamplingParams

__all__ = [
    "Segment",
    "StreamDelta",
    "error_for_status",
    "error_message",
    "generate_body",
    "generate_error",
    "parse_generate",
    "parse_stream_event",
    "sampling_body",
]

_CONTEXT_HINTS = ("context length", "context_length", "too long", "maximum context")


class _FinishReason(msgspec.Struct):
    type: str  # "stop" | "length" | "abort"
    matched: int | str | None = None  # stop token id or stop string
    message: str | None = None  # abort reason, e.g. "Aborted", "Abort in waiting queue"


class _MetaInfo(msgspec.Struct):
    id: str = ""
    finish_reason: _FinishReason | None = None  # None until the last stream chunk
    prompt_tokens: int | None = None  # absent for requests aborted in the queue
    cached_tokens: int = 0  # prompt tokens served from the radix cache
    weight_version: str | int | None = None  # server's version string ("default")
    # one [logprob, token_id, text|null] per output token (cumulative when streaming)
    output_token_logprobs: list[tuple[float | None, int, str | None]] = []


class _Reply(msgspec.Struct):
    meta_info: _MetaInfo
    output_ids: list[int] = []  # incl. the stop token; cumulative when streaming


class _ErrorOnly(msgspec.Struct):
    error: Any = None  # {"message": ...} or a plain string


_reply_decoder = msgspec.json.Decoder(_Reply)
_error_decoder = msgspec.json.Decoder(_ErrorOnly)
_any_decoder = msgspec.json.Decoder()


class Segment(msgspec.Struct, kw_only=True):
    """What one `/generate` call (one segment of a possibly resubmitted request) returned."""

    output_ids: list[int]  # tokens of this segment only
    logprobs: list[float]  # one per output token
    finish_reason: str | None  # "stop" | "length" | "abort"; None mid-stream
    matched: int | str | None = None
    abort_message: str | None = None
    prompt_tokens: int | None = None
    cached_tokens: int = 0
    weight_version: str | None = None  # meta_info.weight_version as the server reports it


class StreamDelta(msgspec.Struct, kw_only=True):
    """New tokens carried by one SSE event (the server sends cumulative lists)."""

    segment: Segment  # output_ids/logprobs hold only the tokens not seen before
    num_seen: int  # tokens of this segment seen so far, including these


def sampling_body(sp: SamplingParams, max_new_tokens: int) -> dict[str, Any]:
    """Map our SamplingParams to SGLang's sampling_params (only keys SGLang knows)."""
    body: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "temperature": sp.temperature,
        "top_p": sp.top_p,
        "top_k": sp.top_k,
        "ignore_eos": sp.ignore_eos,
    }
    if sp.stop_token_ids:
        body["stop_token_ids"] = list(sp.stop_token_ids)
    if sp.stop:
        body["stop"] = list(sp.stop)
    if sp.seed is not None:
        body["sampling_seed"] = sp.seed
    return body


def generate_body(
    req: GenerateRequest, *, generated: list[int], rid: str, stream: bool
) -> dict[str, Any]:
    """The `/generate` body for `req`, continuing after the tokens already `generated`.

    A resubmitted request (after a pause or a failed server) sends the prompt plus
    what was generated so far, and asks for the remaining token budget only.
    """
    input_ids = req.input_ids + generated if generated else req.input_ids
    remaining = req.sampling.max_new_tokens - len(generated)
    return {
        "input_ids": input_ids,
        "sampling_params": sampling_body(req.sampling, remaining),
        "return_logprob": True,
        "stream": stream,
        "rid": rid,
    }


def _segment(reply: _Reply, ids: list[int], lps: list) -> Segment:
    meta = reply.meta_info
    fr = meta.finish_reason
    wv = meta.weight_version
    return Segment(
        output_ids=ids,
        logprobs=[0.0 if t[0] is None else t[0] for t in lps],
        finish_reason=None if fr is None else fr.type,
        matched=None if fr is None else fr.matched,
        abort_message=None if fr is None else fr.message,
        prompt_tokens=meta.prompt_tokens,
        cached_tokens=meta.cached_tokens,
        weight_version=None if wv is None else str(wv),
    )


def _decode_reply(raw: bytes) -> _Reply:
    try:
        return _reply_decoder.decode(raw)
    except msgspec.DecodeError as e:
        raise EngineError(f"unexpected /generate reply ({e}): {raw[:200]!r}") from None


def parse_generate(raw: bytes) -> Segment:
    """Decode a non-streaming `/generate` reply (a single prompt, return_logprob on)."""
    reply = _decode_reply(raw)
    lps = reply.meta_info.output_token_logprobs
    ids = reply.output_ids
    if len(lps) != len(ids):
        raise EngineError(
            f"/generate returned {len(ids)} output_ids but {len(lps)} logprobs;"
            " the client needs return_logprob support on the server"
        )
    return _segment(reply, ids, lps)


def parse_stream_event(data: bytes, num_seen: int, *, server: str = "SGLang") -> StreamDelta:
    """Decode one SSE `data:` payload, given how many tokens were already taken.

    Logprob lists are always cumulative; `output_ids` is cumulative by default and a
    delta with `--incremental-streaming-output`. Either way the new tokens are the
    logprob entries past `num_seen`. An error event before any token is SGLang refusing
    the request (a streamed /generate reports its ValueErrors that way, with HTTP 200):
    `rejection`; one after tokens is an EngineError.
    """
    try:
        reply = _reply_decoder.decode(data)
    except msgspec.DecodeError:
        try:
            err = _error_decoder.decode(data).error
        except msgspec.DecodeError:
            err = None
        if err is None:
            raise EngineError(f"unexpected /generate stream event: {data[:200]!r}") from None
        if num_seen == 0:
            raise rejection(error_message(err), server) from None
        raise EngineError(f"{server} stream error: {error_message(err)}") from None
    lps = reply.meta_info.output_token_logprobs
    new_lps = lps[num_seen:]
    ids = reply.output_ids
    if len(ids) == len(lps):
        new_ids = ids[num_seen:]
    elif len(ids) == len(new_lps):
        new_ids = ids
    else:
        new_ids = [t[1] for t in new_lps]
    return StreamDelta(segment=_segment(reply, new_ids, new_lps), num_seen=len(lps))


def error_message(payload: Any) -> str:
    """The human message inside any of SGLang's error body shapes."""
    if isinstance(payload, dict):
        if "error" in payload:
            return error_message(payload["error"])
        if "message" in payload:
            return str(payload["message"])
    return str(payload)


def _reply_message(raw: bytes) -> str:
    try:
        return error_message(_any_decoder.decode(raw))
    except msgspec.DecodeError:
        return raw.decode(errors="replace")[:500]


def rejection(msg: str, url: str) -> EngineError:
    """SGLang refused a value of the request (`msg` is its ValueError or schema message):
    ContextLengthExceeded when it is about the context, else EngineRejected."""
    if any(h in msg.lower() for h in _CONTEXT_HINTS):
        return ContextLengthExceeded(f"{url}: {msg}")
    return EngineRejected(msg, url)


def generate_error(status: int, raw: bytes, url: str) -> EngineError:
    """Map a non-retryable `/generate` reply: HTTP 400 is SGLang refusing the request
    (input validation, sampling_params out of range: the client's values), anything
    else as `error_for_status`."""
    if status == 400:
        return rejection(_reply_message(raw), url)
    return error_for_status(status, raw, url)


def error_for_status(status: int, raw: bytes, url: str) -> EngineError:
    """Map a non-retryable HTTP error reply of any endpoint to our exception hierarchy."""
    msg = _reply_message(raw)
    if status == 400 and any(h in msg.lower() for h in _CONTEXT_HINTS):
        return ContextLengthExceeded(f"{url}: {msg}")
    if status == 401:
        return EngineError(f"{url}: unauthorized ({msg}); check the engine's api_key")
    return EngineError(f"{url} answered HTTP {status}: {msg}")


async def sse_data(resp) -> AsyncIterator[bytes]:
    """The `data:` payloads of a server-sent-events response (an aiohttp response), up to
    `[DONE]`."""
    buf = bytearray()
    async for piece in resp.content.iter_any():
        buf += piece
        while (i := buf.find(b"\n")) >= 0:
            line = bytes(buf[:i]).rstrip(b"\r")
            del buf[:i + 1]
            if line.startswith(b"data:"):
                data = line[5:].strip()
                if data == b"[DONE]":
                    return
                yield data
