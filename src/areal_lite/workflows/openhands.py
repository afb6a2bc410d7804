"""Rollout stage: the OpenHands SDK's agent pointed at the proxy (`pip install
'areal-lite[openhands]'`; openhands-sdk needs Python >= 3.12).

`MathAgent` gives an OpenHands `Agent` (no tools: it answers in text) an `LLM` on the
proxy's base URL and session key, sends the question to a local `Conversation` in a
scratch workspace and runs it (the SDK's loop is synchronous: it runs in a worker
thread). The reward is that of the agent's final response. OpenHands calls the model
through LiteLLM, so the model name carries LiteLLM's provider prefix ("openai/...").
"""

from __future__ import annotations

import asyncio
import tempfile
from typing import Any

from areal_lite.workflows import require
from areal_lite.workflows.math_task import PROMPT, reward


class MathAgent:
    def __init__(self, model: str = "default", max_tokens: int = 256, temperature: float = 1.0,
                 max_iterations: int = 4) -> None:
        self.model, self.max_tokens, self.temperature = model, max_tokens, temperature
        self.max_iterations = max_iterations

    def llm_kwargs(self, base_url: str, api_key: str) -> dict[str, Any]:
        """Keyword arguments of the OpenHands `LLM` for this episode's session."""
        return {"model": f"openai/{self.model}", "base_url": base_url, "api_key": api_key,
                "usage_id": "areal-lite", "max_output_tokens": self.max_tokens,
                "temperature": self.temperature, "num_retries": 0}

    def _episode(self, question: str, base_url: str, api_key: str) -> str:
        sdk = require("openhands.sdk", "openhands")
        from openhands.sdk.conversation.response_utils import get_agent_final_response

        agent = sdk.Agent(llm=sdk.LLM(**self.llm_kwargs(base_url, api_key)), tools=[])
        with tempfile.TemporaryDirectory(prefix="areal-lite-openhands-") as workspace:
            conversation = sdk.Conversation(agent=agent, workspace=workspace,
                                            max_iteration_per_run=self.max_iterations)
            conversation.send_message(PROMPT.format(question=question))
            conversation.run()
            return get_agent_final_response(conversation.state.events)

    async def run(self, data: dict, **kwargs: Any) -> float:
        text = await asyncio.to_thread(self._episode, data["question"], kwargs["base_url"],
                                       kwargs["api_key"])
        return reward(text, data)
