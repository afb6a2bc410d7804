"""The shipped workflows' test bench: a fake SGLang server scripted like a model that
uses the tools it is offered (a handoff first, else the calculator once, then answers),
and a 1-step training run of the tiny model through the real proxy."""

from __future__ import annotations

import re

import pytest

from areal_lite.config_toml import loads_config
from areal_lite.rollout.controller import RolloutController
from areal_lite.testing.fake_sglang.server import FakeSGLangServer

ANSWER = "3 + 4 = 7. The answer is \\boxed{7}."


def scripted_reply(prompt: str) -> str:
    """What the scripted model says after `prompt` (the rendered chat): a handoff when
    offered one and not just handed off, else the calculator until it answered (7)."""
    before_reply = prompt.rsplit("<|im_start|>", 2)[-2]  # the last message
    tools = re.findall(r'"name": "(\w+)"', prompt.partition("<tools>")[2].partition("</tools>")[0])
    handoff = [t for t in tools if t.startswith("transfer_to")]
    if handoff and "<tool_response>" not in before_reply:
        return f'<tool_call>\n{{"name": "{handoff[0]}", "arguments": {{}}}}\n</tool_call>'
    if "calculator" in tools and "<tool_response>\n7\n</tool_response>" not in prompt:
        return ('<tool_call>\n{"name": "calculator", "arguments": '
                '{"expression": "3 + 4"}}\n</tool_call>')
    return ANSWER


class ToolUsingModel:
    def __init__(self, tok) -> None:
        self.tok, self.replies = tok, []

    def __call__(self, input_ids, sampling):
        reply = scripted_reply(self.tok.decode(input_ids))
        self.replies.append(reply)
        return self.tok.encode(reply, add_special_tokens=False) + [self.tok.eos_token_id]


@pytest.fixture
def train_one_step(tiny_model_dir, tiny_tokenizer, tmp_path, monkeypatch):
    """`await train_one_step("pkg.mod.Class", **agent_kwargs)` trains 1 step (2 groups of 2
    episodes, concat export) and returns (last metrics, groups trained, model replies)."""
    from areal_lite.trainer import Trainer

    groups = []
    original = RolloutController.run_group

    async def recording(self, row, n, **kwargs):
        group = await original(self, row, n, **kwargs)
        groups.append(group)
        return group

    monkeypatch.setattr(RolloutController, "run_group", recording)

    async def run(workflow: str, **agent_kwargs):
        model = ToolUsingModel(tiny_tokenizer)
        async with FakeSGLangServer(vocab_size=len(tiny_tokenizer), max_context_len=2048,
                                    eos_token_id=tiny_tokenizer.eos_token_id,
                                    responder=model) as fake:
            kwargs = ", ".join(f"{k} = {v!r}" for k, v in {"max_tokens": 64, **agent_kwargs}.items())
            cfg = loads_config(f"""
workflow = "{workflow}"
run_dir = "{tmp_path}"
[actor]
path = "{tiny_model_dir}"
device = "cpu"
[rollout]
backend = "sglang"
batch_size = 2
group_size = 2
episode_timeout_s = 120
[rollout.sglang]
urls = ["{fake.url}"]
[rollout.agent]
export_style = "concat"
agent_kwargs = {{ {kwargs} }}
[rollout.sampling]
max_new_tokens = 64
[trainer]
total_steps = 1
eval_every = 0
save_every = 0
[metrics]
progress = false
plots = false
""")
            trainer = Trainer(cfg)
            last = await trainer.atrain()
        assert trainer.step == 1 and last["train/num_tokens"] > 0
        assert last["rollout/episodes_failed"] == 0
        return last, list(groups), model.replies

    return run


def assert_linked_turns(groups, at_least: int = 2) -> None:
    """Every episode made >= `at_least` completions, chained in its tree (one concat
    sample covers them all)."""
    for g in groups:
        for ep in g.episodes:
            assert ep.num_completions >= at_least, ep
            assert max(len(s.completion_ids) for s in ep.samples) >= at_least
