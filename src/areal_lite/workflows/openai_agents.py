"""Rollout stage: workflows on the OpenAI Agents SDK (`pip install 'areal-lite[openai-agents]'`).

- `MathToolAgent`: one agent with a calculator `function_tool`.
- `HandoffMathAgent`: a triage agent that hands the question off to a math specialist
  (which has the calculator): a multi-agent episode, every model call one completion.

Both run on the SDK's chat-completions model pointed at the proxy (the Responses model
works too: `OpenAIResponsesModel`), tracing off; the final output's answer is the reward
of the episode's last completion.
"""

from __future__ import annotations

from typing import Any

from areal_lite.workflows import require
from areal_lite.workflows.math_task import (
    CALCULATOR_DOC,
    TOOL_PROMPT,
    calculator,
    reward,
)


class MathToolAgent:
    def __init__(self, model: str = "default", max_tokens: int = 256, temperature: float = 1.0,
                 max_turns: int = 6) -> None:
        self.model, self.max_tokens, self.temperature = model, max_tokens, temperature
        self.max_turns = max_turns

    def _model(self, kwargs: dict) -> Any:
        agents = require("agents", "openai-agents")
        from openai import AsyncOpenAI

        client = AsyncOpenAI(base_url=kwargs["base_url"], api_key=kwargs["api_key"],
                             http_client=kwargs.get("http_client"), max_retries=0)
        return agents.OpenAIChatCompletionsModel(model=self.model, openai_client=client)

    def _settings(self) -> Any:
        agents = require("agents", "openai-agents")
        return agents.ModelSettings(max_tokens=self.max_tokens, temperature=self.temperature)

    def _calculator_tool(self) -> Any:
        agents = require("agents", "openai-agents")

        def calc(expression: str) -> str:
            return calculator(expression)
        calc.__doc__ = CALCULATOR_DOC
        calc.__name__ = "calculator"
        return agents.function_tool(calc)

    def build(self, kwargs: dict) -> Any:
        """The agent the episode starts with."""
        agents = require("agents", "openai-agents")
        return agents.Agent(name="math", instructions="Solve the problem; use the calculator.",
                            model=self._model(kwargs), model_settings=self._settings(),
                            tools=[self._calculator_tool()])

    async def run(self, data: dict, **kwargs: Any) -> float:
        agents = require("agents", "openai-agents")
        result = await agents.Runner.run(
            self.build(kwargs), TOOL_PROMPT.format(question=data["question"]),
            max_turns=self.max_turns, run_config=agents.RunConfig(tracing_disabled=True))
        return reward(str(result.final_output), data)


class HandoffMathAgent(MathToolAgent):
    def build(self, kwargs: dict) -> Any:
        agents = require("agents", "openai-agents")
        specialist = super().build(kwargs)
        return agents.Agent(name="triage", instructions="Hand math questions to the math agent.",
                            model=self._model(kwargs), model_settings=self._settings(),
                            handoffs=[specialist])
