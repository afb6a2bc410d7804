"""Proxy stage 1 (Anthropic): POST /v1/messages -> the chat core -> an Anthropic Message.

An Anthropic request is translated into the OpenAI-shaped messages and tools the
renderer takes (`system` -> a system message, assistant `tool_use` blocks ->
`tool_calls`, user `tool_result` blocks -> `tool` messages) and served by the chat
endpoint's core (chat.py): prefix-stable render, context fit, generate or stream,
record in the session's tree, tool-call and reasoning parsing. So an assistant turn
sent back as `text`/`tool_use` blocks re-renders exactly like the same turn sent back
as an OpenAI message, and continues the earlier completion's tokens. The message id
(`msg_...`) is the completion's id in the tree: rewards keyed by it work like chat
completion ids.

`max_tokens` is required (Anthropic's rule) and is a cap: it is clamped to the room the
prompt leaves in the context window rather than rejected, since Anthropic agents pass
large fixed values. Errors are Anthropic-shaped: `{"type": "error", "error": {...}}`.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator, Mapping
from contextlib import aclosing
from typing import Any

import msgspec

from areal_lite.proxy.chat import (
    ChatCompletions,
    ChatDefaults,
    ChatRequest,
    ChoiceStream,
    parse_chat_request,
)
from areal_lite.proxy.http import ApiError, ProxyResponse, json_response, started_sse
from areal_lite.proxy.parsers import Delta, ToolCall
from areal_lite.proxy.render import Prompt
from areal_lite.proxy.sessions import Session
from areal_lite.types import GenerateResult

__all__ = ["Messages", "anthropic_error_response", "parse_messages_request", "to_openai_messages"]

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                403: "permission_error", 404: "not_found_error", 413: "request_too_large",
                429: "rate_limit_error", 529: "overloaded_error"}
_UNSUPPORTED_BLOCKS = frozenset({"image", "document", "search_result", "container_upload"})
_MAX_STOP_SEQUENCES = 16


def anthropic_error_body(e: ApiError) -> dict:
    kind = _ERROR_TYPES.get(e.status, "api_error" if e.status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": e.message}}


def anthropic_error_response(e: ApiError) -> ProxyResponse:
    return json_response(anthropic_error_body(e), e.status)


# ----------------------------------------------------------------------------- requests

def _bad(message: str) -> ApiError:
    return ApiError(400, message)


def _block_text(block: Any, where: str) -> str:
    kind = block.get("type") if isinstance(block, Mapping) else None
    if isinstance(kind, str) and kind in _UNSUPPORTED_BLOCKS:
        raise _bad(f"{where}: {kind} content is not supported "
                   "(this proxy serves text-only models)")
    if kind != "text" or not isinstance(block.get("text"), str):
        raise _bad(f"{where} must be {{\"type\": \"text\", \"text\": <string>}}, "
                   f"got {block!r:.200}")
    return block["text"]


def _text_of(content: Any, where: str) -> str:
    """A string, or a list of text blocks (joined with "\\n" like OpenAI parts) -> text."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _bad(f"{where} must be a string or a list of content blocks")
    return "\n".join(_block_text(block, f"{where}[{j}]") for j, block in enumerate(content))


def _user_turn(content: Any, where: str) -> list[dict]:
    """User blocks -> `tool` messages (tool_result) and user messages (runs of text)."""
    if isinstance(content, str):
        return [{"role": "user", "content": content}]
    if not isinstance(content, list):
        raise _bad(f"{where} must be a string or a list of content blocks")
    out: list[dict] = []
    texts: list[str] = []
    for j, block in enumerate(content):
        if isinstance(block, Mapping) and block.get("type") == "tool_result":
            if texts:
                out.append({"role": "user", "content": "\n".join(texts)})
                texts = []
            result = block.get("content") or ""
            out.append({"role": "tool", "tool_call_id": block.get("tool_use_id"),
                        "content": _text_of(result, f"{where}[{j}].content")})
        else:
            texts.append(_block_text(block, f"{where}[{j}]"))
    if texts or not out:
        out.append({"role": "user", "content": "\n".join(texts)})
    return out


def _assistant_turn(content: Any, where: str) -> dict:
    """Assistant blocks -> one message: text joined, `tool_use` -> `tool_calls`,
    `thinking` -> `reasoning_content`."""
    if isinstance(content, str):
        return {"role": "assistant", "content": content}
    if not isinstance(content, list):
        raise _bad(f"{where} must be a string or a list of content blocks")
    texts, calls, thinking = [], [], []
    for j, block in enumerate(content):
        kind = block.get("type") if isinstance(block, Mapping) else None
        if kind == "tool_use":
            name, args = block.get("name"), block.get("input", {})
            if not isinstance(name, str) or not isinstance(args, Mapping):
                raise _bad(f"{where}[{j}] must be a tool_use block with a 'name' string "
                           "and an 'input' object")
            calls.append({"id": block.get("id"), "type": "function",
                          "function": {"name": name, "arguments": dict(args)}})
        elif kind == "thinking" and isinstance(block.get("thinking"), str):
            thinking.append(block["thinking"])
        elif kind != "redacted_thinking":
            texts.append(_block_text(block, f"{where}[{j}]"))
    message: dict = {"role": "assistant", "content": "\n".join(texts)}
    if calls:
        message["tool_calls"] = calls
    if thinking:
        message["reasoning_content"] = "\n".join(thinking)
    return message


