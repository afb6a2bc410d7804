"""Proxy stage 3: decoded model output -> reasoning, content and tool calls (pure, no I/O).

One tool-call format per model family, chosen once from the chat template
(`TOOL_PARSERS[detect_tool_parser(template)]`). A format is described by the markup
that opens a tool-call *region* (and the markup that closes it, or none: the region
runs to the end of the output) plus a function that turns one region into tool calls.
Non-streaming `parse_output` and the incremental `StreamParser` (proxy/stream_parser.py) cut the text into
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

__all__ = ["Delta", "ParsedOutput", "TOOL_PARSERS", "ToolCall", "ToolFormat",
           "detect_tool_parser", "first_tag", "get_format", "new_call_id", "parse_output",
           "split_reasoning", "template_renders_tools", "think_opened_in_prompt"]

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
            i, tag = first_tag(text, self.open_tags, pos)
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


def first_tag(text: str, tags: tuple[str, ...], pos: int = 0) -> tuple[int, str | None]:
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


def template_renders_tools(chat_template: str | Mapping[str, str] | None) -> bool:
    """Whether a chat template reads the `tools` variable at all (SmolLM2's does not:
    such models get the Hermes fallback, see render.py `hermes_tool_fallback`)."""
    if isinstance(chat_template, Mapping):
        chat_template = "\n".join(str(t) for t in chat_template.values())
    return bool(chat_template) and "tools" in chat_template


def get_format(name: str) -> ToolFormat:
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
    out = get_format(tool_parser).parse(text)
    out.reasoning = thought
    return out
