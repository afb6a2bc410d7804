"""Proxy stage 3: decoded model output -> reasoning, content and tool calls (pure, no I/O).

One tool-call format per model family, chosen once from the chat template
(`TOOL_PARSERS[detect_tool_parser(template)]`). A format is described by the markup
that opens a tool-call *region* (and the markup that closes it, or none: the region
runs to the end of the output) plus a function that turns one region into tool calls.
Non-streaming `parse_output` and the incremental `StreamParser` cut the text into
regions by the same rules, so streamed deltas always add up to the non-streaming parse:

- reasoning: when the prompt opened `<think>` (`prompt_opened`), or the output starts
  with `<think>` (after whitespace), everything up to the first `</think>` is reasoning;
  a missing `</think>` makes the whole output reasoning (the model was cut off while
  thinking). `<think>` anywhere else, or a lone `</think>`, is ordinary content.
- a region that is malformed (bad JSON, no closing tag) stays in the content verbatim.
- content and reasoning are stripped of surrounding whitespace; empty -> None.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal, NamedTuple

import msgspec

__all__ = ["Delta", "ParsedOutput", "StreamParser", "TOOL_PARSERS", "ToolCall",
           "ToolFormat", "detect_tool_parser", "new_call_id", "parse_output",
           "split_reasoning", "think_opened_in_prompt"]

HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
MISTRAL_TAG = "[TOOL_CALLS]"
PYTHON_TAG = "<|python_tag|>"


class ToolCall(msgspec.Struct, kw_only=True, frozen=True):
    """One function call the model asked for."""

    id: str  # "call_<24 hex digits>", unique per call
    name: str  # function name
    arguments: str  # a JSON object, serialized (the OpenAI wire format)

    def to_openai(self) -> dict:
        """The `tool_calls[i]` object of an OpenAI chat completion message."""
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


class ParsedOutput(msgspec.Struct, kw_only=True):
    """A completion's text split the way the OpenAI API returns it."""

    content: str | None  # text outside reasoning and tool calls, stripped; None if empty
    tool_calls: list[ToolCall] = []
    reasoning: str | None = None  # text of the <think> section, stripped; None if empty


class Delta(NamedTuple):
    """A piece of streamed text."""

    kind: Literal["content", "reasoning"]
    text: str


def new_call_id() -> str:
    return f"call_{secrets.token_hex(12)}"


# ----------------------------------------------------------------------------- formats

def _call_from_obj(obj: Any) -> ToolCall | None:
    """{"name": ..., "arguments"|"parameters": {...}} -> ToolCall; None if malformed."""
    if not isinstance(obj, Mapping) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = obj.get("arguments", obj.get("parameters"))
    if args is None:
        arguments = "{}"
    elif isinstance(args, Mapping):
        arguments = json.dumps(args, ensure_ascii=False)
    elif isinstance(args, str):  # already serialized: keep it if it is a JSON object
        try:
            ok = isinstance(json.loads(args), dict)
        except ValueError:
            ok = False
        if not ok:
            return None
        arguments = args
    else:
        return None
    return ToolCall(id=new_call_id(), name=obj["name"], arguments=arguments)


def _calls_from_json(body: str) -> list[ToolCall] | None:
    """A JSON object or list of objects -> tool calls; None unless all are valid."""
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError):
        return None
    objs = obj if isinstance(obj, list) else [obj]
    calls = [_call_from_obj(o) for o in objs]
    if not calls or any(c is None for c in calls):
        return None
    return calls  # type: ignore[return-value]


def _hermes_region(region: str) -> list[ToolCall] | None:
    """`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` -> one call."""
    if not (region.startswith(HERMES_OPEN) and region.endswith(HERMES_CLOSE)):
        return None
    body = region[len(HERMES_OPEN):len(region) - len(HERMES_CLOSE)]
    calls = _calls_from_json(body)
    return calls if calls is not None and len(calls) == 1 else None


