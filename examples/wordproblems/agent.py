"""A multi-turn word-problem agent: answer in \\boxed{}, "that is not right, try again", up to 3 turns.

This is what a user writes: a plain OpenAI-SDK loop that knows nothing about areal-lite
except the reward helper. Each turn's completion gets its own reward, keyed by the
completion id (`response.id`): 1.0 for the right integer in \\boxed{}, `format_reward` for
another boxed integer, 0.0 otherwise. When a turn is wrong the agent appends the reply
and a retry message and asks again, so turn k+1 continues turn k's exact tokens and
becomes its child in the episode's tree; `rollout.agent.turn_discount` then passes part
of a later turn's reward back to the earlier ones.

The prompt is the plain instruction, in training and in evaluation alike: no worked
example, no system prompt.
"""

from __future__ import annotations

from openai import AsyncOpenAI

from areal_lite.data.rewards import integer_reward

PROMPT = "{question}\nPut the final answer in \\boxed{{}}."
RETRY = "That is not right, try again. Put the final answer in \\boxed{}."


def build_messages(question: str) -> list[dict]:
    """The first turn's chat: one user message, the question and the answer format."""
    return [{"role": "user", "content": PROMPT.format(question=question)}]


class WordProblemAgent:
    def __init__(self, model: str = "default", max_tokens: int = 64, temperature: float = 1.0,
                 max_turns: int = 3, format_reward: float = 0.0) -> None:
        if max_turns < 1:
            raise ValueError(f"agent_kwargs.max_turns must be >= 1, got {max_turns}")
        if not 0.0 <= format_reward < 1.0:
            raise ValueError(f"agent_kwargs.format_reward must be in [0, 1), got {format_reward}")
        self.model, self.max_tokens, self.temperature = model, max_tokens, temperature
        self.max_turns, self.format_reward = max_turns, format_reward

    async def run(self, data: dict, **kwargs) -> dict[str, float]:
        client = AsyncOpenAI(base_url=kwargs["base_url"], api_key=kwargs["api_key"],
                             http_client=kwargs.get("http_client"), max_retries=0)
        messages = build_messages(data["question"])
        rewards: dict[str, float] = {}  # completion id -> this turn's reward, in turn order
        for turn in range(self.max_turns):
            response = await client.chat.completions.create(
                model=self.model, messages=messages, max_tokens=self.max_tokens,
                temperature=self.temperature)
            text = response.choices[0].message.content or ""
            rewards[response.id] = self.score(text, data, turn)
            if rewards[response.id] == 1.0:
                break
            messages = [*messages, {"role": "assistant", "content": text},
                        {"role": "user", "content": RETRY}]
        return rewards

    def score(self, text: str, data: dict, turn: int) -> float:
        """Turn `turn`'s (0-based) reward: 1.0 right, `format_reward` for another boxed
        integer, else 0.0; a reward of 1.0 ends the episode."""
        del turn  # every turn is scored alike; the turn discount favours early answers
        return integer_reward(text, data["answer"], self.format_reward)
