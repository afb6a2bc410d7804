"""The proxy's Anthropic Messages endpoint, driven by the real `anthropic` SDK."""

from __future__ import annotations

import anthropic
import httpx2
import pytest
from anthropic import AsyncAnthropic
from proxy_support import (  # noqa: F401  (env: fixture)
    Script,
    assert_one_reply_recorded,
    assert_token_chain,
    assert_tool_turn_continues,
    env,
    make_cfg,
    stop_string_stack,
)

from areal_lite.config_toml import loads_config
from areal_lite.rollout.stack import open_rollout
from areal_lite.testing.fake_sglang.server import FakeSGLangServer

TOOLS = [{"name": "add", "description": "add two ints", "input_schema": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}}]
ADD_CALL = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'


def anthropic_client(stack, key: str | None = None, *, in_process: bool = True) -> AsyncAnthropic:
    if key is None:
        key = stack.proxy.sessions.start().key
    return AsyncAnthropic(base_url=stack.proxy.base_url.removesuffix("/v1"), api_key=key,
                          max_retries=0,
                          http_client=stack.controller.http_client if in_process else None)


async def test_single_turn_records_exact_tokens(env, tiny_tokenizer):  # noqa: F811
    env.script.replies.append("The answer is 42.")
    session = env.stack.proxy.sessions.start()
    msg = await anthropic_client(env.stack, session.key).messages.create(
        model="default", max_tokens=32, messages=[{"role": "user", "content": "What is 6 * 7?"}])
    assert msg.id.startswith("msg_") and msg.type == "message" and msg.role == "assistant"
    assert [(b.type, b.text) for b in msg.content] == [("text", "The answer is 42.")]
    assert msg.stop_reason == "end_turn" and msg.stop_sequence is None
    assert_one_reply_recorded(env, session, tiny_tokenizer, msg.id, "The answer is 42.",
                              msg.usage.input_tokens, msg.usage.output_tokens)


async def test_prompt_matches_the_chat_endpoint(env):  # noqa: F811
    """String and block forms of `system` render exactly like an OpenAI system message."""
    client = anthropic_client(env.stack)
    user = [{"role": "user", "content": "hi"}]
    await client.messages.create(model="default", max_tokens=4, system="Be brief.", messages=user)
    await client.messages.create(model="default", max_tokens=4, messages=user, system=[
        {"type": "text", "text": "Be"}, {"type": "text", "text": "brief."}])
    await client.messages.create(model="default", max_tokens=4, system=[
        {"type": "text", "text": "Be brief."}], messages=[{"role": "user", "content": [
            {"type": "text", "text": "hi"}]}])
    await env.client().chat.completions.create(model="default", max_tokens=4, messages=[
        {"role": "system", "content": "Be brief."}, *user])
    string, blocks, single, chat = env.script.prompts
    assert string == single == chat != blocks
    assert "Be\nbrief." in env.stack.tokenizer.decode(blocks)


async def test_multi_turn_reuses_the_sampled_tokens(env):  # noqa: F811
    session = env.stack.proxy.sessions.start()
    client = anthropic_client(env.stack, session.key)
    messages = [{"role": "user", "content": "Hello there!"}]
    ids = []
    for turn in range(3):
        env.script.replies.append(f"reply number {turn}")
        msg = await client.messages.create(model="default", max_tokens=16, system="Be brief.",
                                           messages=messages)
        ids.append(msg.id)
        messages += [{"role": "assistant", "content": msg.content},  # blocks sent back as is
                     {"role": "user", "content": [{"type": "text", "text": f"thanks {turn}"}]}]
    assert_token_chain(env.stack, session, ids)


async def test_tool_use_round_trip(env):  # noqa: F811
    env.script.replies.extend([ADD_CALL, "The sum is 3."])
    session = env.stack.proxy.sessions.start()
    client = anthropic_client(env.stack, session.key)
    messages = [{"role": "user", "content": "add 1 and 2"}]
    first = await client.messages.create(model="default", max_tokens=64, tools=TOOLS,
                                         messages=messages)
    assert first.stop_reason == "tool_use"
    (call,) = first.content
    assert call.type == "tool_use" and call.name == "add" and call.input == {"a": 1, "b": 2}
    messages += [{"role": "assistant", "content": first.content},
                 {"role": "user", "content": [
                     {"type": "tool_result", "tool_use_id": call.id, "content": "3"}]}]
    second = await client.messages.create(model="default", max_tokens=64, tools=TOOLS,
                                          messages=messages)
    assert [b.text for b in second.content] == ["The sum is 3."]
    assert second.stop_reason == "end_turn"
    assert_tool_turn_continues(env, session, first.id, second.id)


