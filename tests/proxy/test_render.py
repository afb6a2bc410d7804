"""Chat rendering: message normalisation and prefix-stable multi-turn token reuse."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from areal_lite.proxy.parsers import parse_output
from areal_lite.proxy.render import ChatRenderer, Prompt, normalize_messages
from areal_lite.types import CompletionNode

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
TOOLS = [{"type": "function", "function": {
    "name": "add", "description": "add two numbers",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}}}}]


@pytest.fixture(scope="module")
def renderer(tiny_tokenizer):
    return ChatRenderer(tiny_tokenizer)


def char_ids(tok, text: str) -> list[int]:
    """`text` as one token per character: what a sampler may produce, unlike BPE."""
    per_char = [tok.encode(ch, add_special_tokens=False) for ch in text]
    assert all(len(ids) == 1 for ids in per_char), "pick single-byte characters"
    return [ids[0] for ids in per_char]


def record(r: ChatRenderer, prompt: Prompt, output_ids: list[int], node_id: str,
           finish: str = "stop") -> CompletionNode:
    """What the proxy stores after a completion."""
    return CompletionNode(
        id=node_id, response_id=node_id, parent_id=prompt.parent_id,
        prompt_ids=prompt.input_ids, output_ids=output_ids,
        logprobs=[0.0] * len(output_ids), versions=[0] * len(output_ids),
        finish_reason=finish, text=r.node_text(prompt.input_ids, output_ids))


def test_three_turns_reuse_sampled_tokens_exactly(renderer, tiny_tokenizer):
    r, tok, eos = renderer, tiny_tokenizer, tiny_tokenizer.eos_token_id
    msgs = [SYSTEM, {"role": "user", "content": "say hello"}]
    p1 = r.build_prompt(msgs, TOOLS, [])
    assert p1.parent_id is None and not p1.prefix_break
    assert p1.input_ids == r.encode(p1.text) and r.decode(p1.input_ids) == p1.text
    out1 = char_ids(tok, "hello") + [eos]
    assert char_ids(tok, "hello") != r.encode("hello")  # sampled != re-tokenized
    n1 = record(r, p1, out1, "c1")
    assert r.decode_output(out1) == "hello"

    # turn 2: the model calls a tool (sampled one char at a time)
    msgs += [{"role": "assistant", "content": r.decode_output(out1)},
             {"role": "user", "content": "now add 1"}]
    p2 = r.build_prompt(msgs, TOOLS, [n1])
    assert p2.parent_id == "c1" and not p2.prefix_break
    assert p2.input_ids[:len(out1) + len(p1.input_ids)] == p1.input_ids + out1
    assert r.decode(p2.input_ids) == p2.text
    call_text = '<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call>'
    out2 = r.encode("<tool_call>") + char_ids(tok, call_text[len("<tool_call>"):-len(
        "</tool_call>")]) + r.encode("</tool_call>") + [eos]
    n2 = record(r, p2, out2, "c2")
    parsed = parse_output(r.decode_output(out2), tool_parser="hermes")
    assert parsed.content is None and len(parsed.tool_calls) == 1

    # turn 3: the agent sends the call back OpenAI-style (arguments as a JSON string)
    msgs += [{"role": "assistant", "content": None,
              "tool_calls": [parsed.tool_calls[0].to_openai()]},
             {"role": "tool", "tool_call_id": parsed.tool_calls[0].id, "content": "1"}]
    p3 = r.build_prompt(msgs, TOOLS, [n1, n2])
    assert p3.parent_id == "c2" and not p3.prefix_break
    assert p3.input_ids[:len(n2.prompt_ids) + len(out2)] == n2.prompt_ids + out2
    assert p3.input_ids[:len(n1.prompt_ids) + len(out1)] == n1.prompt_ids + out1
    assert r.decode(p3.input_ids) == p3.text
    assert p3.text.endswith("<tool_response>\n1\n</tool_response><|im_end|>\n"
                            "<|im_start|>assistant\n")


def test_length_cut_completion_is_still_a_prefix(renderer, tiny_tokenizer):
    r = renderer
    msgs = [{"role": "user", "content": "hi"}]
    p1 = r.build_prompt(msgs, None, [])
    out = char_ids(tiny_tokenizer, "hel")  # cut by max_new_tokens: no eos
    n1 = record(r, p1, out, "c1", finish="length")
    assert r.decode_output(out) == "hel"
    msgs += [{"role": "assistant", "content": "hel"}, {"role": "user", "content": "go on"}]
    p2 = r.build_prompt(msgs, None, [n1])
    assert p2.parent_id == "c1"
    assert p2.input_ids[:len(p1.input_ids) + len(out)] == p1.input_ids + out
    assert p2.input_ids[len(p1.input_ids) + len(out):] == r.encode(p2.text[len(n1.text):])
    assert p2.text[len(n1.text):].startswith("<|im_end|>\n<|im_start|>user")


def test_rewritten_history_is_a_prefix_break(renderer, tiny_tokenizer):
    r, eos = renderer, tiny_tokenizer.eos_token_id
    msgs = [{"role": "user", "content": "hi"}]
    p1 = r.build_prompt(msgs, None, [])
    out = r.encode("<think>\nhmm\n</think>\n\nhello") + [eos]
    n1 = record(r, p1, out, "c1")
    # the agent sends back only the content, reasoning stripped
    msgs += [{"role": "assistant", "content": "hello"}, {"role": "user", "content": "more"}]
    p2 = r.build_prompt(msgs, None, [n1])
    assert p2.parent_id is None and p2.prefix_break
    assert p2.input_ids == r.encode(p2.text)
    # a brand-new conversation is not a break, even with candidates around
    p3 = r.build_prompt([{"role": "user", "content": "other"}], None, [n1])
    assert p3.parent_id is None and not p3.prefix_break
    # nor is a session's first request carrying the client's own example exchange
    few_shot = [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"},
                {"role": "user", "content": "2+2?"}]
    assert not r.build_prompt(few_shot, None, []).prefix_break
    assert r.build_prompt(few_shot, None, [n1]).prefix_break


def test_branches_share_their_parent(renderer, tiny_tokenizer):
    r, eos = renderer, tiny_tokenizer.eos_token_id
    base = [{"role": "user", "content": "hi"}]
    p1 = r.build_prompt(base, None, [])
    out = char_ids(tiny_tokenizer, "hello") + [eos]
    n1 = record(r, p1, out, "c1")
    prompts = [r.build_prompt(base + [{"role": "assistant", "content": "hello"},
                                      {"role": "user", "content": q}], None, [n1])
               for q in ("first branch", "second branch")]
    for p in prompts:
        assert p.parent_id == "c1" and not p.prefix_break
        assert p.input_ids[:len(p1.input_ids) + len(out)] == p1.input_ids + out
    assert prompts[0].input_ids != prompts[1].input_ids


def test_longest_matching_candidate_wins(renderer, tiny_tokenizer):
    r, eos = renderer, tiny_tokenizer.eos_token_id
    msgs = [{"role": "user", "content": "a"}]
    nodes = []
    for i, reply in enumerate(["x", "y", "z"]):
        p = r.build_prompt(msgs, None, nodes)
        nodes.append(record(r, p, r.encode(reply) + [eos], f"c{i}"))
        msgs = msgs + [{"role": "assistant", "content": reply},
                       {"role": "user", "content": f"q{i}"}]
    # an unrelated candidate and one longer than the render must not match
    other = r.build_prompt([{"role": "user", "content": "b"}], None, [])
    nodes.append(record(r, other, r.encode("w") + [eos], "other"))
    full = r.render_text(msgs, None)
    nodes.append(CompletionNode(id="long", response_id="long", parent_id=None,
                                prompt_ids=[], output_ids=[], logprobs=[], versions=[],
                                finish_reason="stop", text=full + "more"))
    nodes.append(CompletionNode(id="same", response_id="same", parent_id=None,
                                prompt_ids=[], output_ids=[], logprobs=[], versions=[],
                                finish_reason="stop", text=full))  # not a *proper* prefix
    for order in (nodes, nodes[::-1]):
        p = r.build_prompt(msgs, None, order)
        assert p.parent_id == "c2"
    assert [n.parent_id for n in nodes[:3]] == [None, "c0", "c1"]


@settings(max_examples=25, deadline=None)
@given(st.lists(st.text(alphabet="abehlo !?\n", min_size=1, max_size=12), min_size=1,
                max_size=4), st.randoms(use_true_random=False))
def test_any_sampled_tokenization_is_reused(renderer, tiny_tokenizer, replies, rnd):
    """Whatever token split the sampler used, every turn starts with the exact ids."""
    r, eos = renderer, tiny_tokenizer.eos_token_id
    msgs: list[dict] = [{"role": "user", "content": "start"}]
    nodes: list[CompletionNode] = []
    for i, reply in enumerate(replies):
        p = r.build_prompt(msgs, None, nodes)
        if nodes:
            prev = nodes[-1]
            assert p.parent_id == prev.id
            assert p.input_ids[:len(prev.prompt_ids) + len(prev.output_ids)] == \
                prev.prompt_ids + prev.output_ids
        out = [t for chunk in _random_chunks(reply, rnd) for t in r.encode(chunk)] + [eos]
        nodes.append(record(r, p, out, f"c{i}"))
        msgs = msgs + [{"role": "assistant", "content": r.decode_output(out)},
                       {"role": "user", "content": f"turn {i}"}]


def _random_chunks(text: str, rnd) -> list[str]:
    cuts = sorted(rnd.sample(range(1, len(text)), k=rnd.randint(0, len(text) - 1)))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]


# ----------------------------------------------------------------------------- messages

def test_content_parts_and_developer_role(renderer):
    r = renderer
    parts = [{"role": "developer", "content": [{"type": "text", "text": "sys"}]},
             {"role": "user", "content": [{"type": "text", "text": "a"},
                                          {"type": "text", "text": "b"}]}]
    plain = [{"role": "system", "content": "sys"}, {"role": "user", "content": "a\nb"}]
    assert r.render_text(parts, None) == r.render_text(plain, None)
    assert "<|im_start|>system\nsys<|im_end|>" in r.render_text(parts, None)


def test_normalize_messages_shapes():
    msgs = normalize_messages([
        {"role": "user", "content": None},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "f", "arguments": '{"a": 1}'}},
            {"id": "call_2", "type": "function",
             "function": {"name": "g", "arguments": "not json"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "ok", "extra": 1},
    ])
    assert msgs[0] == {"role": "user", "content": ""}
    assert msgs[1]["tool_calls"][0]["function"]["arguments"] == {"a": 1}
    assert msgs[1]["tool_calls"][1]["function"]["arguments"] == "not json"
    assert msgs[2] == {"role": "tool", "tool_call_id": "call_1", "content": "ok"}


@pytest.mark.parametrize("messages, match", [
    ([], "non-empty list"),
    ("hello", "non-empty list"),
    (["hello"], r"messages\[0\] must be an object"),
    ([{"content": "x"}], "has no 'role'"),
    ([{"role": "robot", "content": "x"}], "'robot' is not supported"),
    ([{"role": "user", "content": 3}], "must be a string"),
    ([{"role": "user", "content": {"text": "x"}}], "must be a string"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
     "image content is not supported"),
    ([{"role": "user", "content": [{"type": "text"}]}], r"content\[0\] must be"),
    ([{"role": "assistant", "content": "", "tool_calls": [{"function": {}}]}],
     r"tool_calls\[0\] must look like"),
    ([{"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "f", "arguments": 3}}]}], "arguments must be"),
])
def test_malformed_messages_raise_value_error(renderer, messages, match):
    with pytest.raises(ValueError, match=match):
        renderer.render_text(messages, None)


def test_bad_tools_and_template_errors_are_value_errors(renderer):
    with pytest.raises(ValueError, match="tools must be a list"):
        renderer.render_text([{"role": "user", "content": "x"}], ["add"])

    class Strict:
        eos_token_id = None

        def apply_chat_template(self, conversation, **kwargs):
            import jinja2
            raise jinja2.TemplateError("Conversation roles must alternate")

    with pytest.raises(ValueError, match="roles must alternate"):
        ChatRenderer(Strict()).render_text([{"role": "user", "content": "x"}], None)


def test_chat_template_kwargs_and_stop_tokens():
    class Recorder:
        eos_token_id = 7

        def __init__(self):
            self.kwargs = {}

        def apply_chat_template(self, conversation, **kwargs):
            self.kwargs = kwargs
            return "rendered"

        def decode(self, ids, **kwargs):
            return "".join(chr(ord("a") + i) for i in ids)

    tok = Recorder()
    r = ChatRenderer(tok, chat_template_kwargs={"enable_thinking": False},
                     stop_token_ids=[9])
    assert r.render_text([{"role": "user", "content": "x"}], None) == "rendered"
    assert tok.kwargs["enable_thinking"] is False and tok.kwargs["tokenize"] is False
    assert tok.kwargs["add_generation_prompt"] is True and tok.kwargs["tools"] is None
    assert r.decode_output([0, 1, 7]) == "ab"
    assert r.decode_output([0, 1, 9]) == "ab"
    assert r.decode_output([0, 1, 3], matched_stop=3) == "ab"
    assert r.decode_output([0, 1, 2, 3], matched_stop="cd") == "ab"
    assert r.decode_output([0, 7, 1]) == "ahb"


# --- the direct paths (DirectTokenizer): the same text and tokens as the wrappers ------

_texts = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40)
_calls = st.lists(st.fixed_dictionaries({
    "type": st.just("function"), "id": st.text(max_size=5),
    "function": st.fixed_dictionaries({
        "name": st.sampled_from(["add", "get_weather"]),
        "arguments": st.one_of(st.dictionaries(st.sampled_from("abc"), st.integers()),
                               _texts)})}), max_size=2)
_turns = st.lists(st.one_of(
    st.fixed_dictionaries({"role": st.just("user"), "content": _texts}),
    st.fixed_dictionaries({"role": st.just("assistant"), "content": _texts},
                          optional={"tool_calls": _calls, "reasoning_content": _texts}),
    st.fixed_dictionaries({"role": st.just("tool"), "content": _texts},
                          optional={"tool_call_id": st.text(max_size=5)})), min_size=1, max_size=5)


@settings(max_examples=150, deadline=None)
@given(system=st.none() | _texts, turns=_turns, tools=st.sampled_from([None, TOOLS]),
       gen=st.booleans(), kwargs=st.sampled_from([{}, {"enable_thinking": False}]))
def test_direct_render_is_apply_chat_template(renderer, tiny_tokenizer, system, turns, tools,
                                              gen, kwargs):
    msgs = normalize_messages(([{"role": "system", "content": system}] if system is not None
                               else []) + turns)
    assert renderer._direct.fast_render  # else this compares the wrapper with itself
    want = tiny_tokenizer.apply_chat_template(msgs, tools=tools, tokenize=False,
                                              add_generation_prompt=gen, **kwargs)
    assert renderer._direct.render(msgs, tools, gen, kwargs) == want


@settings(max_examples=200, deadline=None)
@given(text=st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=60)
       | st.lists(st.sampled_from(["<|im_end|>", "<|im_start|>", "<tool_call>", " ", "  a",
                                   "\n", "12", "é"]), max_size=8).map("".join))
def test_direct_encode_and_decode_are_the_wrappers(renderer, tiny_tokenizer, text):
    assert renderer._direct.fast_codec
    want = tiny_tokenizer.encode(text, add_special_tokens=False)
    assert renderer.encode(text) == want
    assert renderer.encode(text) == want  # the cached answer too
    assert renderer.decode(want) == tiny_tokenizer.decode(
        want, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def test_cached_encodings_are_fresh_lists(renderer, tiny_tokenizer):
    ids = renderer.encode("<|im_start|>user\nhello there<|im_end|>\n")
    ids.append(-1)
    assert renderer.encode("<|im_start|>user\nhello there<|im_end|>\n")[-1] != -1
    long = "the quick <|im_end|> fox " * 300  # past the cache's bound: batch path, no GIL
    assert renderer.encode(long) == tiny_tokenizer.encode(long, add_special_tokens=False)


def test_direct_paths_fall_back_to_wrappers_that_differ(tiny_model_dir):
    from transformers import AutoTokenizer

    class Odd(type(AutoTokenizer.from_pretrained(tiny_model_dir))):
        """A tokenizer whose own wrappers do something the direct paths would not."""

        def apply_chat_template(self, conversation, **kwargs):
            return super().apply_chat_template(conversation, **kwargs) + "!"

        def encode(self, text, **kwargs):
            return [*super().encode(text, **kwargs), 0]

    odd = Odd.from_pretrained(tiny_model_dir)
    r = ChatRenderer(odd)
    assert not r._direct.fast_render and not r._direct.fast_codec
    assert r.render_text([{"role": "user", "content": "hi"}]).endswith("!")
    assert r.encode("hi")[-1] == 0
