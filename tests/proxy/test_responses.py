"""The proxy's OpenAI Responses endpoint, driven by the real `openai` SDK and Agents SDK."""

from __future__ import annotations

import json

import httpx2
import openai
import pytest
from proxy_support import (  # noqa: F401  (env: fixture)
    Script,
    assert_one_reply_recorded,
    assert_token_chain,
    assert_tool_turn_continues,
    env,
    make_cfg,
)

from areal_lite.rollout.stack import open_rollout
from areal_lite.testing.fake_sglang.server import FakeSGLangServer

TOOLS = [{"type": "function", "name": "add", "description": "add two ints", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}}]
ADD_CALL = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'


async def test_single_turn_records_exact_tokens(env, tiny_tokenizer):  # noqa: F811
    env.script.replies.append("The answer is 42.")
    session = env.stack.proxy.sessions.start()
    resp = await env.client(session.key).responses.create(
        model="default", input="What is 6 * 7?", max_output_tokens=32)
    assert resp.id.startswith("resp_") and resp.object == "response"
    assert resp.status == "completed" and resp.incomplete_details is None
    assert resp.output_text == "The answer is 42."
    (item,) = resp.output
    assert item.type == "message" and item.role == "assistant" and item.status == "completed"
    assert item.id.startswith("msg_") and item.content[0].annotations == []
    node = assert_one_reply_recorded(env, session, tiny_tokenizer, resp.id, "The answer is 42.",
                                     resp.usage.input_tokens, resp.usage.output_tokens)
    assert resp.usage.total_tokens == len(node.prompt_ids) + len(node.output_ids)


async def test_prompt_matches_the_chat_endpoint(env):  # noqa: F811
    """`instructions` and every input form render exactly like the chat messages."""
    client = env.client()
    await client.responses.create(model="default", instructions="Be brief.", input="hi")
    await client.responses.create(model="default", input=[
        {"role": "developer", "content": "Be brief."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}])
    await env.client().chat.completions.create(model="default", messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}])
    instructions, items, chat = env.script.prompts
    assert instructions == items == chat


async def test_multi_turn_reuses_the_sampled_tokens(env):  # noqa: F811
    session = env.stack.proxy.sessions.start()
    client = env.client(session.key)
    items: list = [{"role": "user", "content": "Hello there!"}]
    ids = []
    for turn in range(3):
        env.script.replies.append(f"reply number {turn}")
        resp = await client.responses.create(model="default", instructions="Be brief.",
                                             input=items)
        ids.append(resp.id)
        items += [item.model_dump(exclude_none=True) for item in resp.output]  # sent back as is
        items.append({"role": "user", "content": f"thanks {turn}"})
    assert_token_chain(env.stack, session, ids)


async def test_function_call_round_trip(env):  # noqa: F811
    env.script.replies.extend([ADD_CALL, "The sum is 3."])
    session = env.stack.proxy.sessions.start()
    client = env.client(session.key)
    items: list = [{"role": "user", "content": "add 1 and 2"}]
    first = await client.responses.create(model="default", tools=TOOLS, input=items)
    (call,) = first.output
    assert call.type == "function_call" and call.name == "add" and call.status == "completed"
    assert json.loads(call.arguments) == {"a": 1, "b": 2} and call.id.startswith("fc_")
    assert first.status == "completed" and first.output_text == ""
    items += [call.model_dump(exclude_none=True),
              {"type": "function_call_output", "call_id": call.call_id, "output": "3"}]
    second = await client.responses.create(model="default", tools=TOOLS, input=items)
    assert second.output_text == "The sum is 3."
    assert_tool_turn_continues(env, session, first.id, second.id)


async def test_streaming_events_and_text(env):  # noqa: F811
    text = "streaming works, token by token"
    env.script.replies.extend([text, text])
    session = env.stack.proxy.sessions.start()
    client = env.client(session.key)
    plain = await client.responses.create(model="default", input="go")
    stream = await client.responses.create(model="default", input="go", stream=True)
    events = [event async for event in stream]
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done",
                          "response.output_item.done", "response.completed"]
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    assert [e.sequence_number for e in events] == list(range(len(events)))
    streamed = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert streamed == plain.output_text == text
    final = events[-1].response
    _, second = session.cache.nodes
    assert final.id == events[0].response.id == second.id and final.status == "completed"
    assert final.output_text == text and final.output[0].id == events[2].item.id
    assert final.usage.input_tokens == len(second.prompt_ids)
    assert final.usage.output_tokens == len(second.output_ids) == plain.usage.output_tokens


async def test_streaming_function_call(env):  # noqa: F811
    env.script.replies.append(ADD_CALL)
    async with env.client().responses.stream(model="default", tools=TOOLS,
                                             input="add 1 and 2") as stream:
        kinds = [event.type async for event in stream]
        final = await stream.get_final_response()
    assert "response.function_call_arguments.delta" in kinds
    assert "response.function_call_arguments.done" in kinds
    (call,) = final.output
    assert call.type == "function_call" and call.name == "add"
    assert json.loads(call.arguments) == {"a": 1, "b": 2}


async def test_over_tcp_without_injected_client(env):  # noqa: F811
    env.script.replies.extend(["over tcp", "streamed over tcp"])
    async with env.client(in_process=False) as client:
        resp = await client.responses.create(model="default", input="hi")
        async with client.responses.stream(model="default", input="hi") as stream:
            final = await stream.get_final_response()
    assert resp.output_text == "over tcp" and final.output_text == "streamed over tcp"


