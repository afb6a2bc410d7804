"""The proxy driven by the real OpenAI SDK, over a faithful fake SGLang server."""

from __future__ import annotations

import json

import httpx2
import openai
import pytest
from openai import AsyncOpenAI
from proxy_support import Env, Script, make_cfg, stop_string_stack  # noqa: F401

from areal_lite.export import export_concat, export_individual
from areal_lite.rollout.stack import open_rollout
from areal_lite.testing.fake_sglang.server import FakeSGLangServer


async def test_single_turn_records_exact_tokens(env, tiny_tokenizer):
    env.script.replies.append("The answer is 42.")
    session = env.stack.proxy.sessions.start()
    resp = await env.client(session.key).chat.completions.create(
        model="default", messages=[{"role": "user", "content": "What is 6 * 7?"}],
        max_tokens=32, logprobs=True)
    assert resp.id.startswith("chatcmpl-")
    assert resp.choices[0].message.content == "The answer is 42."
    assert resp.choices[0].finish_reason == "stop"
    (node,) = session.cache.nodes
    assert node.id == resp.id and node.parent_id is None
    assert node.prompt_ids == env.script.prompts[0]
    assert node.output_ids[-1] == tiny_tokenizer.eos_token_id
    assert len(node.logprobs) == len(node.output_ids) == len(node.versions)
    assert [c.logprob for c in resp.choices[0].logprobs.content] == pytest.approx(node.logprobs)
    assert resp.usage.completion_tokens == len(node.output_ids)


async def test_completion_ids_are_unique(env):
    client = env.client()
    ids = {(await client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": "hi"}], max_tokens=4)).id
        for _ in range(5)}
    assert len(ids) == 5


async def test_multi_turn_builds_a_chain_and_concat_matches_individual(env):
    session = env.stack.proxy.sessions.start()
    client = env.client(session.key)
    messages = [{"role": "user", "content": "Hello there!"}]
    ids = []
    for turn in range(4):
        env.script.replies.append(f"reply number {turn}")
        resp = await client.chat.completions.create(model="default", messages=messages,
                                                    max_tokens=16)
        ids.append(resp.id)
        messages += [{"role": "assistant", "content": resp.choices[0].message.content},
                     {"role": "user", "content": f"thanks {turn}"}]
    nodes = session.cache.nodes
    assert [n.parent_id for n in nodes] == [None, *ids[:-1]]
    for parent, child in zip(nodes, nodes[1:]):  # exact sampled tokens reused
        assert child.prompt_ids[: len(parent.prompt_ids) + len(parent.output_ids)] == (
            parent.prompt_ids + parent.output_ids)
    session.cache.set_last_reward(1.0)
    (concat,) = export_concat(session.cache, gamma=0.9)
    individual = export_individual(session.cache, gamma=0.9)
    for node, sample in zip(nodes, individual):
        span = slice(len(node.prompt_ids), len(node.prompt_ids) + len(node.output_ids))
        assert concat.input_ids[span] == sample.input_ids[span]
        assert concat.logprobs[span] == sample.logprobs[span]
        assert concat.loss_mask[span] == [1] * len(node.output_ids)
    assert sum(concat.loss_mask) == sum(sum(s.loss_mask) for s in individual)
    assert [s.reward for s in individual] == pytest.approx([0.9**3, 0.9**2, 0.9, 1.0])
    assert env.stack.proxy.sessions.num_prefix_breaks == 0


async def test_prefix_break_when_history_is_rewritten(env):
    session = env.stack.proxy.sessions.start()
    client = env.client(session.key)
    await client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": "hi"}], max_tokens=8)
    await client.chat.completions.create(model="default", max_tokens=8, messages=[
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "something else"},
        {"role": "user", "content": "next"}])
    assert [n.parent_id for n in session.cache.nodes] == [None, None]
    assert session.num_prefix_breaks == 1