def _llama3_region(region: str) -> list[ToolCall] | None:
    """`[<|python_tag|>]{"name": ..., "parameters": {...}}`, several joined by ';' or
    in a JSON list."""
    body = region.removeprefix(PYTHON_TAG).strip()
    calls = _calls_from_json(body)
    if calls is None and ";" in body:
        parts = [_calls_from_json(p) for p in body.split(";") if p.strip()]
        if parts and all(p is not None for p in parts):
            calls = [c for p in parts for c in p]  # type: ignore[union-attr]
    return calls


def _mistral_region(region: str) -> list[ToolCall] | None:
    """`[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`, or the newer
    `[TOOL_CALLS]name[ARGS]{...}` repeated once per call."""
    chunks = region.split(MISTRAL_TAG)[1:]
    if len(chunks) == 1 and chunks[0].lstrip().startswith(("[", "{")):
        return _calls_from_json(chunks[0])
    calls = []
    for chunk in chunks:
        name, sep, args = chunk.partition("[ARGS]")
        name = name.split("[CALL_ID]")[0].strip()
        try:
            obj = json.loads(args) if sep else None
        except (ValueError, RecursionError):
            obj = None
        call = _call_from_obj({"name": name, "arguments": obj}) if obj is not None else None
        if call is None:
            return None
        calls.append(call)
    return calls or None


@dataclass(frozen=True)
class ToolFormat:
    """How one model family writes tool calls into its output."""

    name: str
    open_tags: tuple[str, ...]  # markup that starts a tool-call region
    close_tag: str | None  # markup that ends it; None = the region runs to the end
    json_start: bool  # content whose first non-space character is "{" is a region
    parse_region: Callable[[str], list[ToolCall] | None]  # region text -> calls | None

    def parse(self, text: str) -> ParsedOutput:
        """Split `text` (no reasoning in it) into content and tool calls."""
        stripped = text.lstrip()
        if self.json_start and stripped.startswith("{"):
            calls = self.parse_region(stripped)
            return ParsedOutput(content=None if calls else (text.strip() or None),
                                tool_calls=calls or [])
        content, calls, pos = [], [], 0
        while True:
            i, tag = _first_tag(text, self.open_tags, pos)
            if tag is None:
                content.append(text[pos:])
                break
            content.append(text[pos:i])
            end = self._region_end(text, i + len(tag))
            found = self.parse_region(text[i:end])
            if found is None:
                content.append(text[i:end])
            else:
                calls.extend(found)
            pos = end
        return ParsedOutput(content="".join(content).strip() or None, tool_calls=calls)

    def _region_end(self, text: str, start: int) -> int:
        """End of the region whose open tag ends at `start` (the text's end if unclosed)."""
        if self.close_tag is None:
            return len(text)
        j = text.find(self.close_tag, start)
        return len(text) if j < 0 else j + len(self.close_tag)


def _first_tag(text: str, tags: tuple[str, ...], pos: int = 0) -> tuple[int, str | None]:
    """Earliest full occurrence of any tag at or after `pos`."""
    best_i, best_tag = len(text), None
    for tag in tags:
        i = text.find(tag, pos)
        if 0 <= i < best_i:
            best_i, best_tag = i, tag
    return best_i, best_tag


def _plain(region: str) -> list[ToolCall] | None:  # "none": no tool-call markup at all
    return None


HERMES = ToolFormat("hermes", (HERMES_OPEN,), HERMES_CLOSE, False, _hermes_region)
TOOL_PARSERS: dict[str, ToolFormat] = {
    "hermes": HERMES,
    "qwen": replace(HERMES, name="qwen"),  # Qwen2.5/Qwen3 write the Hermes format
    "llama3": ToolFormat("llama3", (PYTHON_TAG,), None, True, _llama3_region),
    "mistral": ToolFormat("mistral", (MISTRAL_TAG,), None, False, _mistral_region),
    "none": ToolFormat("none", (), None, False, _plain),
}


