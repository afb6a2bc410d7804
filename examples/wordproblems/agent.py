"""A multi-turn word-problem agent: answer in \\boxed{}, "that is not right, try again", up to 3 turns.

This is what a user writes: a plain OpenAI-SDK loop that knows nothing about areal-lite
except the reward helper. Each turn's completion gets its own reward, keyed by the
completion id (`response.id`): 1.0 for the right integer in \\boxed{}, `format_reward` for
another boxed integer that is not one of the question's own numbers (boxing a number
copied from the question is no attempt at the answer, and paying for it taught one run to
box the first number it read), `unboxed_reward` for the right number left unboxed,
`empty_box_reward` (zero or negative) for a box with no integer in it (the instruction's
empty `\\boxed{}` copied: one run's step-10 answers were mostly right but boxed empty), 0.0
otherwise. When a turn is wrong the agent appends the reply
and a retry message and asks again, so turn k+1 continues turn k's exact tokens and
becomes its child in the episode's tree; `rollout.agent.turn_discount` then passes part
of a later turn's reward back to the earlier ones.

The prompt is the plain instruction: no worked example, no system prompt. Training
only (rows whose `split` is "train"), a share `hint_prob` of the questions first shows one
worked example (a share that falls linearly to `hint_floor` over the first
`hint_decay_episodes` training episodes when that is set): the addition `HINT`, or with
`hint_by_kind` one of the question's own kind (`HINTS`: a product before a product, a
product and a sum before "a*b + c"; the two runs with it, both at 0.0, are in the
README). It is there so that a small model that
never boxes its answer unprompted (SmolLM2-135M boxes 0 of 30 eval answers) samples some
boxed answers to learn from; eval rows never get it. The draw is made per question, not
per episode, so the episodes of one GRPO group share their prompt and are compared like
with like (a group mixing hinted and plain prompts would credit the hint, not the answer).
"""

from __future__ import annotations

import random
import re

from openai import AsyncOpenAI

from areal_lite.data.rewards import integer_reward
from areal_lite.data.wordproblems import KINDS, TRAIN_TEMPLATES, worked_steps

PROMPT = "{question}\nPut the final answer in \\boxed{{}}."
RETRY = "That is not right, try again. Put the final answer in \\boxed{}."
# The worked example per kind of problem: a training problem (its key is not an eval key; a
# test checks) in the kind's first training phrasing, and its answer in the format asked for.
_HINT_NUMBERS = {"add": (4, 5, 0), "sub": (9, 3, 0), "mul": (3, 4, 0), "mul_add": (2, 5, 3),
                 "add_sub": (7, 4, 2), "mul_sub": (3, 4, 2)}


def _worked_example(kind: str) -> tuple[str, str]:
    a, b, c = _HINT_NUMBERS[kind]
    steps, result = worked_steps(kind, a, b, c)
    question = TRAIN_TEMPLATES[kind][0].format(name="Tom", item="apples", a=a, b=b, c=c)
    return question, ". ".join(steps) + f". The answer is \\boxed{{{result}}}."


HINTS: dict[str, tuple[str, str]] = {kind: _worked_example(kind) for kind in KINDS}
HINT = HINTS["add"]  # rows without a known "kind" (another dataset) are shown this one


def build_messages(question: str, hint: bool = False, kind: str = "add") -> list[dict]:
    """The first turn's chat: one user message, the question and the answer format;
    with `hint`, after one worked example of the same `kind` (a user turn and its
    answer), so the example shows the operation the question needs."""
    ask = [{"role": "user", "content": PROMPT.format(question=question)}]
    if not hint:
        return ask
    shown_q, shown_a = HINTS.get(kind, HINT)
    return [{"role": "user", "content": PROMPT.format(question=shown_q)},
            {"role": "assistant", "content": shown_a}, *ask]