async def test_tool_call_round_trip(env):
    tools = [{"type": "function", "function": {
        "name": "add", "description": "add two ints",
        "parameters": {"type": "object", "properties": {"a": {"type": "integer"},
                                                        "b": {"type": "integer"}}}}}]
    env.script.replies.append('<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>')
    env.script.replies.append("The sum is 3.")
    session = env.stack.proxy.sessions.start()
    client = env.client(session.key)
    messages = [{"role": "user", "content": "add 1 and 2"}]
    first = await client.chat.completions.create(model="default", messages=messages,
                                                 tools=tools, max_tokens=64)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.function.name == "add" and json.loads(call.function.arguments) == {"a": 1, "b": 2}
    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": "3"}]
    second = await client.chat.completions.create(model="default", messages=messages,
                                                  tools=tools, max_tokens=64)
    assert second.choices[0].message.content == "The sum is 3."
    assert session.cache.get(second.id).parent_id == first.id


async def test_streaming_matches_non_streaming(env):
    text = "streaming works, token by token"
    env.script.replies.extend([text])
    session = env.stack.proxy.sessions.start()
    stream = await env.client(session.key).chat.completions.create(
        model="default", messages=[{"role": "user", "content": "go"}], max_tokens=64,
        stream=True, stream_options={"include_usage": True})
    pieces, finish, usage, ids = [], None, None, set()
    async for chunk in stream:
        ids.add(chunk.id)
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            pieces.append(c.delta.content or "")
            finish = c.finish_reason or finish
    assert "".join(pieces) == text and finish == "stop"
    (node,) = session.cache.nodes
    assert ids == {node.id}
    assert usage.completion_tokens == len(node.output_ids)


async def test_streaming_tool_call(env):
    env.script.replies.append('<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>')
    stream = await env.client().chat.completions.create(
        model="default", messages=[{"role": "user", "content": "call f"}], stream=True,
        tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])
    calls, finish = [], None
    async for chunk in stream:
        for c in chunk.choices:
            calls += c.delta.tool_calls or []
            finish = c.finish_reason or finish
    assert finish == "tool_calls" and [c.function.name for c in calls] == ["f"]


async def test_n_choices_share_a_response_id(env):
    env.script.replies.extend(["a", "b", "c"])
    session = env.stack.proxy.sessions.start()
    resp = await env.client(session.key).chat.completions.create(
        model="default", messages=[{"role": "user", "content": "pick"}], n=3, max_tokens=4)
    assert sorted(c.message.content for c in resp.choices) == ["a", "b", "c"]
    assert [c.index for c in resp.choices] == [0, 1, 2]
    assert len(session.cache) == 3
    session.cache.set_reward(resp.id, 2.0)
    assert all(session.cache.raw_reward(n.id) == 2.0 for n in session.cache.nodes)


