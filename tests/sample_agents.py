"""Agent workflows used by the tests (importable by dotted path and by subprocesses)."""

from __future__ import annotations

import os

import numpy as np
from openai import AsyncOpenAI, OpenAI


def _client(kwargs) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=kwargs["base_url"], api_key=kwargs["api_key"],
                       http_client=kwargs.get("http_client"), max_retries=0)


class ChatAgent:
    """K turns of chat; reward = number of turns whose reply is non-empty."""

    def __init__(self, turns: int = 1, max_tokens: int = 8) -> None:
        self.turns, self.max_tokens = turns, max_tokens

    async def run(self, data, **kwargs):
        client = _client(kwargs)
        messages = [{"role": "user", "content": data["question"]}]
        for k in range(self.turns):
            resp = await client.chat.completions.create(
                model="default", messages=messages, max_tokens=self.max_tokens)
            messages += [{"role": "assistant", "content": resp.choices[0].message.content},
                         {"role": "user", "content": f"and then {k}?"}]
        return float(self.turns)


class TurnRewardAgent:
    """3 turns, each continuing the last; each turn's reward (keyed by completion id)
    depends on its reply, so turns and groups differ (for multi-turn RL tests)."""

    async def run(self, data, **kwargs):
        client = _client(kwargs)
        messages = [{"role": "user", "content": data["question"]}]
        rewards = {}
        for _ in range(3):
            resp = await client.chat.completions.create(
                model="default", messages=messages, max_tokens=6)
            text = resp.choices[0].message.content or ""
            rewards[resp.id] = (len(text) % 3) / 2
            messages += [{"role": "assistant", "content": text},
                         {"role": "user", "content": "try again"}]
        return rewards


class DictRewardAgent:
    """Two calls; rewards keyed by completion id."""

    async def run(self, data, **kwargs):
        client = _client(kwargs)
        ids = []
        for q in ("one", "two"):
            resp = await client.chat.completions.create(
                model="default", messages=[{"role": "user", "content": q}], max_tokens=4)
            ids.append(resp.id)
        return {ids[0]: 0.25, ids[1]: np.float32(1.0)}


class FailingAgent:
    async def run(self, data, **kwargs):
        if data.get("fail"):
            raise RuntimeError("agent exploded on purpose")
        await _client(kwargs).chat.completions.create(
            model="default", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        return 1


def _env_client() -> OpenAI:
    """The sync client a subprocess agent builds from its environment."""
    return OpenAI(base_url=os.environ["OPENAI_BASE_URL"],
                  api_key=os.environ["OPENAI_API_KEY"], max_retries=0)


class UnpicklableErrorAgent:
    """Subprocess style: raises the SDK's BadRequestError (needs keyword arguments, so
    it does not unpickle in the parent) when asked to; otherwise one call, reward 1."""

    async def run(self, data, **kwargs):
        import httpx
        import openai

        if data.get("fail"):
            response = httpx.Response(400, request=httpx.Request("POST", "http://x/v1"))
            raise openai.BadRequestError("bad on purpose", response=response, body=None)
        _env_client().chat.completions.create(
            model="default", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        return 1


class DyingAgent:
    """Subprocess style: its worker process dies (os._exit) when asked to; otherwise one
    call, reward 1."""

    async def run(self, data, **kwargs):
        if data.get("die"):
            os._exit(3)
        _env_client().chat.completions.create(
            model="default", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        return 1


class BadRewardAgent:
    async def run(self, data, **kwargs):
        await _client(kwargs).chat.completions.create(
            model="default", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        return "not a number"


class SyncEnvAgent:
    """Subprocess style: sync OpenAI client configured from the environment."""

    async def run(self, data, **kwargs):
        resp = _env_client().chat.completions.create(
            model="default", messages=[{"role": "user", "content": data["question"]}],
            max_tokens=4)
        return True if resp.choices[0].message.content is not None else 0


class LengthRewardAgent:
    """One turn; reward depends on the reply so groups have variance (for RL tests)."""

    seen: list = []  # question ids this process ran (tests inspect it)

    async def run(self, data, **kwargs):
        resp = await _client(kwargs).chat.completions.create(
            model="default", messages=[{"role": "user", "content": data["question"]}],
            max_tokens=6)
        LengthRewardAgent.seen.append(data.get("id"))
        return (len(resp.choices[0].message.content or "") % 3) / 2


class AnthropicAgent:
    """Two turns through the Anthropic SDK; rewards keyed by message id."""

    async def run(self, data, **kwargs):
        from anthropic import AsyncAnthropic

        client = AsyncAnthropic(base_url=kwargs["base_url"].removesuffix("/v1"),
                                api_key=kwargs["api_key"], http_client=kwargs.get("http_client"),
                                max_retries=0)
        messages = [{"role": "user", "content": data["question"]}]
        first = await client.messages.create(model="default", system="Be brief.", max_tokens=8,
                                             messages=messages)
        messages += [{"role": "assistant", "content": first.content},
                     {"role": "user", "content": "and then?"}]
        second = await client.messages.create(model="default", system="Be brief.", max_tokens=8,
                                              messages=messages)
        return {first.id: 0.25, second.id: 1.0}


class AgentsSDKResponsesAgent:
    """An OpenAI Agents SDK agent on its default Responses model, with one function tool;
    rewards keyed by response id (one per model call)."""

    async def run(self, data, **kwargs):
        import agents

        @agents.function_tool
        def add(a: int, b: int) -> int:
            """Add two integers."""
            return a + b

        model = agents.OpenAIResponsesModel(model="default", openai_client=_client(kwargs))
        agent = agents.Agent(name="adder", instructions="Use the add tool.", model=model,
                             tools=[add])
        result = await agents.Runner.run(agent, data["question"],
                                         run_config=agents.RunConfig(tracing_disabled=True))
        ids = [r.response_id for r in result.raw_responses]
        return {rid: 0.5 * (k + 1) for k, rid in enumerate(ids)}
