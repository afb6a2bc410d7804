"""Rollout stage: workflows on the Anthropic SDK's Messages API
(`pip install 'areal-lite[anthropic]'`); the proxy serves `/v1/messages`.

- `MathAgent`: one message.
- `MathToolAgent`: a calculator tool; `tool_use` blocks are answered with `tool_result`
  blocks until the model replies in text.
"""

from __future__ import annotations

from typing import Any

from areal_lite.workflows import require
from areal_lite.workflows.math_task import (
    CALCULATOR_DOC,
    CALCULATOR_PARAMS,
    PROMPT,
    TOOL_PROMPT,
    calculator,
    reward,
)

TOOL = {"name": "calculator", "description": CALCULATOR_DOC, "input_schema": CALCULATOR_PARAMS}


def _text(message: Any) -> str:
    return "".join(b.text for b in message.content if b.type == "text")


class MathAgent:
    # no temperature: this SDK's `messages.create` takes none; the run's
    # rollout.sampling.temperature applies
    def __init__(self, model: str = "default", max_tokens: int = 256) -> None:
        self.model, self.max_tokens = model, max_tokens

    def _client(self, kwargs: dict) -> Any:
        anthropic = require("anthropic", "anthropic")
        return anthropic.AsyncAnthropic(base_url=kwargs["base_url"].removesuffix("/v1"),
                                        api_key=kwargs["api_key"],
                                        http_client=kwargs.get("http_client"), max_retries=0)

    async def run(self, data: dict, **kwargs: Any) -> float:
        message = await self._client(kwargs).messages.create(
            model=self.model, max_tokens=self.max_tokens,
            messages=[{"role": "user", "content": PROMPT.format(question=data["question"])}])
        return reward(_text(message), data)


class MathToolAgent(MathAgent):
    def __init__(self, max_turns: int = 4, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.max_turns = max_turns

    async def run(self, data: dict, **kwargs: Any) -> float:
        client = self._client(kwargs)
        messages: list[dict] = [{"role": "user",
                                 "content": TOOL_PROMPT.format(question=data["question"])}]
        message = None
        for _ in range(self.max_turns):
            message = await client.messages.create(
                model=self.model, max_tokens=self.max_tokens,
                tools=[TOOL], messages=messages)
            calls = [b for b in message.content if b.type == "tool_use"]
            if not calls:
                break
            messages.append({"role": "assistant", "content": message.content})
            messages.append({"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": c.id,
                 "content": calculator(str(c.input.get("expression", "")))} for c in calls]})
        return reward(_text(message) if message is not None else "", data)