@pytest.mark.parametrize("stream", [False, True])
async def test_max_output_tokens_makes_it_incomplete(env, stream):  # noqa: F811
    env.script.replies.append("one two three four five six seven eight nine ten")
    kwargs = dict(model="default", input="count", max_output_tokens=3)
    if stream:
        events = [e async for e in await env.client().responses.create(stream=True, **kwargs)]
        assert events[-1].type == "response.incomplete"
        resp = events[-1].response
    else:
        resp = await env.client().responses.create(**kwargs)
    assert resp.status == "incomplete" and resp.incomplete_details.reason == "max_output_tokens"
    assert resp.usage.output_tokens == 3 and resp.output[0].status == "incomplete"


@pytest.mark.parametrize("extra, fragment", [
    ({"previous_response_id": "resp_123"}, "send the full conversation"),
    ({"input": []}, "'input'"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     "text-only"),
    ({"input": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Sure"}]},
     "prefill"),
    ({"input": [{"role": "tool", "content": "hi"}]}, "role"),
    ({"input": [{"type": "web_search_call", "id": "ws_1"}]}, "not supported"),
    ({"tools": [{"type": "web_search"}]}, "only function tools"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
    ({"temperature": "hot"}, "temperature"),
])
async def test_malformed_requests_get_openai_errors(env, extra, fragment):  # noqa: F811
    body = {"model": "default", "input": "hi", **extra}
    with pytest.raises(openai.BadRequestError) as info:
        await env.client().post("/responses", cast_to=httpx2.Response, body=body)
    error = info.value.body
    assert error["type"] == "invalid_request_error" and fragment in error["message"]


async def test_bad_key_is_an_authentication_error(env):  # noqa: F811
    with pytest.raises(openai.AuthenticationError):
        await env.client("sk-sess-not-a-key").responses.create(model="default", input="hi")
    with pytest.raises(openai.AuthenticationError):
        await env.client(env.stack.proxy.sessions.admin_key).responses.create(
            model="default", input="hi")


async def test_reasoning_item_renders_like_reasoning_content(tiny_model_dir, tiny_tokenizer):
    script = Script(tiny_tokenizer)
    script.replies.extend(["<think>six times seven</think>The answer is 42.", "ok"])
    async with FakeSGLangServer(vocab_size=len(tiny_tokenizer), max_context_len=1024,
                                eos_token_id=tiny_tokenizer.eos_token_id, responder=script) as fake:
        cfg = make_cfg(tiny_model_dir, fake.url, "rollout.proxy.reasoning_parser=think")
        async with open_rollout(cfg, "sample_agents.ChatAgent") as stack:
            session = stack.proxy.sessions.start()
            client = openai.AsyncOpenAI(base_url=stack.proxy.base_url, api_key=session.key,
                                        http_client=stack.controller.http_client, max_retries=0)
            async with client.responses.stream(model="default", input="6 * 7?") as stream:
                first = await stream.get_final_response()
            assert [item.type for item in first.output] == ["reasoning", "message"]
            assert first.output[0].content[0].text == "six times seven"
            assert first.output_text == "The answer is 42."
            items = [{"role": "user", "content": "6 * 7?"},
                     *(item.model_dump(exclude_none=True) for item in first.output),
                     {"role": "user", "content": "thanks"}]
            await client.responses.create(model="default", input=items)
            await client.chat.completions.create(model="default", messages=[
                {"role": "user", "content": "6 * 7?"}, {"role": "assistant", "content":
                    "The answer is 42.", "reasoning_content": "six times seven"},
                {"role": "user", "content": "thanks"}])
    # the reasoning item re-renders like `reasoning_content` (kept or dropped by the template)
    assert script.prompts[1] == script.prompts[2]


async def test_episode_with_an_agents_sdk_responses_agent(tiny_model_dir, tiny_tokenizer):
    pytest.importorskip("agents")
    script = Script(tiny_tokenizer)
    script.replies.extend([ADD_CALL, "The sum is 3."])
    async with FakeSGLangServer(vocab_size=len(tiny_tokenizer), max_context_len=1024,
                                eos_token_id=tiny_tokenizer.eos_token_id,
                                responder=script) as fake:
        cfg = make_cfg(tiny_model_dir, fake.url, "rollout.agent.turn_discount=0.5")
        async with open_rollout(cfg, "sample_agents.AgentsSDKResponsesAgent") as stack:
            ep = await stack.controller.run_episode({"question": "add 1 and 2"})
            assert stack.proxy.sessions.num_prefix_breaks == 0
            assert len(stack.proxy.sessions) == 0
    assert not ep.failed and ep.num_completions == 2, ep.error
    assert [s.raw_reward for s in ep.samples] == [0.5, 1.0]
    assert [s.reward for s in ep.samples] == pytest.approx([0.5 + 0.5, 1.0])
    first, second = (s.completion_ids[0] for s in ep.samples)
    assert first.startswith("resp_") and second.startswith("resp_")
    prompt = tiny_tokenizer.decode(script.prompts[1])
    assert "<tool_response>\n3\n</tool_response>" in prompt and "Use the add tool." in prompt


async def test_agents_sdk_streamed_run(env):  # noqa: F811
    agents = pytest.importorskip("agents")
    env.script.replies.append("agent streams hi")
    session = env.stack.proxy.sessions.start()
    model = agents.OpenAIResponsesModel(model="default", openai_client=env.client(session.key))
    agent = agents.Agent(name="greeter", instructions="Be brief.", model=model)
    result = agents.Runner.run_streamed(agent, "hi",
                                        run_config=agents.RunConfig(tracing_disabled=True))
    async for _ in result.stream_events():
        pass
    assert result.final_output == "agent streams hi"
    (node,) = session.cache.nodes
    assert result.raw_responses[0].response_id == node.id
