"""Rollout stage: a CAMEL `ChatAgent` on an OpenAI-compatible model (`pip install
'areal-lite[camel]'`).

`MathAgent` builds CAMEL's OpenAI-compatible backend on the proxy's base URL and session
key (its async client shares the run's HTTP client) and asks the question with `astep`.
Token counting is a character estimate, so CAMEL never downloads a tokenizer (tiktoken's
files are fetched from the internet on first use).
"""

from __future__ import annotations

from typing import Any

from areal_lite.workflows import require
from areal_lite.workflows.math_task import PROMPT, reward


def _char_counter() -> Any:
    """A CAMEL token counter that estimates 4 characters per token, offline."""
    base = require("camel.utils.token_counting", "camel").BaseTokenCounter

    class CharCounter(base):
        def count_tokens_from_messages(self, messages: list) -> int:
            return sum(len(str(m.get("content") or "")) for m in messages) // 4 + 4 * len(messages)

        def encode(self, text: str) -> list[int]:
            return [ord(c) for c in text]

        def decode(self, token_ids: list[int]) -> str:
            return "".join(chr(t) for t in token_ids)

    return CharCounter()


class MathAgent:
    def __init__(self, model: str = "default", max_tokens: int = 256, temperature: float = 1.0,
                 token_limit: int = 4096) -> None:
        self.model, self.max_tokens, self.temperature = model, max_tokens, temperature
        self.token_limit = token_limit

    async def run(self, data: dict, **kwargs: Any) -> float:
        require("camel", "camel")
        from camel.agents import ChatAgent
        from camel.models import ModelFactory
        from camel.types import ModelPlatformType
        from openai import AsyncOpenAI

        client = AsyncOpenAI(base_url=kwargs["base_url"], api_key=kwargs["api_key"],
                             http_client=kwargs.get("http_client"), max_retries=0)
        backend = ModelFactory.create(
            model_platform=ModelPlatformType.OPENAI_COMPATIBLE_MODEL, model_type=self.model,
            url=kwargs["base_url"], api_key=kwargs["api_key"], async_client=client,
            token_counter=_char_counter(), max_retries=0,
            model_config_dict={"max_tokens": self.max_tokens, "temperature": self.temperature})
        agent = ChatAgent(system_message="You are a careful math solver.", model=backend,
                          token_limit=self.token_limit)
        response = await agent.astep(PROMPT.format(question=data["question"]))
        return reward(response.msgs[0].content if response.msgs else "", data)
