"""The GSM8K-style math agent: a plain OpenAI-SDK workflow, answer in \\boxed{}.

This is what a user writes; nothing in it knows about areal-lite except the reward
helpers. Inline, the reward is verified in a process pool with a timeout (math-verify
can hang on adversarial output); in a subprocess agent it is verified directly.
"""

from __future__ import annotations

from openai import AsyncOpenAI

from areal_lite.rewards import RewardPool, math_reward

PROMPT = "{question}\nThink step by step, then put the final answer in \\boxed{{}}."


class MathAgent:
    def __init__(self, model: str = "default", max_tokens: int = 256,
                 temperature: float = 1.0, reward_workers: int = 1,
                 reward_timeout_s: float = 10.0) -> None:
        self.model, self.max_tokens, self.temperature = model, max_tokens, temperature
        self.reward_workers, self.reward_timeout_s = reward_workers, reward_timeout_s
        self._pool: RewardPool | None = None

    async def run(self, data: dict, **kwargs) -> float:
        client = AsyncOpenAI(base_url=kwargs["base_url"], api_key=kwargs["api_key"],
                             http_client=kwargs.get("http_client"), max_retries=0)
        response = await client.chat.completions.create(
            model=self.model,
            messages=[{"role": "user", "content": PROMPT.format(question=data["question"])}],
            max_tokens=self.max_tokens,
            temperature=self.temperature,
        )
        text = response.choices[0].message.content or ""
        if kwargs.get("http_client") is None:  # subprocess mode: verify here
            return math_reward(text, data["answer"])
        if self._pool is None:
            self._pool = RewardPool(max_workers=self.reward_workers,
                                    timeout_s=self.reward_timeout_s)
            await self._pool.start()
        return await self._pool.score(math_reward, text, data["answer"])

    async def aclose(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    def __getstate__(self) -> dict:  # the pool stays in the parent process
        return {**self.__dict__, "_pool": None}
