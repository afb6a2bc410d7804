"""The framework workflows (OpenAI Agents SDK, LangChain, Anthropic): each trains 1 step
through the proxy with its real SDK; tool and handoff workflows make linked turns."""

from __future__ import annotations

import pytest
from workflow_bench import ANSWER, assert_linked_turns

from areal_lite.workflows import require


@pytest.mark.parametrize("workflow", ["langchain.MathAgent", "anthropic.MathAgent"])
async def test_single_call_workflows(train_one_step, workflow):
    last, groups, replies = await train_one_step(f"areal_lite.workflows.{workflow}")
    assert all(ep.num_completions == 1 for g in groups for ep in g.episodes)
    assert set(replies) == {ANSWER}


@pytest.mark.parametrize("workflow", ["openai_agents.MathToolAgent", "langchain.MathToolAgent",
                                      "anthropic.MathToolAgent"])
async def test_tool_workflows_call_the_calculator(train_one_step, workflow):
    last, groups, replies = await train_one_step(f"areal_lite.workflows.{workflow}")
    assert_linked_turns(groups, 2)
    assert any('"calculator"' in r for r in replies) and ANSWER in replies


async def test_openai_agents_handoff(train_one_step):
    last, groups, replies = await train_one_step("areal_lite.workflows.openai_agents.HandoffMathAgent")
    # triage: transfer_to_math; the math agent: calculator, answer. The math agent's own
    # system prompt and tools start a new root (a prefix break), its two turns a chain.
    assert all(ep.num_completions == 3 for g in groups for ep in g.episodes)
    assert_linked_turns(groups, 2)
    assert any("transfer_to_math" in r for r in replies)
    assert last["cache/prefix_breaks"] >= 4


def test_a_missing_framework_names_its_extra():
    with pytest.raises(ImportError, match=r"pip install 'areal-lite\[nope\]'"):
        require("areal_lite_no_such_framework", "nope")
