"""Rollout stage: workflows on the OpenAI SDK (chat completions), the base install.

- `MathAgent`: one completion per episode; the reward of its \\boxed{} answer.
- `MultiTurnMathAgent`: answer, "wrong, try again", up to `max_turns`; each turn's
  reward keyed by its completion id (1 for the turn that got it right).
- `MathToolAgent`: a calculator tool; the model calls it, sees the result, answers. Each
  model call is one completion, the next continuing it in the tree.
"""

from __future__ import annotations

import json
from typing import Any

from areal_lite.workflows.math_task import (
    CALCULATOR_TOOL,
    PROMPT,
    RETRY,
    TOOL_PROMPT,
    calculator,
    reward,
)


def _client(kwargs: dict) -> Any:
    from openai import AsyncOpenAI

    return AsyncOpenAI(base_url=kwargs["base_url"], api_key=kwargs["api_key"],
                       http_client=kwargs.get("http_client"), max_retries=0)


class MathAgent:
    def __init__(self, model: str = "default", max_tokens: int = 256,
                 temperature: float = 1.0) -> None:
        self.model, self.max_tokens, self.temperature = model, max_tokens, temperature

    async def run(self, data: dict, **kwargs: Any) -> float:
        resp = await _client(kwargs).chat.completions.create(
            model=self.model, max_tokens=self.max_tokens, temperature=self.temperature,
            messages=[{"role": "user", "content": PROMPT.format(question=data["question"])}])
        return reward(resp.choices[0].message.content, data)


class MultiTurnMathAgent(MathAgent):
    def __init__(self, max_turns: int = 3, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.max_turns = max_turns

    async def run(self, data: dict, **kwargs: Any) -> dict[str, float]:
        client = _client(kwargs)
        messages = [{"role": "user", "content": PROMPT.format(question=data["question"])}]
        rewards: dict[str, float] = {}
        for _ in range(self.max_turns):
            resp = await client.chat.completions.create(
                model=self.model, messages=messages, max_tokens=self.max_tokens,
                temperature=self.temperature)
            text = resp.choices[0].message.content or ""
            rewards[resp.id] = reward(text, data)
            if rewards[resp.id] == 1.0:
                break
            messages += [{"role": "assistant", "content": text},
                         {"role": "user", "content": RETRY}]
        return rewards


class MathToolAgent(MathAgent):
    def __init__(self, max_turns: int = 4, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.max_turns = max_turns

    async def run(self, data: dict, **kwargs: Any) -> float:
        client = _client(kwargs)
        messages: list[dict] = [{"role": "user",
                                 "content": TOOL_PROMPT.format(question=data["question"])}]
        text = ""
        for _ in range(self.max_turns):
            resp = await client.chat.completions.create(
                model=self.model, messages=messages, tools=[CALCULATOR_TOOL],
                max_tokens=self.max_tokens, temperature=self.temperature)
            message = resp.choices[0].message
            text = message.content or ""
            if not message.tool_calls:
                break
            messages.append(message.model_dump(exclude_none=True))
            for call in message.tool_calls:
                try:
                    expression = json.loads(call.function.arguments).get("expression", "")
                except (json.JSONDecodeError, AttributeError):
                    expression = ""
                messages.append({"role": "tool", "tool_call_id": call.id,
                                 "content": calculator(expression)})
        return reward(text, data)  # the episode's last completion gets it