def detect_tool_parser(chat_template: str | Mapping[str, str] | None) -> str:
    """The TOOL_PARSERS key for a model, guessed from its chat template's markup."""
    if isinstance(chat_template, Mapping):  # several named templates
        chat_template = "\n".join(str(t) for t in chat_template.values())
    if not chat_template:
        return "none"
    if HERMES_OPEN in chat_template:
        return "hermes"
    if MISTRAL_TAG in chat_template:
        return "mistral"
    if PYTHON_TAG in chat_template or "ipython" in chat_template:
        return "llama3"
    return "none"


def _get_format(name: str) -> ToolFormat:
    if name not in TOOL_PARSERS:
        raise ValueError(f"unknown tool parser {name!r}; use one of {sorted(TOOL_PARSERS)}")
    return TOOL_PARSERS[name]


# ----------------------------------------------------------------------------- reasoning

def think_opened_in_prompt(prompt_text: str, think_open: str = "<think>") -> bool:
    """True when the rendered prompt ends inside an opened think block (e.g. templates
    that append "<think>\\n" after the assistant header); pass it as `prompt_opened`."""
    return prompt_text.rstrip().endswith(think_open)


def split_reasoning(text: str, *, think_open: str = "<think>", think_close: str = "</think>",
                    prompt_opened: bool = False) -> tuple[str | None, str]:
    """(reasoning, content) of an output; both stripped, reasoning None when empty.

    The reasoning section starts at the output's beginning when the prompt opened it,
    or at a leading `think_open`; it ends at the first `think_close`, or at the end of
    the output when there is none (all reasoning, content "").
    """
    if not prompt_opened:
        stripped = text.lstrip()
        if not stripped.startswith(think_open):
            return None, text.strip()
        text = stripped[len(think_open):]
    reasoning, sep, content = text.partition(think_close)
    return reasoning.strip() or None, content.strip()


def parse_output(text: str, *, tool_parser: str = "none", reasoning: bool = False,
                 prompt_opened: bool = False, think_open: str = "<think>",
                 think_close: str = "</think>") -> ParsedOutput:
    """Reasoning (when `reasoning`), content and tool calls of a finished output."""
    thought = None
    if reasoning:
        thought, text = split_reasoning(text, think_open=think_open, think_close=think_close,
                                        prompt_opened=prompt_opened)
    out = _get_format(tool_parser).parse(text)
    out.reasoning = thought
    return out


# ----------------------------------------------------------------------------- streaming

class _Channel:
    """Strips a stream's leading whitespace and holds trailing whitespace back, so the
    emitted pieces join to `whole.strip()`."""

    def __init__(self) -> None:
        self.started = False
        self.pending_ws = ""

    def push(self, text: str) -> str:
        if not self.started:
            text = text.lstrip()
            if not text:
                return ""
            self.started = True
        text = self.pending_ws + text
        out = text.rstrip()
        self.pending_ws = text[len(out):]
        return out


def _hold_from(buf: str, tags: tuple[str, ...]) -> int:
    """Start of the longest buffer suffix that may be the beginning of a tag."""
    hold = len(buf)
    for tag in tags:
        for k in range(min(len(tag) - 1, len(buf)), 0, -1):
            if buf.endswith(tag[:k]):
                hold = min(hold, len(buf) - k)
                break
    return hold