async def test_streaming_events_and_text(env):  # noqa: F811
    text = "streaming works, token by token"
    env.script.replies.extend([text, text])
    session = env.stack.proxy.sessions.start()
    client = anthropic_client(env.stack, session.key)
    kwargs = dict(model="default", max_tokens=64, messages=[{"role": "user", "content": "go"}])
    plain = await client.messages.create(**kwargs)
    stream = await client.messages.create(stream=True, **kwargs)
    events = [event async for event in stream]
    kinds = [e.type for e in events]
    assert kinds[:2] == ["message_start", "content_block_start"]
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(kinds[2:-3]) == {"content_block_delta"}
    streamed = "".join(e.delta.text for e in events if e.type == "content_block_delta")
    assert streamed == plain.content[0].text == text
    start, delta = events[0].message, events[-2]
    assert delta.delta.stop_reason == "end_turn"
    _, second = session.cache.nodes
    assert start.id == second.id and start.usage.input_tokens == len(second.prompt_ids)
    assert delta.usage.output_tokens == len(second.output_ids) == plain.usage.output_tokens


async def test_streaming_tool_use(env):  # noqa: F811
    env.script.replies.append(ADD_CALL)
    client = anthropic_client(env.stack)
    async with client.messages.stream(model="default", max_tokens=64, tools=TOOLS,
                                      messages=[{"role": "user", "content": "add"}]) as stream:
        kinds = [event.type async for event in stream]
        final = await stream.get_final_message()
    assert "input_json" in kinds
    assert final.stop_reason == "tool_use"
    (call,) = final.content
    assert call.type == "tool_use" and call.name == "add" and call.input == {"a": 1, "b": 2}


async def test_over_tcp_without_injected_client(env):  # noqa: F811
    env.script.replies.extend(["over tcp", "streamed over tcp"])
    async with anthropic_client(env.stack, in_process=False) as client:
        msg = await client.messages.create(model="default", max_tokens=8,
                                           messages=[{"role": "user", "content": "hi"}])
        async with client.messages.stream(model="default", max_tokens=8,
                                          messages=[{"role": "user", "content": "hi"}]) as stream:
            streamed = await stream.get_final_text()
    assert msg.content[0].text == "over tcp" and streamed == "streamed over tcp"


@pytest.mark.parametrize("stream", [False, True])
async def test_stop_sequences(tiny_model_dir, tiny_tokenizer, stream):
    async with stop_string_stack(tiny_model_dir, tiny_tokenizer, "alpha beta STOP gamma") as stack:
        session = stack.proxy.sessions.start()
        client = anthropic_client(stack, session.key)
        kwargs = dict(model="default", max_tokens=64, stop_sequences=["STOP"],
                      messages=[{"role": "user", "content": "go"}])
        if stream:
            async with client.messages.stream(**kwargs) as s:
                msg = await s.get_final_message()
        else:
            msg = await client.messages.create(**kwargs)
    assert [b.text for b in msg.content] == ["alpha beta "]
    assert msg.stop_reason == "stop_sequence" and msg.stop_sequence == "STOP"
    (node,) = session.cache.nodes
    assert "STOP" in tiny_tokenizer.decode(node.output_ids)  # the sampled tokens are kept whole


async def test_max_tokens_stops_the_message(env):  # noqa: F811
    env.script.replies.append("one two three four five six seven eight nine ten")
    msg = await anthropic_client(env.stack).messages.create(
        model="default", max_tokens=3, messages=[{"role": "user", "content": "count"}])
    assert msg.stop_reason == "max_tokens" and msg.usage.output_tokens == 3


async def test_greedy_stream_equals_non_stream_on_the_local_engine(tiny_model_dir):
    # This SDK version takes sampling parameters only through extra_body.
    cfg = loads_config("", [f"actor.path={tiny_model_dir}", "rollout.backend=local",
                            "actor.device=cpu", "rollout.episode_timeout_s=60"])
    async with open_rollout(cfg, "sample_agents.ChatAgent") as stack:
        client = anthropic_client(stack)
        kwargs = dict(model="default", max_tokens=24, extra_body={"temperature": 0.0},
                      messages=[{"role": "user", "content": "Tell me a story."}])
        plain = await client.messages.create(**kwargs)
        async with client.messages.stream(**kwargs) as stream:
            streamed = await stream.get_final_message()
    assert [b.type for b in plain.content] == [b.type for b in streamed.content] == ["text"]
    assert streamed.content[0].text == plain.content[0].text
    assert (streamed.stop_reason, streamed.usage.output_tokens) == (
        plain.stop_reason, plain.usage.output_tokens)


