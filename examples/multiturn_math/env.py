"""The multi-turn math agent of the older AReaL documentation, as a gym-style environment.

The environment asks a question; the agent answers; a correct \\boxed{} answer ends the
episode with reward 1, a wrong one gets "wrong, try again" feedback (reward 0) until
`max_turns` answers were given. Trained by `config.toml` beside this file with the
token-level agent `areal_lite.rollout.env.TokenEnvWorkflow` (or, for a chat agent,
`ChatEnvWorkflow`): every answer is one completion of the same chain, rewarded by `step`.
"""

from __future__ import annotations

from areal_lite.data.rewards import math_reward

PROMPT = "{question}\nPut the final answer in \\boxed{{}}."
FEEDBACK = "Your answer is wrong. Please think again and give the final answer in \\boxed{}."


class MathEnv:
    def __init__(self, max_turns: int = 3) -> None:
        self.max_turns = max_turns
        self.answer, self.turns = "", 0

    async def reset(self, seed=None, options=None):
        row = options or {}
        self.answer, self.turns = row["answer"], 0
        return PROMPT.format(question=row["question"]), {}

    async def step(self, action: str):
        self.turns += 1
        reward = math_reward(action, self.answer)
        terminated = reward == 1.0
        truncated = not terminated and self.turns >= self.max_turns
        return ("" if terminated else FEEDBACK), reward, terminated, truncated, {}
