"""Proxy stage 1 (OpenAI Responses): POST /v1/responses -> the chat core -> a Response.

A Responses request is translated into the OpenAI chat messages and tools the renderer
takes (`instructions` -> a system message, `function_call` items -> an assistant
message's `tool_calls`, `function_call_output` items -> `tool` messages, `reasoning`
items -> `reasoning_content`) and served by the chat endpoint's core (chat.py), as the
Anthropic front-end (messages.py) is. Consecutive assistant-side items (reasoning, an
assistant message, function calls) form one assistant turn, the order in which a reply
lists them, so output items sent back as input re-render to the exact tokens sampled
before. The response id (`resp_...`) is the completion's id in the session's tree:
rewards keyed by it work like chat completion ids.

The proxy keeps no responses: `previous_response_id` and `conversation` are rejected,
the agent sends the full history each turn (the Agents SDK does by default). `store`,
`reasoning`, `include`, `text`, `truncation` and `parallel_tool_calls` are ignored.
Errors are OpenAI-shaped, like chat completions.
"""

from __future__ import annotations

import secrets
import time
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

__all__ = ["Responses", "parse_responses_request", "to_chat_messages"]

_TEXT_PARTS = frozenset({"input_text", "output_text", "text"})
_INPUT_ROLES = frozenset({"user", "system", "developer"})


def _bad(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param)


def _new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(12)


# ----------------------------------------------------------------------------- requests

