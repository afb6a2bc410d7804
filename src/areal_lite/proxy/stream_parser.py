"""Proxy stage 3, streaming: `StreamParser`, the incremental `parse_output`
(proxy/parsers.py): text deltas in, content/reasoning deltas out, tool calls at the end,
cut into regions by the same rules so the deltas add up to the non-streaming parse."""

from __future__ import annotations

from typing import Literal

from areal_lite.proxy.parsers import Delta, ToolCall, first_tag, get_format

__all__ = ["StreamParser"]


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
        self._fmt = get_format(tool_parser_name)
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
        i, tag = first_tag(self._buf, fmt.open_tags)
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
