"""areal_lite.workflows.openai: each workflow trains 1 step through the proxy."""

from __future__ import annotations

from workflow_bench import ANSWER, assert_linked_turns

from areal_lite.workflows.math_task import calculator, reward


async def test_math_agent(train_one_step):
    last, groups, replies = await train_one_step("areal_lite.workflows.openai.MathAgent")
    assert all(ep.num_completions == 1 for g in groups for ep in g.episodes)
    assert set(replies) == {ANSWER}


async def test_multi_turn_math_agent_rewards_each_turn(train_one_step):
    last, groups, _ = await train_one_step("areal_lite.workflows.openai.MultiTurnMathAgent",
                                           max_turns=2)
    wrong = [g for g in groups if reward(ANSWER, g.data) == 0.0]  # the scripted answer is 7
    assert all(ep.num_completions == 1 for g in groups if g not in wrong for ep in g.episodes)
    assert_linked_turns(wrong, 2)  # answer, "wrong, try again", answer again
    for g in wrong:
        assert all(s.raw_reward == 0.0 for ep in g.episodes for s in ep.samples)


async def test_math_tool_agent_calls_the_calculator(train_one_step):
    last, groups, replies = await train_one_step("areal_lite.workflows.openai.MathToolAgent")
    assert_linked_turns(groups, 2)
    assert any("calculator" in r for r in replies) and ANSWER in replies


def test_calculator_evaluates_arithmetic_only():
    assert calculator("(3 + 4) * 2") == "14" and calculator("7 / 2") == "3.5"
    assert calculator("__import__('os')").startswith("error")
    assert calculator("1 / 0").startswith("error") and calculator("2 ** 1000").startswith("error")