class StreamParser:
    """Incremental `parse_output`: feed text deltas, get content/reasoning deltas.

    Text is emitted as soon as it cannot be part of markup: only a possible partial tag
    at the end of the buffer, trailing whitespace and open tool-call regions are held.
    Tool calls are returned by `finish()`. For any split of an output, the concatenated
    deltas and the tool calls equal `parse_output` of the whole text.
    """

    def __init__(self, tool_parser_name: str = "none", reasoning: bool = False,
                 prompt_opened: bool = False, *, think_open: str = "<think>",
                 think_close: str = "</think>") -> None:
        self._fmt = _get_format(tool_parser_name)
        self._open, self._close = think_open, think_close
        # "think?": deciding whether the output opens with <think>
        self._mode = ("reasoning" if prompt_opened else "think?") if reasoning else "content"
        self._buf = ""
        self._region_start = 0  # in "region" mode: where to look for the close tag
        self._channels = {"content": _Channel(), "reasoning": _Channel()}
        self._out: list[Delta] = []
        self._calls: list[ToolCall] = []
        self._finished = False

    def feed(self, delta_text: str) -> list[Delta]:
        """Add decoded text; returns the deltas it makes final."""
        if self._finished:
            raise RuntimeError("StreamParser.feed() after finish(); make a new parser")
        self._buf += delta_text
        self._drain(final=False)
        return self._take()

    def finish(self) -> tuple[list[Delta], list[ToolCall]]:
        """End of output: flush held text; returns the last deltas and all tool calls."""
        if not self._finished:
            self._finished = True
            self._drain(final=True)
        return self._take(), list(self._calls)

    def _emit(self, kind: Literal["content", "reasoning"], text: str) -> None:
        text = self._channels[kind].push(text)
        if not text:
            return
        if self._out and self._out[-1].kind == kind:
            self._out[-1] = Delta(kind, self._out[-1].text + text)
        else:
            self._out.append(Delta(kind, text))

    def _take(self) -> list[Delta]:
        out, self._out = self._out, []
        return out

    def _drain(self, final: bool) -> None:
        step = {"think?": self._step_think, "reasoning": self._step_reasoning,
                "content": self._step_content, "region": self._step_region}
        while step[self._mode](final):
            pass

    def _step_think(self, final: bool) -> bool:
        s = self._buf.lstrip()
        if s.startswith(self._open):
            self._buf, self._mode = s[len(self._open):], "reasoning"
            return True
        if not final and self._open.startswith(s):  # undecided yet (s may be "")
            return False
        self._mode = "content"
        return True

    def _step_reasoning(self, final: bool) -> bool:
        i = self._buf.find(self._close)
        if i >= 0:
            self._emit("reasoning", self._buf[:i])
            self._buf, self._mode = self._buf[i + len(self._close):], "content"
            return True
        hold = len(self._buf) if final else _hold_from(self._buf, (self._close,))
        self._emit("reasoning", self._buf[:hold])
        self._buf = self._buf[hold:]
        return False

    def _step_content(self, final: bool) -> bool:
        fmt = self._fmt
        if fmt.json_start and not self._channels["content"].started:
            s = self._buf.lstrip()
            if s.startswith("{"):
                self._buf, self._mode, self._region_start = s, "region", 1
                return True
        i, tag = _first_tag(self._buf, fmt.open_tags)
        if tag is not None:
            self._emit("content", self._buf[:i])
            self._buf, self._mode = self._buf[i:], "region"
            self._region_start = len(tag)
            return True
        hold = len(self._buf) if final else _hold_from(self._buf, fmt.open_tags)
        self._emit("content", self._buf[:hold])
        self._buf = self._buf[hold:]
        return False

    def _step_region(self, final: bool) -> bool:
        close = self._fmt.close_tag
        end = -1
        if close is not None:
            j = self._buf.find(close, self._region_start)
            end = j + len(close) if j >= 0 else -1
        if end < 0 and not final:
            if close is not None:  # next time, search only where a new close tag can be
                self._region_start = max(self._region_start, len(self._buf) - len(close) + 1)
            return False
        end = len(self._buf) if end < 0 else end
        region, self._buf, self._mode = self._buf[:end], self._buf[end:], "content"
        calls = self._fmt.parse_region(region)
        if calls is None:
            self._emit("content", region)
        else:
            self._calls.extend(calls)
        return True
