"""The GSM8K-style math agent: a plain OpenAI-SDK workflow, answer in \\boxed{}.

This is what a user writes; nothing in it knows about areal-lite except the reward
helpers. Inline, the reward is verified in a process pool with a timeout (math-verify
can hang on adversarial output); in a subprocess agent it is verified directly.
"""

from __future__ import annotations

from openai import AsyncOpenAI

from areal_lite.data.rewards import RewardPool, math_reward

PROMPT = "{question}\nThink step by step, then put the final answer in \\boxed{{}}."

# With `few_shot > 0` the question is asked bare after a short instruction and worked
# examples: tiny models (SmolLM2-135M) follow the \boxed{} format far more often this way.
SYSTEM = "Answer with the final number in \\boxed{}."
EXAMPLES = (
    ("What is 7 + 8?", "7 + 8 = 15. The answer is \\boxed{15}."),
    ("Compute 12 + 5.", "12 + 5 = 17. The answer is \\boxed{17}."),
    ("Tom has 4 apples and buys 5 more. How many apples does he have now?",
     "4 + 5 = 9. The answer is \\boxed{9}."),
)


def build_messages(question: str, few_shot: int = 0) -> list[dict]:
    """The chat for one question: a step-by-step instruction, or `few_shot` examples."""
    if few_shot <= 0:
        return [{"role": "user", "content": PROMPT.format(question=question)}]
    if few_shot > len(EXAMPLES):
        raise ValueError(f"few_shot must be <= {len(EXAMPLES)}, got {few_shot}")
    messages = [{"role": "system", "content": SYSTEM}]
    for q, a in EXAMPLES[:few_shot]:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return messages + [{"role": "user", "content": question}]


class MathAgent:
    def __init__(self, model: str = "default", max_tokens: int = 256,
                 temperature: float = 1.0, reward_workers: int = 1,
                 reward_timeout_s: float = 10.0, few_shot: int = 0) -> None:
        build_messages("", few_shot)  # a bad few_shot fails at construction, not per episode
        self.model, self.max_tokens, self.temperature = model, max_tokens, temperature
        self.few_shot = few_shot
        self.reward_workers, self.reward_timeout_s = reward_workers, reward_timeout_s
        self._pool: RewardPool | None = None

    async def run(self, data: dict, **kwargs) -> float:
        client = AsyncOpenAI(base_url=kwargs["base_url"], api_key=kwargs["api_key"],
                             http_client=kwargs.get("http_client"), max_retries=0)
        response = await client.chat.completions.create(
            model=self.model,
            messages=build_messages(data["question"], self.few_shot),
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