def to_openai_messages(system: Any, messages: Any) -> list[dict]:
    """Anthropic `system` + `messages` -> OpenAI chat messages (pure; ApiError(400))."""
    if not isinstance(messages, list) or not messages:
        raise _bad("'messages' must be a non-empty list of {role, content} objects")
    out = [] if system is None else [{"role": "system", "content": _text_of(system, "system")}]
    for i, msg in enumerate(messages):
        where = f"messages[{i}].content"
        role = msg.get("role") if isinstance(msg, Mapping) else None
        if role == "user":
            out += _user_turn(msg.get("content"), where)
        elif role == "assistant":
            out.append(_assistant_turn(msg.get("content"), where))
        else:
            raise _bad(f"messages[{i}].role must be 'user' or 'assistant', got {role!r:.50}")
    if messages[-1].get("role") == "assistant":
        raise _bad("a final assistant message (prefill) is not supported by this proxy; "
                   "end the conversation with a user turn")
    return out


def _to_openai_tools(tools: Any) -> list[dict] | None:
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise _bad("'tools' must be a list of {name, description, input_schema} objects")
    out = []
    for j, tool in enumerate(tools):
        if not (isinstance(tool, Mapping) and isinstance(tool.get("name"), str)
                and isinstance(tool.get("input_schema"), Mapping)
                and tool.get("type") in (None, "custom")):
            raise _bad(f"tools[{j}] must be a custom tool with 'name' and 'input_schema' "
                       f"(server tools are not supported), got {tool!r:.200}")
        fn = {"name": tool["name"], "parameters": tool["input_schema"]}
        if isinstance(tool.get("description"), str):
            fn["description"] = tool["description"]
        out.append({"type": "function", "function": fn})
    return out


def _stop_sequences(value: Any) -> list[str]:
    if value is None:
        return []
    if (isinstance(value, list) and all(isinstance(s, str) for s in value)
            and len(value) <= _MAX_STOP_SEQUENCES):
        return value
    raise _bad(f"'stop_sequences' must be a list of at most {_MAX_STOP_SEQUENCES} strings")


def parse_messages_request(body: object, defaults: ChatDefaults) -> ChatRequest:
    """Validate an Anthropic Messages body into the chat core's request."""
    if not isinstance(body, dict):
        raise _bad("request body must be a JSON object")
    if body.get("max_tokens") is None:
        raise _bad("max_tokens: Field required")
    tool_choice = body.get("tool_choice")
    none = isinstance(tool_choice, Mapping) and tool_choice.get("type") == "none"
    if not isinstance(body.get("stream", False), bool):
        raise _bad("'stream' must be a boolean")
    req = parse_chat_request({
        "messages": to_openai_messages(body.get("system"), body.get("messages")),
        "tools": _to_openai_tools(body.get("tools")), "tool_choice": "none" if none else None,
        "max_tokens": body["max_tokens"], "temperature": body.get("temperature"),
        "top_p": body.get("top_p"), "top_k": body.get("top_k"),
        "stop": _stop_sequences(body.get("stop_sequences")), "stream": body.get("stream", False),
    }, defaults)
    req.max_tokens = None  # a cap: clamped to the context room (see the module docstring)
    return req


# ----------------------------------------------------------------------------- replies

def _stop_reason(finish_reason: str | None, matched_stop: int | str | None,
                 tool_calls: bool) -> tuple[str, str | None]:
    """(stop_reason, stop_sequence) of a finished generation."""
    if tool_calls:
        return "tool_use", None
    if finish_reason == "length":
        return "max_tokens", None
    if isinstance(matched_stop, str) and matched_stop:
        return "stop_sequence", matched_stop
    return "end_turn", None


def _tool_use(call: ToolCall) -> dict:
    return {"type": "tool_use", "id": call.id, "name": call.name, "input": {}}


