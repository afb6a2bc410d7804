"""Tool-call and reasoning parsers: each family, malformed input, streaming == batch."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from areal_lite.proxy.parsers import (
    TOOL_PARSERS,
    Delta,
    ToolCall,
    detect_tool_parser,
    parse_output,
    split_reasoning,
    think_opened_in_prompt,
)
from areal_lite.proxy.stream_parser import StreamParser
from areal_lite.testing.tiny import CHATML_TOOLS_TEMPLATE


def calls_of(out) -> list[tuple[str, dict]]:
    return [(c.name, json.loads(c.arguments)) for c in out.tool_calls]


# ----------------------------------------------------------------------------- hermes

@pytest.mark.parametrize("name", ["hermes", "qwen"])
def test_hermes_single_call(name):
    text = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
    out = TOOL_PARSERS[name].parse(text)
    assert out.content is None
    assert calls_of(out) == [("add", {"a": 1, "b": 2})]
    call = out.tool_calls[0]
    assert call.id.startswith("call_") and len(call.id) > 10
    assert call.to_openai() == {"id": call.id, "type": "function",
                                "function": {"name": "add", "arguments": call.arguments}}


def test_hermes_multiple_calls_with_content_around():
    text = ('Let me compute.\n<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n'
            '</tool_call>\n<tool_call>\n{"name": "mul", "arguments": {"x": "é"}}\n'
            '</tool_call>\nDone.')
    out = TOOL_PARSERS["hermes"].parse(text)
    assert out.content == "Let me compute.\n\n\nDone."
    assert calls_of(out) == [("add", {"a": 1}), ("mul", {"x": "é"})]
    assert out.tool_calls[0].id != out.tool_calls[1].id
    assert "é" in out.tool_calls[1].arguments  # not \u-escaped


def test_hermes_malformed_block_stays_in_content():
    bad = '<tool_call>\n{"name": "add", "arguments": {"a": 1}\n</tool_call>'  # missing }
    good = '<tool_call>{"name": "ok", "arguments": {}}</tool_call>'
    out = TOOL_PARSERS["hermes"].parse(f"before {bad} {good} after")
    assert out.content == f"before {bad}  after"
    assert calls_of(out) == [("ok", {})]


@pytest.mark.parametrize("body", [
    '{"arguments": {}}',  # no name
    '{"name": "", "arguments": {}}',
    '{"name": "f", "arguments": [1]}',
    '{"name": "f", "arguments": "not json"}',
    '[{"name": "f", "arguments": {}}, {"name": "g", "arguments": {}}]',  # two in one block
    '"just a string"',
])
def test_hermes_invalid_call_objects_are_content(body):
    text = f"<tool_call>{body}</tool_call>"
    out = TOOL_PARSERS["hermes"].parse(text)
    assert out.tool_calls == [] and out.content == text


def test_hermes_unclosed_block_is_content_and_string_arguments_kept():
    out = TOOL_PARSERS["hermes"].parse('hi <tool_call>{"name": "f", "arguments": {}}')
    assert out.tool_calls == [] and out.content == 'hi <tool_call>{"name": "f", "arguments": {}}'
    out = TOOL_PARSERS["hermes"].parse(
        '<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>')
    assert out.tool_calls[0].arguments == '{"a": 1}'
    out = TOOL_PARSERS["hermes"].parse('<tool_call>{"name": "f"}</tool_call>')
    assert out.tool_calls[0].arguments == "{}"


def test_no_tool_calls_plain_text():
    for name in TOOL_PARSERS:
        out = TOOL_PARSERS[name].parse("  The answer is 42.\n")
        assert out.content == "The answer is 42." and out.tool_calls == []
        assert TOOL_PARSERS[name].parse("  \n").content is None


def test_none_parser_leaves_markup_alone():
    text = '<tool_call>{"name": "f", "arguments": {}}</tool_call>'
    assert TOOL_PARSERS["none"].parse(text).content == text


# ----------------------------------------------------------------------------- llama3, mistral

def test_llama3_json_and_python_tag():
    p = TOOL_PARSERS["llama3"]
    out = p.parse(' {"name": "get_weather", "parameters": {"city": "Paris"}}')
    assert out.content is None and calls_of(out) == [("get_weather", {"city": "Paris"})]
    out = p.parse('Sure.<|python_tag|>{"name": "f", "parameters": {"a": 1}}; '
                  '{"name": "g", "parameters": {}}')
    assert out.content == "Sure." and calls_of(out) == [("f", {"a": 1}), ("g", {})]
    out = p.parse('<|python_tag|>[{"name": "f", "arguments": {}}]')
    assert calls_of(out) == [("f", {})]


def test_llama3_malformed_is_content():
    p = TOOL_PARSERS["llama3"]
    for text in ['{"name": "f", "parameters": {', '{"x": 1}', "{ not json } at all",
                 "<|python_tag|>brave_search.call(query='x')"]:
        out = p.parse(text)
        assert out.tool_calls == [] and out.content == text
    assert p.parse("The set {1, 2}").content == "The set {1, 2}"


def test_mistral_list_and_new_format():
    p = TOOL_PARSERS["mistral"]
    out = p.parse('Calling. [TOOL_CALLS][{"name": "a", "arguments": {"x": 1}}, '
                  '{"name": "b", "arguments": {}}]')
    assert out.content == "Calling." and calls_of(out) == [("a", {"x": 1}), ("b", {})]
    out = p.parse('[TOOL_CALLS]a[ARGS]{"x": 1}[TOOL_CALLS]b[CALL_ID]abc123def[ARGS]{}')
    assert out.content is None and calls_of(out) == [("a", {"x": 1}), ("b", {})]
    bad = '[TOOL_CALLS][{"name": "a", "arguments": {"x": 1}'
    assert p.parse("hi " + bad).content == "hi " + bad
    assert p.parse("[TOOL_CALLS]a[ARGS]{oops").tool_calls == []


def test_detect_tool_parser():
    assert detect_tool_parser(CHATML_TOOLS_TEMPLATE) == "hermes"
    assert detect_tool_parser("{{ '[TOOL_CALLS]' }}") == "mistral"
    assert detect_tool_parser("{% if message.role == 'ipython' %}") == "llama3"
    assert detect_tool_parser("<|python_tag|>") == "llama3"
    assert detect_tool_parser("{{ message.content }}") == "none"
    assert detect_tool_parser(None) == "none"
    assert detect_tool_parser({"default": "x", "tool_use": "<tool_call>"}) == "hermes"


def test_unknown_parser_name_says_what_to_use():
    with pytest.raises(ValueError, match="hermes"):
        parse_output("x", tool_parser="nope")
    with pytest.raises(ValueError, match="unknown tool parser"):
        StreamParser("nope")


# ----------------------------------------------------------------------------- reasoning

def test_split_reasoning_cases():
    assert split_reasoning("<think>\nhmm\n</think>\n\nAnswer") == ("hmm", "Answer")
    assert split_reasoning("  <think>a</think>b</think>c") == ("a", "b</think>c")
    assert split_reasoning("plain answer ") == (None, "plain answer")
    # prompt already opened <think>: everything before </think> is reasoning
    assert split_reasoning("hmm\n</think>\nAnswer", prompt_opened=True) == ("hmm", "Answer")
    # missing close tag: the model was cut off while thinking -> all reasoning
    assert split_reasoning("<think>still going", ) == ("still going", "")
    assert split_reasoning("still going", prompt_opened=True) == ("still going", "")
    # <think> not at the start, or a lone </think>, is content
    assert split_reasoning("a <think>b</think>") == (None, "a <think>b</think>")
    assert split_reasoning("a</think>b") == (None, "a</think>b")
    assert split_reasoning("<think>\n</think>x") == (None, "x")
    assert split_reasoning("[r]x[/r]y", think_open="[r]", think_close="[/r]") == ("x", "y")


def test_think_opened_in_prompt():
    assert think_opened_in_prompt("<|im_start|>assistant\n<think>\n")
    assert not think_opened_in_prompt("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert not think_opened_in_prompt("<|im_start|>assistant\n")


def test_parse_output_reasoning_and_tools():
    text = ('<think>I should add.</think>\nOK.\n'
            '<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>')
    out = parse_output(text, tool_parser="hermes", reasoning=True)
    assert out.reasoning == "I should add." and out.content == "OK."
    assert calls_of(out) == [("add", {"a": 1})]
    # tool markup inside reasoning is not a call
    out = parse_output('<think><tool_call>{"name": "x", "arguments": {}}</tool_call></think>',
                       tool_parser="hermes", reasoning=True)
    assert out.tool_calls == [] and out.content is None and "tool_call" in out.reasoning
    # reasoning off: think tags are content
    assert parse_output("<think>a</think>b").content == "<think>a</think>b"


# ----------------------------------------------------------------------------- streaming

def stream(text: str, cuts: list[int], name: str, reasoning: bool, opened: bool):
    p = StreamParser(name, reasoning, opened)
    deltas: list[Delta] = []
    bounds = [0, *sorted(cuts), len(text)]
    batches = [p.feed(text[a:b]) for a, b in zip(bounds, bounds[1:])]
    last, calls = p.finish()
    for batch in [*batches, last]:  # each call's deltas come merged by kind
        assert all(x.kind != y.kind for x, y in zip(batch, batch[1:]))
        deltas += batch
    content = "".join(d.text for d in deltas if d.kind == "content") or None
    thought = "".join(d.text for d in deltas if d.kind == "reasoning") or None
    return deltas, content, thought, calls


def assert_stream_matches(text, cuts, name, reasoning, opened):
    deltas, content, thought, calls = stream(text, cuts, name, reasoning, opened)
    want = parse_output(text, tool_parser=name, reasoning=reasoning, prompt_opened=opened)
    assert content == want.content
    assert thought == want.reasoning
    assert [(c.name, c.arguments) for c in calls] == \
        [(c.name, c.arguments) for c in want.tool_calls]
    assert all(d.text for d in deltas)  # no empty deltas


REPRESENTATIVE = [
    ("hermes", '<think>\nLet me think.\n</think>\n\nI will call.\n<tool_call>\n'
               '{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>\n<tool_call>\n'
               '{"name": "get", "arguments": {"city": "Zürich"}}\n</tool_call>'),
    ("hermes", 'Answer: <tool_call>{"name": "f", "arguments": {</tool_call> tail <tool_call>'),
    ("hermes", "  plain answer with < and <tool and </think> inside  \n"),
    ("hermes", "reasoning only, cut off"),
    ("hermes", "step</think> answer <tool_call>{\"name\": \"f\"}</tool_call>"),
    ("llama3", '\n {"name": "get_weather", "parameters": {"city": "Paris"}}'),
    ("llama3", 'Sure! <|python_tag|>{"name": "f", "parameters": {}}; {"name": "g", '
               '"parameters": {"x": [1, 2]}}'),
    ("llama3", "{ not json"),
    ("mistral", 'Hi [TOOL_CALLS][{"name": "a", "arguments": {"x": 1}}]'),
    ("mistral", '[TOOL_CALLS]a[ARGS]{"x": 1}[TOOL_CALLS]b[ARGS]{}'),
    ("none", "<think>r</think>  <tool_call>{}</tool_call>  "),
]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(REPRESENTATIVE), st.data(), st.booleans(), st.booleans())
def test_streaming_equals_batch_on_representative_outputs(case, data, reasoning, opened):
    name, text = case
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=12))
    assert_stream_matches(text, cuts, name, reasoning, opened)


FRAGMENTS = ["<tool_call>", "</tool_call>", "<think>", "</think>", "[TOOL_CALLS]",
             "<|python_tag|>", '{"name": "f", "arguments": {"a": 1}}', '{"name": "g"}',
             '[{"name": "h", "arguments": {}}]', "[ARGS]", "{}", "{", "}", ";", "<", "</",
             "<tool", "[TOOL", " ", "\n", "x", "hello", "é"]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(FRAGMENTS), max_size=14), st.data(),
       st.sampled_from(sorted(TOOL_PARSERS)), st.booleans(), st.booleans())
def test_streaming_equals_batch_on_random_markup(parts, data, name, reasoning, opened):
    text = "".join(parts)
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=10))
    assert_stream_matches(text, cuts, name, reasoning, opened)


def test_streaming_emits_content_early_and_holds_partial_tags():
    p = StreamParser("hermes", reasoning=True)
    assert p.feed("<thi") == []  # could still be <think>
    assert p.feed("nk>abc") == [Delta("reasoning", "abc")]
    assert p.feed(" de</th") == [Delta("reasoning", " de")]
    assert p.feed("ink>\nHello wor") == [Delta("content", "Hello wor")]
    assert p.feed("ld <tool") == [Delta("content", "ld")]  # " <tool" held
    assert p.feed('_call>{"name": "f", "arguments": {}}') == []
    assert p.feed("</tool_call> bye") == [Delta("content", "  bye")]  # held space too
    deltas, calls = p.finish()
    assert deltas == [] and [c.name for c in calls] == ["f"]
    assert isinstance(calls[0], ToolCall)
    with pytest.raises(RuntimeError):
        p.feed("more")


def test_streaming_without_reasoning_passes_think_through():
    p = StreamParser("none")
    assert p.feed("<think>x") == [Delta("content", "<think>x")]
    assert p.finish() == ([], [])


def test_public_names_are_sorted():
    import areal_lite.proxy.parsers as parsers
    import areal_lite.proxy.render as render

    for mod in (parsers, render):
        assert mod.__all__ == sorted(mod.__all__)
        assert all(hasattr(mod, name) for name in mod.__all__)
