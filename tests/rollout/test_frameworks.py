"""Agents written with other OpenAI-speaking frameworks reach the proxy unchanged."""

from __future__ import annotations

import pytest
from proxy_support import env  # noqa: F401  (fixture)


async def test_langchain_openai_chat_model(env):  # noqa: F811
    from langchain_openai import ChatOpenAI

    env.script.replies.append("hello from langchain")
    session = env.stack.proxy.sessions.start()
    llm = ChatOpenAI(model="default", base_url=env.stack.proxy.base_url, api_key=session.key,
                     http_async_client=env.stack.controller.http_client, max_retries=0,
                     max_tokens=16)
    reply = await llm.ainvoke("Say hello")
    assert reply.content == "hello from langchain"
    (node,) = session.cache.nodes
    assert reply.response_metadata["id"] == node.response_id


async def test_openai_agents_sdk(env):  # noqa: F811
    agents = pytest.importorskip("agents")
    from openai import AsyncOpenAI

    env.script.replies.append("agent says hi")
    session = env.stack.proxy.sessions.start()
    client = AsyncOpenAI(base_url=env.stack.proxy.base_url, api_key=session.key,
                         http_client=env.stack.controller.http_client, max_retries=0)
    model = agents.OpenAIChatCompletionsModel(model="default", openai_client=client)
    agent = agents.Agent(name="greeter", instructions="Be brief.", model=model)
    result = await agents.Runner.run(agent, "hi", run_config=agents.RunConfig(tracing_disabled=True))
    assert result.final_output == "agent says hi"
    assert len(session.cache) == 1