class Messages:
    """The Anthropic Messages endpoint over the chat endpoint's core."""

    def __init__(self, chat: ChatCompletions) -> None:
        self.chat = chat

    async def handle(self, session: Session, body: object) -> ProxyResponse:
        req = parse_messages_request(body, self.chat.defaults)
        prompt = await self.chat.prepare(session, req)
        rid = "msg_" + secrets.token_hex(12)
        if req.stream:
            return await started_sse(self._stream(session, req, prompt, rid))
        (res,) = await self.chat.generate(session, req, prompt, rid)
        return json_response(self._message_body(req, prompt, rid, res))

    def _message_body(self, req: ChatRequest, prompt: Prompt, rid: str,
                      res: GenerateResult) -> dict:
        message, _ = self.chat.assistant_message(req, prompt, res)
        calls = message.get("tool_calls", [])
        content: list[dict] = []
        if message.get("reasoning_content"):
            content.append({"type": "thinking", "thinking": message["reasoning_content"],
                            "signature": ""})
        if message["content"] or not (calls or content):
            content.append({"type": "text", "text": message["content"] or ""})
        for call in calls:
            fn = call["function"]
            content.append({"type": "tool_use", "id": call["id"], "name": fn["name"],
                            "input": json.loads(fn["arguments"])})
        stop_reason, stop_sequence = _stop_reason(res.finish_reason, res.matched_stop, bool(calls))
        return {"id": rid, "type": "message", "role": "assistant", "model": self.chat.model_name,
                "content": content, "stop_reason": stop_reason, "stop_sequence": stop_sequence,
                "usage": {"input_tokens": len(prompt.input_ids),
                          "output_tokens": len(res.output_ids)}}

    async def _stream(self, session: Session, req: ChatRequest, prompt: Prompt,
                      rid: str) -> AsyncIterator[bytes]:
        state, blocks = ChoiceStream(self.chat, req, prompt), _BlockEvents()
        last, calls = None, []
        async with aclosing(self.chat.stream_chunks(session, req, prompt, rid)) as chunks:
            item = await anext(chunks, None)  # a rejection raises here: an error status
            yield _event("message_start", {"message": {
                "id": rid, "type": "message", "role": "assistant", "model": self.chat.model_name,
                "content": [], "stop_reason": None, "stop_sequence": None,
                "usage": {"input_tokens": len(prompt.input_ids), "output_tokens": 0}}})
            try:
                while item is not None:
                    deltas, calls = state.feed(item[1])
                    for event in blocks.deltas(deltas):
                        yield event
                    last, item = item[1], await anext(chunks, None)
            except ApiError as e:
                yield _event("error", anthropic_error_body(e))
                return
        for event in blocks.finish(calls):
            yield event
        stop_reason, stop_sequence = _stop_reason(last.finish_reason if last else None,
                                                  last.matched_stop if last else None, bool(calls))
        yield _event("message_delta", {"delta": {"stop_reason": stop_reason,
                                                 "stop_sequence": stop_sequence},
                                       "usage": {"output_tokens": state.num_output_tokens}})
        yield _event("message_stop", {})


class _BlockEvents:
    """Numbers the content blocks of a streamed message and opens/closes them around
    the deltas: thinking and text blocks as their text arrives, tool_use blocks at the end."""

    def __init__(self) -> None:
        self.index = -1  # of the latest block started
        self.open: str | None = None  # Delta.kind of the open block, if one is open

    def _start(self, block: dict) -> bytes:
        self.index += 1
        return _event("content_block_start", {"index": self.index, "content_block": block})

    def _delta(self, delta: dict) -> bytes:
        return _event("content_block_delta", {"index": self.index, "delta": delta})

    def _close(self) -> list[bytes]:
        if self.open is None:
            return []
        self.open = None
        return [_event("content_block_stop", {"index": self.index})]

    def deltas(self, deltas: list[Delta]) -> list[bytes]:
        out = []
        for d in deltas:
            if d.kind != self.open:
                out += self._close()
                out.append(self._start({"type": "text", "text": ""} if d.kind == "content"
                                       else {"type": "thinking", "thinking": "", "signature": ""}))
                self.open = d.kind
            out.append(self._delta({"type": "text_delta", "text": d.text} if d.kind == "content"
                                   else {"type": "thinking_delta", "thinking": d.text}))
        return out

    def finish(self, calls: list[ToolCall]) -> list[bytes]:
        """Close the open block, stream the tool calls; an empty message gets one empty
        text block (as the non-streaming reply does)."""
        out = self._close()
        if self.index < 0 and not calls:
            out += [self._start({"type": "text", "text": ""}),
                    _event("content_block_stop", {"index": self.index})]
        for call in calls:
            out += [self._start(_tool_use(call)),
                    self._delta({"type": "input_json_delta", "partial_json": call.arguments}),
                    _event("content_block_stop", {"index": self.index})]
        return out


def _event(kind: str, data: dict) -> bytes:
    return (b"event: " + kind.encode() + b"\ndata: "
            + msgspec.json.encode({"type": kind, **data}) + b"\n\n")
