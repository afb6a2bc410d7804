"""Proxy stage 1: OpenAI messages -> chat-template text -> prompt token ids, reusing the
session's earlier completions token for token (DESIGN decision 2, prefix-stable rendering).

A request that extends an earlier completion of the same session (that completion's
prompt + its sampled reply, as the template renders them) gets the earlier completion's
exact `prompt_ids + output_ids`, followed by the tokenization of only the new text. So
the tokens we train on are the tokens that were sampled, the conversation forms a tree,
and the inference server's prefix cache hits. When no earlier completion matches (the
agent edited the history, the template strips `<think>`, tool calls were re-serialized),
the whole conversation is tokenized afresh and the request starts a new root; if it
contained an assistant turn, that is a *prefix break* the proxy counts.

Matching is done on text, not tokens: each completion keeps `text = decode(prompt_ids +
output_ids)`, and a completion matches when its text is a proper prefix of the new
render. Re-tokenizing the history would drift on real BPE tokenizers (the sampled
tokens are rarely the canonical tokenization of their text).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

import jinja2
import msgspec

from areal_lite.types import CompletionNode

__all__ = ["ChatRenderer", "ChatTokenizer", "DirectTokenizer", "Prompt",
           "hermes_tool_fallback", "normalize_messages"]

# OpenAI roles -> the roles chat templates know.
_ROLES = {"system": "system", "developer": "system", "user": "user",
          "assistant": "assistant", "tool": "tool"}
_TEXT_PARTS = frozenset({"text", "input_text", "output_text"})
_IMAGE_PARTS = frozenset({"image_url", "input_image", "image"})


class ChatTokenizer(Protocol):
    """The part of a Hugging Face tokenizer the renderer uses."""

    eos_token_id: int | None

    def apply_chat_template(self, conversation: list[dict], **kwargs: Any) -> Any: ...

    def encode(self, text: str, **kwargs: Any) -> list[int]: ...

    def decode(self, token_ids: list[int], **kwargs: Any) -> str: ...


class Prompt(msgspec.Struct, kw_only=True):
    """A rendered, tokenized request, ready for the engine."""

    input_ids: list[int]  # full prompt tokens (parent's prompt+output tokens first, if any)
    text: str  # the chat template's rendering of the request
    parent_id: str | None  # the completion whose tokens input_ids starts with; None = root
    prefix_break: bool  # True: continues a conversation no earlier completion matched


# ----------------------------------------------------------------------------- messages

def _content_text(content: Any, where: str) -> str:
    """OpenAI message content (str | None | list of parts) -> plain text."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ValueError(f"{where}.content must be a string, null or a list of parts, "
                         f"got {type(content).__name__}")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, Mapping) else None
        kind = kind if isinstance(kind, str) else None  # a list here is malformed, not a crash
        if kind in _IMAGE_PARTS:
            raise ValueError(f"{where}.content[{j}]: image content is not supported "
                             "(this proxy serves text-only models)")
        if kind not in _TEXT_PARTS or not isinstance(part.get("text"), str):
            raise ValueError(f"{where}.content[{j}] must be {{\"type\": \"text\", "
                             f"\"text\": <string>}}, got {part!r:.200}")
        texts.append(part["text"])
    # Same joining rule as vLLM, so agents see the same behaviour on both servers.
    return "\n".join(texts)


def _tool_call(call: Any, where: str) -> dict:
    """Validate one assistant tool call; arguments become a dict when they are JSON."""
    fn = call.get("function") if isinstance(call, Mapping) else None
    if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
        raise ValueError(f"{where} must look like {{\"type\": \"function\", \"function\": "
                         f"{{\"name\": ..., \"arguments\": \"{{...}}\"}}}}, got {call!r:.200}")
    args = fn.get("arguments", "{}")
    if isinstance(args, str):
        # Qwen-style templates `tojson` the arguments, which would quote a string.
        try:
            decoded = json.loads(args) if args.strip() else {}
        except ValueError:
            decoded = None
        if isinstance(decoded, dict):
            args = decoded
    elif not isinstance(args, Mapping):
        raise ValueError(f"{where}.function.arguments must be a JSON string or an object, "
                         f"got {type(args).__name__}")
    out = {"type": call.get("type", "function"),
           "function": {"name": fn["name"], "arguments": args}}
    if call.get("id") is not None:
        out["id"] = call["id"]
    return out


