"""The reference documents' names work: an AgentWorkflow subclass with `run(self, data)`,
the `run_and_submit` module (imported, and run as a script), `rollout.openai.mode`, and
`--config`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from areal_lite.cli import main
from areal_lite.config_toml import loads_config
from areal_lite.rollout.agent import LegacyAgent, resolve_workflow, takes_extra_kwargs
from areal_lite.rollout.stack import open_rollout

TESTS = Path(__file__).resolve().parents[1]


def _cfg(model_dir, tmp_path, *extra):
    return loads_config("", [f"actor.path={model_dir}", "actor.device=cpu", f"run_dir={tmp_path}",
                             "rollout.sampling.max_new_tokens=4", "rollout.agent.subproc_max_workers=1",
                             *extra])


def test_rollout_openai_mode_is_an_alias():
    cfg = loads_config('[rollout.openai]\nmode = "subproc"\n')
    assert cfg.rollout.agent.mode == "subproc"
    with pytest.raises(ValueError, match="rollout.openai.mode is its older name"):
        loads_config('[rollout.agent]\nmode = "online"\n[rollout.openai]\nmode = "subproc"\n')


async def test_documented_agent_workflow_subclass_runs_in_a_subprocess(tiny_model_dir, tmp_path):
    wf = resolve_workflow("reference_agents.MyAgentWorkflow")
    assert not takes_extra_kwargs(wf)  # run(self, data): it reads OPENAI_* from the env
    async with open_rollout(_cfg(tiny_model_dir, tmp_path), wf) as stack:
        assert stack.controller.pool is not None  # chosen for it, though mode = inline
        ep = await stack.controller.run_episode({"question": "hi"})
    assert not ep.failed and ep.reward == 0.75 and ep.samples[0].raw_reward == 0.75


async def test_run_and_submit_posts_rewards_to_the_proxy(tiny_model_dir, tmp_path):
    """The module run as a script (JSON row on stdin, env vars), and through the pool."""
    async with open_rollout(_cfg(tiny_model_dir, tmp_path), LegacyAgent(
            "reference_agents", "run_and_submit")) as stack:
        session = stack.proxy.sessions.start()
        env = {**os.environ, "OPENAI_BASE_URL": stack.proxy.base_url,
               "OPENAI_API_KEY": session.key,
               "PYTHONPATH": os.pathsep.join([str(TESTS.parent / "src"), str(TESTS)])}
        proc = await _run_script(TESTS / "reference_agents.py", env, {"question": "hi"})
        assert proc == 0
        (node,) = session.cache.nodes
        assert session.cache.raw_reward(node.id) == 0.75
        stack.proxy.sessions.end(session.id)
        ep = await stack.controller.run_episode({"question": "hi"})  # rewards posted, not returned
    assert not ep.failed and [s.raw_reward for s in ep.samples] == [0.75]


async def _run_script(path: Path, env: dict, row: dict) -> int:
    import asyncio

    proc = await asyncio.create_subprocess_exec(sys.executable, str(path), env=env,
                                                stdin=subprocess.PIPE)
    await proc.communicate((json.dumps(row) + "\n").encode())
    return proc.returncode


def test_config_flag_as_in_the_reference_documents(tiny_model_dir, tmp_path, capsys):
    cfg = tmp_path / "x.toml"
    cfg.write_text(f'workflow = "sample_agents.ChatAgent"\n[actor]\npath = "{tiny_model_dir}"\n'
                   'device = "cpu"\n[rollout]\nbatch_size = 1\ngroup_size = 1\n')
    assert main(["rollout", "--config", str(cfg), "rollout.sampling.max_new_tokens=3",
                 f"run_dir={tmp_path}"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["episodes"] == 1
    with pytest.raises(SystemExit):
        main(["train", str(cfg), "--config", str(cfg)])