async def test_missing_max_tokens_is_an_anthropic_400(env):  # noqa: F811
    client = anthropic_client(env.stack)
    with pytest.raises(anthropic.BadRequestError) as info:
        await client.post("/v1/messages", cast_to=httpx2.Response, body={
            "model": "default", "messages": [{"role": "user", "content": "hi"}]})
    assert info.value.status_code == 400
    assert info.value.body == {"type": "error", "error": {
        "type": "invalid_request_error", "message": "max_tokens: Field required"}}


@pytest.mark.parametrize("extra, fragment", [
    ({"messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "x"}}]}]},
     "image content is not supported"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Sure"}]},
     "prefill"),
    ({"messages": [{"role": "system", "content": "hi"}]}, "role"),
    ({"stop_sequences": "STOP"}, "stop_sequences"),
    ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "server tools"),
    ({"temperature": "hot"}, "temperature"),
])
async def test_malformed_requests_get_anthropic_errors(env, extra, fragment):  # noqa: F811
    body = {"model": "default", "max_tokens": 8,
            "messages": [{"role": "user", "content": "hi"}], **extra}
    with pytest.raises(anthropic.BadRequestError) as info:
        await anthropic_client(env.stack).post("/v1/messages", cast_to=httpx2.Response, body=body)
    error = info.value.body["error"]
    assert error["type"] == "invalid_request_error" and fragment in error["message"]


async def test_bad_key_is_an_authentication_error(env):  # noqa: F811
    kwargs = dict(model="default", max_tokens=4, messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(anthropic.AuthenticationError) as info:
        await anthropic_client(env.stack, "sk-sess-not-a-key").messages.create(**kwargs)
    assert info.value.body["error"]["type"] == "authentication_error"
    key = env.stack.proxy.sessions.start().key  # Authorization: Bearer works too
    async with httpx2.AsyncClient(base_url=env.stack.proxy.base_url) as http:
        r = await http.post("/messages", json=kwargs, headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 200 and r.json()["type"] == "message"


async def test_admin_key_is_not_a_session_key(env):  # noqa: F811
    with pytest.raises(anthropic.AuthenticationError):
        await anthropic_client(env.stack, env.stack.proxy.sessions.admin_key).messages.create(
            model="default", max_tokens=4, messages=[{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("mode", ["inline", "subproc"])
async def test_episode_with_an_anthropic_agent(tiny_model_dir, tiny_tokenizer, mode):
    script = Script(tiny_tokenizer)
    script.replies.extend(["first reply", "second reply"])
    async with FakeSGLangServer(vocab_size=len(tiny_tokenizer), max_context_len=1024,
                                eos_token_id=tiny_tokenizer.eos_token_id,
                                responder=script) as fake:
        cfg = make_cfg(tiny_model_dir, fake.url, f"rollout.agent.mode={mode}",
                       "rollout.agent.subproc_max_workers=1", "rollout.agent.turn_discount=0.5")
        async with open_rollout(cfg, "sample_agents.AnthropicAgent") as stack:
            ep = await stack.controller.run_episode({"question": "count with me"})
            assert stack.proxy.sessions.num_prefix_breaks == 0
            assert len(stack.proxy.sessions) == 0
    assert not ep.failed and ep.num_completions == 2
    assert [s.raw_reward for s in ep.samples] == [0.25, 1.0]
    assert [s.reward for s in ep.samples] == pytest.approx([0.25 + 0.5, 1.0])
    first, second = (s.completion_ids[0] for s in ep.samples)
    assert first.startswith("msg_") and second.startswith("msg_")


@pytest.mark.parametrize("stream", [False, True])
async def test_reasoning_becomes_a_thinking_block(tiny_model_dir, tiny_tokenizer, stream):
    script = Script(tiny_tokenizer)
    script.replies.append("<think>six times seven</think>The answer is 42.")
    async with FakeSGLangServer(vocab_size=len(tiny_tokenizer), max_context_len=1024,
                                eos_token_id=tiny_tokenizer.eos_token_id, responder=script) as fake:
        cfg = make_cfg(tiny_model_dir, fake.url, "rollout.proxy.reasoning_parser=think")
        async with open_rollout(cfg, "sample_agents.ChatAgent") as stack:
            kwargs = dict(model="default", max_tokens=64,
                          messages=[{"role": "user", "content": "6 * 7?"}])
            client = anthropic_client(stack)
            if stream:
                async with client.messages.stream(**kwargs) as s:
                    msg = await s.get_final_message()
            else:
                msg = await client.messages.create(**kwargs)
    assert [b.type for b in msg.content] == ["thinking", "text"]
    assert msg.content[0].thinking == "six times seven"
    assert msg.content[1].text == "The answer is 42." and msg.stop_reason == "end_turn"
