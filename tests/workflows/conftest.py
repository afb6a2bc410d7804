"""Fixture of the workflow tests: a 1-step training run of the tiny model through the real
proxy, over a fake SGLang server scripted to use tools (workflow_bench.py)."""

from __future__ import annotations

import pytest
from workflow_bench import ToolUsingModel

from areal_lite.config_toml import loads_config
from areal_lite.rollout.controller import RolloutController
from areal_lite.testing.fake_sglang.server import FakeSGLangServer


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
