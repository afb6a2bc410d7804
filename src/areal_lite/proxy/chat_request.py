"""Proxy stage 1: an OpenAI chat request body -> a validated `ChatRequest`.

Strict JSON types (a string is not a boolean), every number range-checked before it
reaches an engine (integers compared exactly, so 309 digits are out of range, not an
overflow), and a 400 naming the field otherwise. `chat_template_kwargs` is limited to
`TEMPLATE_KWARGS`: a client never supplies template text or render arguments. The
Anthropic and Responses front-ends translate their bodies into this one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from areal_lite.proxy.http import ApiError
from areal_lite.types import SamplingParams

MAX_N = 64  # choices per request


@dataclass(frozen=True, slots=True)
class ChatDefaults:
    """What a request gets when it doesn't say (from config rollout.sampling)."""

    max_new_tokens: int = 512
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1


@dataclass(slots=True)
class ChatRequest:
    messages: list[dict]
    tools: list[dict] | None  # None when absent or tool_choice == "none"
    sampling: SamplingParams  # max_new_tokens resolved against the context later
    max_tokens: int | None  # what the client asked for, if anything
    n: int
    stream: bool
    include_usage: bool
    logprobs: bool
    template_kwargs: dict


# Template variables a client may set (`chat_template_kwargs`): harmless flags only. A
# client never supplies template text or the render's own arguments (tokenize, tools...).
TEMPLATE_KWARGS = {"enable_thinking": bool, "thinking": bool, "reasoning_effort": str}
MAX_SEED = (1 << 63) - 1 - MAX_N  # choice i samples with seed + i; engines take int64


def _num(body: dict, key: str, default, lo: float, hi: float, kind=float):
    """`body[key]` checked to be a `kind` in [lo, hi] (ints compared exactly: a
    309-digit integer is out of range, not an overflow)."""
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            kind is int and isinstance(value, float)
            and not (math.isfinite(value) and value.is_integer())):
        raise ApiError(400, f"'{key}' must be a {kind.__name__}, got {value!r:.50}", param=key)
    if not (lo <= value <= hi):  # NaN fails too
        raise ApiError(400, f"'{key}' must be in [{lo}, {hi}], got {value!r:.50}", param=key)
    return kind(value)


def _flag(body: dict, key: str, default: bool = False) -> bool:
    """A JSON boolean (the string "false" is not one); absent or null -> default."""
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ApiError(400, f"'{key}' must be a boolean, got {value!r:.50}", param=key)
    return value


def _template_kwargs(value) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ApiError(400, "'chat_template_kwargs' must be an object",
                       param="chat_template_kwargs")
    for key, v in value.items():
        kind = TEMPLATE_KWARGS.get(key)
        if kind is None:
            raise ApiError(400, f"'chat_template_kwargs.{key:.50}' is not allowed; a client may "
                           f"set only {sorted(TEMPLATE_KWARGS)}", param=f"chat_template_kwargs.{key:.50}")
        if not isinstance(v, kind) or (kind is str and len(v) > 32):
            raise ApiError(400, f"'chat_template_kwargs.{key}' must be a {kind.__name__}"
                           f"{' of at most 32 characters' if kind is str else ''}, got {v!r:.50}",
                           param=f"chat_template_kwargs.{key}")
    return value


def _stop_list(value) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(s, str) for s in value) and len(value) <= 16:
        return tuple(s for s in value if s)
    raise ApiError(400, "'stop' must be a string or a list of at most 16 strings", param="stop")


def parse_chat_request(body: object, defaults: ChatDefaults) -> ChatRequest:
    """Validate an OpenAI chat request body; raises ApiError(400) naming the bad field."""
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise ApiError(400, "'messages' must be a non-empty list of message objects", param="messages")
    tools = body.get("tools")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise ApiError(400, "'tools' must be a list of tool objects", param="tools")
    if body.get("tool_choice") == "none" or not tools:
        tools = None
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        max_tokens = _num({"max_tokens": max_tokens}, "max_tokens", None, 1, 1 << 30, int)
    top_k = _num(body, "top_k", defaults.top_k, -1, 1 << 30, int)
    if top_k == 0:
        raise ApiError(400, "'top_k' must be -1 (whole vocabulary) or >= 1, got 0", param="top_k")
    sampling = SamplingParams(
        max_new_tokens=max_tokens or defaults.max_new_tokens,
        temperature=_num(body, "temperature", defaults.temperature, 0.0, 2.0),
        top_p=_num(body, "top_p", defaults.top_p, 1e-9, 1.0),
        top_k=top_k,
        stop=_stop_list(body.get("stop")),
        seed=_num(body, "seed", None, 0, MAX_SEED, int),
    )
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise ApiError(400, "'stream_options' must be an object", param="stream_options")
    return ChatRequest(
        messages=messages, tools=tools, sampling=sampling, max_tokens=max_tokens,
        n=_num(body, "n", 1, 1, MAX_N, int), stream=_flag(body, "stream"),
        include_usage=_flag(stream_options, "include_usage"),
        logprobs=_flag(body, "logprobs"),
        template_kwargs=_template_kwargs(body.get("chat_template_kwargs")))