async def test_over_tcp_without_injected_client(env):
    async with env.client(in_process=False) as client:
        resp = await client.chat.completions.create(
            model="default", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        assert resp.choices[0].message.content == "ok fine"
        models = await client.models.list()
    assert [m.id for m in models.data] == ["default"]


async def test_foreign_and_unknown_keys_are_rejected(env):
    with pytest.raises(openai.AuthenticationError):
        await env.client("sk-sess-not-a-key").chat.completions.create(
            model="default", messages=[{"role": "user", "content": "hi"}])
    a = env.stack.proxy.sessions.start()
    b = env.stack.proxy.sessions.start()
    await env.client(a.key).chat.completions.create(
        model="default", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert len(a.cache) == 1 and len(b.cache) == 0
    ended = env.stack.proxy.sessions.end(a.id)
    assert ended.ended
    with pytest.raises(openai.AuthenticationError):  # a finished episode's key is dead
        await env.client(a.key).chat.completions.create(
            model="default", messages=[{"role": "user", "content": "hi"}])


async def test_admin_routes_need_the_admin_key(env):
    session = env.stack.proxy.sessions.start()
    base = env.stack.proxy.base_url.removesuffix("/v1")
    async with httpx2.AsyncClient(base_url=base) as http:
        r = await http.post("/admin/sessions", headers={"Authorization": f"Bearer {session.key}"})
        as_session = r.status_code, r.json()
        r = await http.post("/admin/sessions", headers={"Authorization": "Bearer sk-sess-guess"})
        assert (r.status_code, r.json()) == as_session  # a live key looks like any wrong key
        assert as_session[0] == 401
        r = await http.post("/admin/sessions")
        assert r.status_code == 401
        admin = {"Authorization": f"Bearer {env.stack.proxy.sessions.admin_key}"}
        r = await http.post("/admin/sessions", headers=admin)
        started = r.json()
        async with env.client(started["api_key"], in_process=False) as client:
            resp = await client.chat.completions.create(
                model="default", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        r = await http.post(f"/admin/sessions/{started['session_id']}/reward", headers=admin,
                            json={"completion_id": resp.id, "reward": 0.5})
        assert r.status_code == 200
        r = await http.post(f"/admin/sessions/{started['session_id']}/end", headers=admin)
        (sample,) = r.json()["samples"]
        assert sample["reward"] == 0.5 and sample["completion_ids"] == [resp.id]


@pytest.mark.parametrize("body, fragment", [
    (b"{not json", "not valid JSON"),
    (b"[]", "JSON object"),
    (b'{"model": "default"}', "messages"),
    (b'{"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}', "temperature"),
    (b'{"messages": [{"role": "user", "content": "x"}], "n": 0}', "'n'"),
    (b'{"messages": [{"role": "wizard", "content": "x"}]}', "role"),
    (b'{"messages": [{"role": "user", "content": "x"}], "stop": 5}', "stop"),
])
async def test_malformed_requests_get_openai_errors(env, body, fragment):
    key = env.stack.proxy.sessions.start().key
    async with httpx2.AsyncClient(base_url=env.stack.proxy.base_url.removesuffix("/v1")) as http:
        r = await http.post("/v1/chat/completions", content=body,
                            headers={"Authorization": f"Bearer {key}",
                                     "content-type": "application/json"})
    assert r.status_code == 400
    err = r.json()["error"]
    assert fragment in err["message"] and err["type"] == "invalid_request_error"


async def test_context_length_exceeded(env):
    with pytest.raises(openai.BadRequestError) as info:
        await env.client().chat.completions.create(
            model="default", messages=[{"role": "user", "content": "hi"}], max_tokens=5000)
    assert info.value.code == "context_length_exceeded"


async def test_unreachable_engine_gives_503(tiny_model_dir):
    async with FakeSGLangServer(vocab_size=600, max_context_len=1024) as fake:
        async with open_rollout(make_cfg(tiny_model_dir, fake.url, "rollout.sglang.max_retries=0"),
                                "sample_agents.ChatAgent") as stack:
            await fake.stop()
            client = AsyncOpenAI(base_url=stack.proxy.base_url, max_retries=0,
                                 api_key=stack.proxy.sessions.start().key,
                                 http_client=stack.controller.http_client)
            with pytest.raises(openai.APIStatusError) as info:
                await client.chat.completions.create(
                    model="default", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
            assert info.value.status_code == 503


@pytest.mark.parametrize("stream", [False, True])
async def test_stop_strings_are_cut_from_the_text(tiny_model_dir, tiny_tokenizer, stream):
    async with stop_string_stack(tiny_model_dir, tiny_tokenizer, "alpha beta STOP gamma") as stack:
        session = stack.proxy.sessions.start()
        client = AsyncOpenAI(base_url=stack.proxy.base_url, api_key=session.key,
                             max_retries=0, http_client=stack.controller.http_client)
        kwargs = dict(model="default", messages=[{"role": "user", "content": "go"}],
                      stop=["STOP"], max_tokens=64)
        if stream:
            chunks = await client.chat.completions.create(stream=True, **kwargs)
            text = "".join([c.choices[0].delta.content or "" async for c in chunks
                            if c.choices])
        else:
            text = (await client.chat.completions.create(**kwargs)).choices[0].message.content
    assert text == "alpha beta "
    (node,) = session.cache.nodes
    assert "STOP" in tiny_tokenizer.decode(node.output_ids)  # the sampled tokens are kept whole


async def test_completion_records_the_token_limit_of_its_request(env):
    """The overlong penalty measures against the limit each request had (the agent's
    max_tokens), carried into the exported sample."""
    from areal_lite.export import export_individual

    session = env.stack.proxy.sessions.start()
    client = env.client(session.key)
    await client.chat.completions.create(model="default", messages=[{"role": "user", "content": "a"}],
                                         max_tokens=3)
    await client.chat.completions.create(model="default", messages=[{"role": "user", "content": "b"}])
    limits = [s.max_new_tokens for s in export_individual(session.cache, gamma=1.0)]
    assert limits == [3, env.stack.proxy.chat.defaults.max_new_tokens]