class WordProblemAgent:
    def __init__(self, model: str = "default", max_tokens: int = 64, temperature: float = 1.0,
                 max_turns: int = 3, format_reward: float = 0.0, unboxed_reward: float = 0.0,
                 hint_prob: float = 0.0, hint_decay_episodes: int = 0, hint_floor: float = 0.0,
                 empty_box_reward: float = 0.0, hint_by_kind: bool = False,
                 seed: int = 0) -> None:
        if max_turns < 1:
            raise ValueError(f"agent_kwargs.max_turns must be >= 1, got {max_turns}")
        if not 0.0 <= format_reward < 1.0:
            raise ValueError(f"agent_kwargs.format_reward must be in [0, 1), got {format_reward}")
        if not 0.0 <= unboxed_reward < 1.0:
            raise ValueError(f"agent_kwargs.unboxed_reward must be in [0, 1), got {unboxed_reward}")
        if not -1.0 < empty_box_reward <= 0.0:
            raise ValueError(f"agent_kwargs.empty_box_reward must be in (-1, 0], got "
                             f"{empty_box_reward}")
        if not 0.0 <= hint_prob <= 1.0:
            raise ValueError(f"agent_kwargs.hint_prob must be in [0, 1], got {hint_prob}")
        if not 0.0 <= hint_floor <= hint_prob:
            raise ValueError(f"agent_kwargs.hint_floor must be in [0, hint_prob={hint_prob}], "
                             f"got {hint_floor}")
        if hint_decay_episodes < 0:
            raise ValueError(f"agent_kwargs.hint_decay_episodes must be >= 0, got "
                             f"{hint_decay_episodes}")
        self.model, self.max_tokens, self.temperature = model, max_tokens, temperature
        self.max_turns, self.format_reward = max_turns, format_reward
        self.unboxed_reward, self.hint_prob = unboxed_reward, hint_prob
        self.hint_decay_episodes, self.hint_floor, self.seed = hint_decay_episodes, hint_floor, seed
        self.empty_box_reward, self.hint_by_kind = empty_box_reward, hint_by_kind
        self._train_episodes = 0  # training episodes begun by this agent (the hint schedule)

    async def run(self, data: dict, **kwargs) -> dict[str, float]:
        client = AsyncOpenAI(base_url=kwargs["base_url"], api_key=kwargs["api_key"],
                             http_client=kwargs.get("http_client"), max_retries=0)
        messages = self.first_messages(data)
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

    def current_hint_prob(self) -> float:
        """`hint_prob`, falling linearly to `hint_floor` over the first
        `hint_decay_episodes` training episodes (constant when that is 0): few-shot
        mostly early in training."""
        if not self.hint_decay_episodes:
            return self.hint_prob
        left = max(0.0, 1.0 - self._train_episodes / self.hint_decay_episodes)
        return self.hint_floor + (self.hint_prob - self.hint_floor) * left

    def first_messages(self, data: dict) -> list[dict]:
        """The first turn's chat for `data`: the plain question, or (training rows only,
        with probability `current_hint_prob()`) the question after one worked example.
        The draw is a hash of (`seed`, question): every episode of a question gets the
        same prompt, unless the schedule's share crosses its draw within the group."""
        if data.get("split") != "train":
            return build_messages(data["question"])
        draw = random.Random(f"{self.seed}:{data['question']}").random()
        hint = draw < self.current_hint_prob()
        self._train_episodes += 1
        kind = data.get("kind", "add") if self.hint_by_kind else "add"
        return build_messages(data["question"], hint, kind)

    def score(self, text: str, data: dict, turn: int) -> float:
        """Turn `turn`'s (0-based) reward: 1.0 right in \\boxed{}, `format_reward` for
        another boxed integer not copied from the question, `unboxed_reward` for the
        right number unboxed, `empty_box_reward` for a box with no integer, else 0.0;
        only 1.0 ends the episode."""
        del turn  # every turn is scored alike; the turn discount favours early answers
        copied = {int(n) for n in re.findall(r"\d+", data["question"])}
        return integer_reward(text, data["answer"], self.format_reward, self.unboxed_reward,
                              copied=copied, empty_reward=self.empty_box_reward)