def _content_text(content: Any, where: str) -> str:
    """A string, or a list of text parts (joined with "\\n" like chat parts) -> text."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _bad(f"{where} must be a string or a list of content parts", "input")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, Mapping) else None
        if not isinstance(kind, str) or kind not in _TEXT_PARTS or not isinstance(part.get("text"), str):
            raise _bad(f"{where}[{j}] must be an input_text or output_text part "
                       f"(this proxy serves text-only models), got {part!r:.200}", "input")
        texts.append(part["text"])
    return "\n".join(texts)


def _reasoning_text(item: Mapping, where: str) -> str:
    parts = item.get("content") or []
    if not isinstance(parts, list) or not all(
            isinstance(p, Mapping) and isinstance(p.get("text"), str) for p in parts):
        raise _bad(f"{where}.content must be a list of reasoning_text parts", "input")
    return "\n".join(p["text"] for p in parts)


def _function_call(item: Mapping, where: str) -> dict:
    name, args, call_id = item.get("name"), item.get("arguments"), item.get("call_id")
    if not (isinstance(name, str) and isinstance(args, str) and isinstance(call_id, str)):
        raise _bad(f"{where} must be a function_call with 'call_id', 'name' and 'arguments' "
                   "strings", "input")
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}


def to_chat_messages(instructions: Any, items: Any) -> list[dict]:
    """Responses `instructions` + `input` -> OpenAI chat messages (pure; ApiError(400))."""
    out: list[dict] = []
    if instructions is not None:
        if not isinstance(instructions, str):
            raise _bad("'instructions' must be a string", "instructions")
        out.append({"role": "system", "content": instructions})
    if isinstance(items, str):
        items = [{"role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        raise _bad("'input' must be a string or a non-empty list of input items", "input")
    turn: dict | None = None  # the assistant message consecutive items are building
    for i, item in enumerate(items):
        where = f"input[{i}]"
        if not isinstance(item, Mapping):
            raise _bad(f"{where} must be an object", "input")
        kind = item.get("type", "message")
        if kind == "message" and item.get("role") == "assistant":
            text = _content_text(item.get("content"), f"{where}.content")
            if turn is None or turn["content"] or "tool_calls" in turn:
                turn = {"role": "assistant", "content": ""}
                out.append(turn)
            turn["content"] = text
        elif kind == "reasoning":
            turn = {"role": "assistant", "content": "",
                    "reasoning_content": _reasoning_text(item, where)}
            out.append(turn)
        elif kind == "function_call":
            if turn is None:
                turn = {"role": "assistant", "content": ""}
                out.append(turn)
            turn.setdefault("tool_calls", []).append(_function_call(item, where))
        elif kind == "function_call_output":
            if not isinstance(item.get("call_id"), str):
                raise _bad(f"{where}.call_id must be a string", "input")
            out.append({"role": "tool", "tool_call_id": item["call_id"],
                        "content": _content_text(item.get("output"), f"{where}.output")})
            turn = None
        elif kind == "message" and isinstance(item.get("role"), str) and item["role"] in _INPUT_ROLES:
            out.append({"role": item["role"],
                        "content": _content_text(item.get("content"), f"{where}.content")})
            turn = None
        elif kind == "message":
            raise _bad(f"{where}.role must be one of 'user', 'system', 'developer', "
                       f"'assistant', got {item.get('role')!r:.50}", "input")
        else:
            raise _bad(f"{where}: input items of type {kind!r:.50} are not supported; use "
                       "message, function_call, function_call_output or reasoning", "input")
    if turn is not None:
        raise _bad("the input ends with assistant output; end it with a user message or "
                   "a function_call_output (prefill is not supported by this proxy)", "input")
    return out


def _to_chat_tools(tools: Any) -> list[dict] | None:
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise _bad("'tools' must be a list of function tools", "tools")
    out = []
    for j, tool in enumerate(tools):
        if not (isinstance(tool, Mapping) and tool.get("type") == "function"
                and isinstance(tool.get("name"), str)):
            kind = tool.get("type") if isinstance(tool, Mapping) else None
            raise _bad(f"tools[{j}]: only function tools ({{\"type\": \"function\", \"name\", "
                       f"\"parameters\"}}) are supported, got type {kind!r:.50}", "tools")
        fn = {"name": tool["name"], "parameters": tool.get("parameters") or {
            "type": "object", "properties": {}}}
        if isinstance(tool.get("description"), str):
            fn["description"] = tool["description"]
        out.append({"type": "function", "function": fn})
    return out


def parse_responses_request(body: object, defaults: ChatDefaults) -> tuple[ChatRequest, dict]:
    """Validate a Responses body into the chat core's request, plus the request fields
    a Response echoes (instructions, tools, tool_choice)."""
    if not isinstance(body, dict):
        raise _bad("request body must be a JSON object")
    for key in ("previous_response_id", "conversation"):
        if body.get(key) is not None:
            raise _bad(f"'{key}' is not supported: this proxy keeps no responses; send the "
                       "full conversation in 'input' on every request", key)
    if not isinstance(body.get("stream", False), bool):
        raise _bad("'stream' must be a boolean", "stream")
    max_out = body.get("max_output_tokens")
    if max_out is not None and (isinstance(max_out, bool) or not isinstance(max_out, int)
                                or not 1 <= max_out <= 1 << 30):
        raise _bad(f"'max_output_tokens' must be an integer in [1, 2^30], got {max_out!r:.50}",
                   "max_output_tokens")
    tool_choice = body.get("tool_choice") or "auto"
    req = parse_chat_request({
        "messages": to_chat_messages(body.get("instructions"), body.get("input")),
        "tools": _to_chat_tools(body.get("tools")),
        "tool_choice": "none" if tool_choice == "none" else None, "max_tokens": max_out,
        "temperature": body.get("temperature"), "top_p": body.get("top_p"),
        "stream": body.get("stream", False),
    }, defaults)
    echo = {"instructions": body.get("instructions"), "tools": body.get("tools") or [],
            "tool_choice": tool_choice, "max_output_tokens": max_out}
    return req, echo


# ----------------------------------------------------------------------------- replies

def _message_item(text: str, status: str, item_id: str | None = None) -> dict:
    return {"type": "message", "id": item_id or _new_id("msg_"), "role": "assistant",
            "status": status, "content": [_text_part(text)]}


def _text_part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": []}


def _reasoning_item(text: str, item_id: str | None = None) -> dict:
    return {"type": "reasoning", "id": item_id or _new_id("rs_"), "summary": [],
            "content": [{"type": "reasoning_text", "text": text}]}


def _call_item(call: ToolCall) -> dict:
    return {"type": "function_call", "id": _new_id("fc_"), "call_id": call.id,
            "name": call.name, "arguments": call.arguments, "status": "completed"}


def _usage(num_input: int, num_output: int) -> dict:
    return {"input_tokens": num_input, "output_tokens": num_output,
            "total_tokens": num_input + num_output,
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens_details": {"reasoning_tokens": 0}}


class Responses:
    """The OpenAI Responses endpoint over the chat endpoint's core."""

    def __init__(self, chat: ChatCompletions) -> None:
        self.chat = chat

    async def handle(self, session: Session, body: object) -> ProxyResponse:
        req, echo = parse_responses_request(body, self.chat.defaults)
        prompt = await self.chat.prepare(session, req)
        rid = _new_id("resp_")
        if req.stream:
            return await started_sse(self._stream(session, req, echo, prompt, rid))
        (res,) = await self.chat.generate(session, req, prompt, rid)
        message, _ = self.chat.assistant_message(req, prompt, res)
        status = "incomplete" if res.finish_reason == "length" else "completed"
        output = []
        if message.get("reasoning_content"):
            output.append(_reasoning_item(message["reasoning_content"]))
        calls = [ToolCall(id=c["id"], name=c["function"]["name"],
                          arguments=c["function"]["arguments"])
                 for c in message.get("tool_calls", [])]
        if message["content"] or not calls:
            output.append(_message_item(message["content"] or "", status))
        output += [_call_item(call) for call in calls]
        usage = _usage(len(prompt.input_ids), len(res.output_ids))
        return json_response(self._response(req, echo, rid, status, output, usage))

    def _response(self, req: ChatRequest, echo: dict, rid: str, status: str,
                  output: list[dict], usage: dict | None) -> dict:
        incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
        return {"id": rid, "object": "response", "created_at": int(time.time()),
                "status": status, "error": None, "incomplete_details": incomplete,
                "model": self.chat.model_name, "output": output, "parallel_tool_calls": True,
                "temperature": req.sampling.temperature, "top_p": req.sampling.top_p,
                "metadata": {}, "text": {"format": {"type": "text"}}, "truncation": "disabled",
                "usage": usage, **echo}

    async def _stream(self, session: Session, req: ChatRequest, echo: dict, prompt: Prompt,
                      rid: str) -> AsyncIterator[bytes]:
        state, items = ChoiceStream(self.chat, req, prompt), _ItemEvents()
        last, calls = None, []
        async with aclosing(self.chat.stream_chunks(session, req, prompt, rid)) as chunks:
            item = await anext(chunks, None)  # a rejection raises here: an error status
            yield items.event("response.created",
                              response=self._response(req, echo, rid, "in_progress", [], None))
            yield items.event("response.in_progress",
                              response=self._response(req, echo, rid, "in_progress", [], None))
            try:
                while item is not None:
                    deltas, calls = state.feed(item[1])
                    for event in items.deltas(deltas):
                        yield event
                    last, item = item[1], await anext(chunks, None)
            except ApiError as e:
                yield items.event("error", code=e.code or e.type, message=e.message, param=e.param)
                return
        status = "incomplete" if last is not None and last.finish_reason == "length" else "completed"
        for event in items.finish(calls, status):
            yield event
        usage = _usage(len(prompt.input_ids), state.num_output_tokens)
        yield items.event(f"response.{status}",
                          response=self._response(req, echo, rid, status, items.output, usage))


