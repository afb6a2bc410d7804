"""Rollout stage: workflows on LangChain's ChatOpenAI (`pip install 'areal-lite[langchain]'`).

- `MathAgent`: one `ainvoke`.
- `MathToolAgent`: a tool-calling agent: the model is bound to a calculator tool; its
  tool calls are run and answered with `ToolMessage`s until it replies in text.
"""

from __future__ import annotations

from typing import Any

from areal_lite.workflows import require
from areal_lite.workflows.math_task import (
    CALCULATOR_DOC,
    PROMPT,
    TOOL_PROMPT,
    calculator,
    reward,
)


class MathAgent:
    def __init__(self, model: str = "default", max_tokens: int = 256,
                 temperature: float = 1.0) -> None:
        self.model, self.max_tokens, self.temperature = model, max_tokens, temperature

    def _llm(self, kwargs: dict) -> Any:
        chat_openai = require("langchain_openai", "langchain").ChatOpenAI
        return chat_openai(model=self.model, base_url=kwargs["base_url"], api_key=kwargs["api_key"],
                           http_async_client=kwargs.get("http_client"), max_retries=0,
                           max_tokens=self.max_tokens, temperature=self.temperature)

    async def run(self, data: dict, **kwargs: Any) -> float:
        reply = await self._llm(kwargs).ainvoke(PROMPT.format(question=data["question"]))
        return reward(str(reply.content), data)


class MathToolAgent(MathAgent):
    def __init__(self, max_turns: int = 4, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.max_turns = max_turns

    async def run(self, data: dict, **kwargs: Any) -> float:
        messages_mod = require("langchain_core.messages", "langchain")
        tool = require("langchain_core.tools", "langchain").StructuredTool.from_function(
            calculator, name="calculator", description=CALCULATOR_DOC)
        llm = self._llm(kwargs).bind_tools([tool])
        history: list = [messages_mod.HumanMessage(TOOL_PROMPT.format(question=data["question"]))]
        reply = None
        for _ in range(self.max_turns):
            reply = await llm.ainvoke(history)
            history.append(reply)
            if not reply.tool_calls:
                break
            for call in reply.tool_calls:
                result = calculator(str(call["args"].get("expression", "")))
                history.append(messages_mod.ToolMessage(result, tool_call_id=call["id"]))
        return reward(str(reply.content) if reply is not None else "", data)
