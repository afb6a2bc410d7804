"""CAMEL and OpenHands workflows. CAMEL trains 1 step with the real SDK where `camel-ai`
is installed (tox env `frameworks`); openhands-sdk needs Python >= 3.12, so on 3.11 only
what surrounds the SDK call is tested (and the real run where the SDK imports)."""

from __future__ import annotations

import sys

import pytest
from workflow_bench import ANSWER

from areal_lite.workflows.openhands import MathAgent as OpenHandsMathAgent


async def test_camel_chat_agent_trains_one_step(train_one_step):
    pytest.importorskip("camel", reason="camel-ai not installed: run tox -e frameworks")
    last, groups, replies = await train_one_step("areal_lite.workflows.camel.MathAgent")
    assert all(ep.num_completions == 1 for g in groups for ep in g.episodes)
    assert set(replies) == {ANSWER}


def test_openhands_llm_points_at_the_session():
    kw = OpenHandsMathAgent(max_tokens=32).llm_kwargs("http://127.0.0.1:9/v1", "sk-sess-x")
    assert kw["base_url"] == "http://127.0.0.1:9/v1" and kw["api_key"] == "sk-sess-x"
    assert kw["model"] == "openai/default" and kw["max_output_tokens"] == 32
    assert kw["num_retries"] == 0  # the trainer's episode timeout bounds an episode


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="the SDK installs on 3.12+")
async def test_openhands_without_the_sdk_fails_naming_the_extra():
    try:
        import openhands.sdk  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.fail("openhands.sdk imported on Python < 3.12")
    with pytest.raises(ImportError, match=r"pip install 'areal-lite\[openhands\]'"):
        await OpenHandsMathAgent().run({"question": "1 + 1", "answer": "2"},
                                       base_url="http://127.0.0.1:9/v1", api_key="k")


async def test_openhands_agent_trains_one_step(train_one_step):
    pytest.importorskip("openhands.sdk", reason="openhands-sdk needs Python >= 3.12")
    last, groups, replies = await train_one_step("areal_lite.workflows.openhands.MathAgent")
    assert ANSWER in replies and all(ep.num_completions >= 1 for g in groups for ep in g.episodes)