class _ItemEvents:
    """Numbers the events and output items of a streamed response and opens/closes the
    items around the deltas: reasoning and message items as their text arrives, function
    calls at the end. `output` holds each item as last sent."""

    def __init__(self) -> None:
        self.sequence_number = -1
        self.output: list[dict] = []
        self.open: str | None = None  # Delta.kind of the open item, if one is open
        self.text = ""  # of the open item so far

    def event(self, kind: str, **data: Any) -> bytes:
        self.sequence_number += 1
        payload = {"type": kind, "sequence_number": self.sequence_number, **data}
        return b"event: " + kind.encode() + b"\ndata: " + msgspec.json.encode(payload) + b"\n\n"

    def _where(self, content_index: int | None = 0) -> dict:
        where = {"item_id": self.output[-1]["id"], "output_index": len(self.output) - 1}
        return where if content_index is None else {**where, "content_index": content_index}

    def _add(self, item: dict) -> bytes:
        self.output.append(item)
        return self.event("response.output_item.added", output_index=len(self.output) - 1,
                          item=item)

    def _item_done(self, item: dict) -> bytes:
        self.output[-1] = item
        return self.event("response.output_item.done", output_index=len(self.output) - 1,
                          item=item)

    def _start(self, kind: str) -> list[bytes]:
        self.open, self.text = kind, ""
        if kind == "content":
            item = {**_message_item("", "in_progress"), "content": []}
            part = _text_part("")
        else:
            item = {**_reasoning_item(""), "content": []}
            part = {"type": "reasoning_text", "text": ""}
        return [self._add(item), self.event("response.content_part.added", **self._where(),
                                            part=part)]

    def _close(self, status: str) -> list[bytes]:
        if self.open is None:
            return []
        item_id, text = self.output[-1]["id"], self.text
        if self.open == "content":
            part, item = _text_part(text), _message_item(text, status, item_id)
            done = self.event("response.output_text.done", **self._where(), text=text,
                              logprobs=[])
        else:
            part = {"type": "reasoning_text", "text": text}
            item = _reasoning_item(text, item_id)
            done = self.event("response.reasoning_text.done", **self._where(), text=text)
        self.open = None
        return [done, self.event("response.content_part.done", **self._where(), part=part),
                self._item_done(item)]

    def deltas(self, deltas: list[Delta]) -> list[bytes]:
        out = []
        for d in deltas:
            if d.kind != self.open:
                out += self._close("completed")
                out += self._start(d.kind)
            self.text += d.text
            if d.kind == "content":
                out.append(self.event("response.output_text.delta", **self._where(),
                                      delta=d.text, logprobs=[]))
            else:
                out.append(self.event("response.reasoning_text.delta", **self._where(),
                                      delta=d.text))
        return out

    def finish(self, calls: list[ToolCall], status: str) -> list[bytes]:
        """Close the open item, stream the function calls; a reply with neither text nor
        calls gets one empty message (as the non-streaming reply does)."""
        out = self._close(status)
        if not calls and not any(item["type"] == "message" for item in self.output):
            out += self._start("content") + self._close(status)
        for call in calls:
            item = _call_item(call)
            out.append(self._add({**item, "arguments": "", "status": "in_progress"}))
            out.append(self.event("response.function_call_arguments.delta",
                                  **self._where(None), delta=call.arguments))
            out.append(self.event("response.function_call_arguments.done",
                                  **self._where(None), arguments=call.arguments))
            out.append(self._item_done(item))
        return out