def _normalize_message(msg: Any, i: int, max_chars: int) -> dict:
    where = f"messages[{i}]"
    if not isinstance(msg, Mapping):
        raise ValueError(f"{where} must be an object with 'role' and 'content', "
                         f"got {type(msg).__name__}")
    if "role" not in msg:
        raise ValueError(f"{where} has no 'role' (one of {sorted(_ROLES)})")
    role = _ROLES.get(msg["role"]) if isinstance(msg["role"], str) else None
    if role is None:
        raise ValueError(f"{where}.role {msg['role']!r} is not supported; "
                         f"use one of {sorted(_ROLES)}")
    out: dict[str, Any] = {"role": role, "content": _content_text(msg.get("content"), where)}
    if len(out["content"]) > max_chars:
        raise ValueError(f"{where}.content has {len(out['content'])} characters; the limit is "
                         f"{max_chars} (rollout.proxy.max_message_chars)")
    if role == "assistant":
        calls = msg.get("tool_calls")
        if calls:
            if not isinstance(calls, list):
                raise ValueError(f"{where}.tool_calls must be a list")
            out["tool_calls"] = [_tool_call(c, f"{where}.tool_calls[{j}]")
                                 for j, c in enumerate(calls)]
        if isinstance(msg.get("reasoning_content"), str):
            out["reasoning_content"] = msg["reasoning_content"]
    if role == "tool" and msg.get("tool_call_id") is not None:
        out["tool_call_id"] = msg["tool_call_id"]
    if isinstance(msg.get("name"), str):
        out["name"] = msg["name"]
    return out


def normalize_messages(messages: Any, max_message_chars: int = 1 << 62) -> list[dict]:
    """OpenAI-shaped chat messages -> the plain dicts chat templates expect.

    Content parts are joined into one string ("\\n" between text parts), `developer`
    becomes `system`, None content becomes "", assistant tool-call arguments that are a
    JSON object string become a dict. Raises ValueError naming the offending message
    (also when its text is longer than `max_message_chars`).
    """
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {role, content} objects")
    return [_normalize_message(m, i, max_message_chars) for i, m in enumerate(messages)]


# ----------------------------------------------------------------------------- tools

_HERMES_SYSTEM = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within \
<tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""


def hermes_tool_fallback(messages: list[dict], tools: list[dict]) -> list[dict]:
    """Normalized messages for a template without tool markup: the tool schemas go into
    the system message in the Hermes format (the parser reads `<tool_call>` back),
    assistant tool calls become `<tool_call>` text, tool results user turns wrapped in
    `<tool_response>` (Qwen2.5's convention). Pure."""
    schemas = "\n".join(json.dumps(t.get("function", t), ensure_ascii=False) for t in tools)
    system = _HERMES_SYSTEM.format(tools=schemas)
    out = [dict(m) for m in messages]
    if out and out[0]["role"] == "system":
        out[0]["content"] = f"{out[0]['content']}\n\n{system}" if out[0]["content"] else system
    else:
        out.insert(0, {"role": "system", "content": system})
    for m in out:
        if m["role"] == "assistant" and m.get("tool_calls"):
            calls = [json.dumps({"name": c["function"]["name"],
                                 "arguments": c["function"]["arguments"]}, ensure_ascii=False)
                     for c in m.pop("tool_calls")]
            text = "\n".join(f"<tool_call>\n{c}\n</tool_call>" for c in calls)
            m["content"] = f"{m['content']}\n{text}" if m["content"] else text
        elif m["role"] == "tool":
            m.pop("tool_call_id", None)
            m.update(role="user", content=f"<tool_response>\n{m['content']}\n</tool_response>")
    return out


# ----------------------------------------------------------------------------- fast paths

# A conversation that exercises every template branch a plain chat takes, and a text with
# the cases tokenizers split differently (spaces, tabs, unicode, digits, a special token).
_PROBE_CHAT = [{"role": "user", "content": "What is  2 + 3?"},
               {"role": "assistant", "content": "It is 5.\n"},
               {"role": "user", "content": "And\tthen  üñï 你好?"}]
_PROBE_TOOLS = [{"type": "function", "function": {
    "name": "add", "description": "Add two numbers.",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}}}}]
_CACHED_CHARS = 4096  # texts up to this long are kept (LRU) with their token ids
_PROBE_TEXT = "Hello, world!  two  spaces\n\ttab  üñïcödé 你好 12345 "


