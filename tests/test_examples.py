"""The shipped examples: their configs load, and the GSM8K agent asks and scores as
documented (through the real proxy, with the tiny model)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from areal_lite.config_toml import load_config
from areal_lite.data.arithmetic import _is_eval_key
from areal_lite.runtime import limit_malloc_growth

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from examples.gsm8k.agent import EXAMPLES, MathAgent, build_messages  # noqa: E402


@pytest.mark.parametrize("path", sorted((ROOT / "examples").rglob("*.toml")), ids=lambda p: p.name)
def test_example_configs_load(path):
    cfg = load_config(path)
    assert cfg.workflow or path.name == "rollout_demo.toml" or cfg.rollout.agent.mode == "online"


def test_cpu_example_uses_few_shot_prompt_with_bf16_learner():
    cfg = load_config(ROOT / "examples/gsm8k/cpu.toml")
    assert cfg.rollout.agent.agent_kwargs["few_shot"] >= 1
    assert cfg.train.compute_dtype == "bfloat16"


def test_build_messages_plain_and_few_shot():
    plain = build_messages("What is 1 + 1?")
    assert plain == [{"role": "user", "content": plain[0]["content"]}]
    assert "What is 1 + 1?" in plain[0]["content"] and "\\boxed{}" in plain[0]["content"]
    shot = build_messages("What is 1 + 1?", few_shot=2)
    assert [m["role"] for m in shot] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert shot[-1]["content"] == "What is 1 + 1?"
    assert all("\\boxed{" in m["content"] for m in shot if m["role"] == "assistant")
    with pytest.raises(ValueError, match="few_shot"):
        MathAgent(few_shot=len(EXAMPLES) + 1)


def test_few_shot_examples_are_not_eval_problems():
    """A worked example in the prompt must not hand the model an eval answer."""
    import re

    for question, _ in EXAMPLES:
        a, b = (int(x) for x in re.findall(r"\d+", question)[:2])
        for level in (0, 1):
            assert not _is_eval_key(f"{level}:{a}+{b}"), question


def test_limit_malloc_growth_applies_on_glibc_and_respects_the_env(monkeypatch):
    import os

    if not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None:
        assert limit_malloc_growth() is False
        return
    assert limit_malloc_growth() is True
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert limit_malloc_growth() is True  # nothing left to set: the user's values stay


async def test_math_agent_episode_through_the_proxy(tiny_model_dir, tmp_path):
    """One episode of the example agent against the tiny model: it runs, gets a reply and
    a reward in {0, 1}, and exports one sample whose prompt holds the worked example."""
    from areal_lite.config_toml import loads_config
    from areal_lite.rollout.stack import open_rollout

    cfg = loads_config(f"""
workflow = "examples.gsm8k.agent.MathAgent"
run_dir = "{tmp_path}"
[actor]
path = "{tiny_model_dir}"
device = "cpu"
[rollout.agent]
agent_kwargs = {{ max_tokens = 8, few_shot = 1 }}
[rollout.sampling]
max_new_tokens = 8
""")
    async with open_rollout(cfg) as stack:
        ep = await stack.controller.run_episode({"question": "What is 3 + 4?",
                                                 "answer": "3 + 4 = 7\n#### 7"})
        prompt_text = stack.tokenizer.decode(ep.samples[0].input_ids)
    assert not ep.failed and ep.reward in (0.0, 1.0)
    assert len(ep.samples) == 1 and "7 + 8 = 15" in prompt_text and "What is 3 + 4?" in prompt_text