class DirectTokenizer:
    """What the renderer asks of a tokenizer, without the per-call overhead of
    Hugging Face's wrappers, where that is provably the same.

    - **render**: the chat template compiled once and rendered straight, with the
      tokenizer's special tokens; `apply_chat_template(tokenize=False)` also re-copies
      every message, argument and template variable on each call (4x the CPU of the
      render itself). Our messages are already plain JSON data (`normalize_messages`),
      which is what those copies produce, and reasoning fields get the same aliases.
    - **encode / decode**: the Rust tokenizer called directly (`backend_tokenizer`),
      skipping the Python batching layer around it; encodings of texts up to
      `_CACHED_CHARS` are kept in an LRU (tokenizing is a pure function of the text).

    Each fast path is checked against the wrapper at construction on a probe
    conversation and text; one that differs (or a tokenizer without these parts) keeps
    the wrapper. Thread-safe (the LRU is `functools.lru_cache`).
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        # has tools -> the compiled template, once it rendered the probes as the wrapper does
        self._templates: dict[bool, Any] = {}
        self._backend = None
        # the same texts come back all the time: a group's shared prompt, an agent's fixed
        # feedback turn ("<|im_end|>...user\nTry again...assistant\n" after each reply)
        self._encode_cached = functools.lru_cache(maxsize=4096)(
            lambda text: tuple(self._encode(text)))
        self._verify_templates()
        self.fast_codec = self._verify_codec()

    @property
    def fast_render(self) -> bool:
        return False in self._templates

    def render(self, msgs: list[dict], tools: list[dict] | None, add_generation_prompt: bool,
               kwargs: Mapping[str, Any]) -> str:
        template = self._templates.get(tools is not None)
        if template is None:
            return self.tokenizer.apply_chat_template(
                msgs, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt,
                **kwargs)
        return template.render(messages=self._alias(msgs), tools=tools, documents=None,
                               add_generation_prompt=add_generation_prompt,
                               **{**self._special, **kwargs})

    def _verify_templates(self) -> None:
        try:
            from transformers.utils.chat_template_utils import (
                _alias_reasoning_fields,
                _compile_jinja_template,
            )

            self._alias = _alias_reasoning_fields
            self._special = dict(self.tokenizer.special_tokens_map)
        except Exception:  # not a Hugging Face tokenizer (or another transformers)
            return
        for tools in (None, _PROBE_TOOLS):
            try:
                template = _compile_jinja_template(self.tokenizer.get_chat_template(None, tools))
                for gen in (True, False):
                    want = self.tokenizer.apply_chat_template(
                        _PROBE_CHAT, tools=tools, tokenize=False, add_generation_prompt=gen)
                    got = template.render(messages=self._alias(_PROBE_CHAT), tools=tools,
                                          documents=None, add_generation_prompt=gen,
                                          **self._special)
                    if got != want:
                        raise ValueError("the direct render differs")
                self._templates[tools is not None] = template
            except Exception:  # any doubt: the wrapper it is
                pass

    def encode(self, text: str) -> list[int]:
        if len(text) <= _CACHED_CHARS:
            return list(self._encode_cached(text))
        return self._encode(text)

    def _encode(self, text: str) -> list[int]:
        if self._backend is None:
            return list(self.tokenizer.encode(text, add_special_tokens=False))
        if len(text) > _CACHED_CHARS:  # `encode_batch` lets go of the GIL, `encode` does
            # not: a big prompt tokenized in the render thread must not stall the loop
            return self._backend.encode_batch([text], add_special_tokens=False)[0].ids
        return self._backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        if self._backend is None:
            return self.tokenizer.decode(ids, skip_special_tokens=False,
                                         clean_up_tokenization_spaces=False)
        return self._backend.decode(ids, skip_special_tokens=False)

    def _verify_codec(self) -> bool:
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None or getattr(backend, "truncation", None) or getattr(
                backend, "padding", None):
            return False  # the wrapper turns the backend's truncation/padding off per call
        try:
            eos = getattr(self.tokenizer, "eos_token", None)
            text = _PROBE_TEXT + (eos if isinstance(eos, str) else "") + " tail"
            want = list(self.tokenizer.encode(text, add_special_tokens=False))
            self._backend = backend
            ok = (self._encode(text) == want and self.decode(want) == self.tokenizer.decode(
                want, skip_special_tokens=False, clean_up_tokenization_spaces=False))
        except Exception:
            ok = False
        if not ok:
            self._backend = None
        self._encode_cached.cache_clear()
        return ok


# ----------------------------------------------------------------------------- renderer

class ChatRenderer:
    """Renders chat requests to token ids for one tokenizer (pure: no I/O, no state).

    `chat_template_kwargs` are passed to the template on every render (e.g.
    `{"enable_thinking": False}`); `stop_token_ids` are stripped from the end of an
    output like the tokenizer's eos token. A message longer than `max_message_chars`,
    or a render longer than `max_prompt_chars`, is a ValueError before any tokenizing.
    `tool_fallback`: the template has no tool markup, so requests with tools are
    rendered through `hermes_tool_fallback` (parse replies with the hermes parser).
    """

    def __init__(self, tokenizer: ChatTokenizer, *,
                 chat_template_kwargs: dict | None = None,
                 stop_token_ids: Iterable[int] = (),
                 max_message_chars: int = 1 << 20, max_prompt_chars: int = 1 << 22,
                 tool_fallback: bool = False, _direct: DirectTokenizer | None = None) -> None:
        self.tool_fallback = tool_fallback
        self.tokenizer = tokenizer
        self._direct = _direct if _direct is not None else DirectTokenizer(tokenizer)
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.max_message_chars, self.max_prompt_chars = max_message_chars, max_prompt_chars
        eos = getattr(tokenizer, "eos_token_id", None)
        self.stop_token_ids = frozenset(stop_token_ids) | ({eos} if eos is not None else set())

    def with_template_kwargs(self, extra: Mapping[str, Any]) -> ChatRenderer:
        """A renderer with `extra` template variables on top of this one's."""
        return ChatRenderer(self.tokenizer,
                            chat_template_kwargs={**self.chat_template_kwargs, **extra},
                            stop_token_ids=self.stop_token_ids,
                            max_message_chars=self.max_message_chars,
                            max_prompt_chars=self.max_prompt_chars,
                            tool_fallback=self.tool_fallback, _direct=self._direct)

    def render_text(self, messages: list[dict], tools: list[dict] | None = None,
                    add_generation_prompt: bool = True) -> str:
        """The chat template's text for these messages (and tool schemas)."""
        msgs = normalize_messages(messages, self.max_message_chars)
        if tools is not None and (not isinstance(tools, list)
                                  or not all(isinstance(t, Mapping) for t in tools)):
            raise ValueError("tools must be a list of {\"type\": \"function\", "
                             "\"function\": {...}} objects")
        if tools and self.tool_fallback:
            msgs, tools = hermes_tool_fallback(msgs, tools), None
        try:
            text = self._direct.render(msgs, tools or None, add_generation_prompt,
                                       self.chat_template_kwargs)
        except jinja2.TemplateError as e:
            raise ValueError(f"the model's chat template rejected these messages: {e}") from e
        except RecursionError:  # e.g. tool schemas nested hundreds of levels deep
            raise ValueError("the request is nested too deeply to render") from None
        assert isinstance(text, str), f"apply_chat_template returned {type(text).__name__}"
        if len(text) > self.max_prompt_chars:
            raise ValueError(f"the rendered prompt has {len(text)} characters; the limit is "
                             f"{self.max_prompt_chars} (rollout.proxy.max_prompt_chars)")
        return text

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; adds no BOS/EOS (the template already has them)."""
        return self._direct.encode(text) if text else []

    def decode(self, ids: list[int]) -> str:
        """Text of `ids`, special tokens included, no whitespace clean-up."""
        return self._direct.decode(list(ids))

    def decode_output(self, ids: list[int], matched_stop: int | str | None = None) -> str:
        """The text of a completion as the client sees it: without the token (eos or
        `matched_stop` id) or stop string that ended it."""
        ids = list(ids)
        if ids and (ids[-1] in self.stop_token_ids or ids[-1] == matched_stop):
            ids = ids[:-1]
        text = self.decode(ids)
        if isinstance(matched_stop, str) and matched_stop and text.endswith(matched_stop):
            text = text[:-len(matched_stop)]
        return text

    def node_text(self, prompt_ids: list[int], output_ids: list[int]) -> str:
        """The text a completion is matched by (fill `CompletionNode.text` with it)."""
        return self.decode(list(prompt_ids) + list(output_ids))

    def build_prompt(self, messages: list[dict], tools: list[dict] | None,
                     candidates: Iterable[CompletionNode]) -> Prompt:
        """Render and tokenize a request, continuing the best earlier completion.

        `candidates` are the session's earlier completions. The one whose `text` is the
        longest proper prefix of the render becomes the parent, and its exact
        prompt+output tokens start `input_ids`; only the rest of the text is tokenized.
        """
        full = self.render_text(messages, tools)
        if not full:
            raise ValueError("the chat template rendered these messages as an empty prompt")
        candidates = tuple(candidates)
        parent = _longest_prefix(full, candidates)
        if parent is None:
            # a break: the session has completions and the request carries assistant
            # turns, yet none of them continues (assistant turns in a session's first
            # request are the client's own, e.g. a few-shot example: not a break)
            continued = bool(candidates) and any(
                m.get("role") == "assistant" for m in messages if isinstance(m, Mapping))
            return Prompt(input_ids=self.encode(full), text=full, parent_id=None,
                          prefix_break=continued)
        ids = list(parent.prompt_ids) + list(parent.output_ids)
        ids += self.encode(full[len(parent.text):])
        return Prompt(input_ids=ids, text=full, parent_id=parent.id, prefix_break=False)


def _longest_prefix(full: str, candidates: Iterable[CompletionNode]) -> CompletionNode | None:
    """The candidate whose non-empty text is the longest proper prefix of `full`."""
    best: CompletionNode | None = None
    best_len = 0
    for node in candidates:
        n = len(node.text)
        if best_len < n < len(full) and full.startswith(node.text):
            best, best_len = node, n
    return best
