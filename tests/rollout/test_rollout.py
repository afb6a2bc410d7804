"""Episodes and groups: agent modes, reward forms, failure isolation, workflow lookup."""

from __future__ import annotations

import asyncio
import logging

import numpy as np
import pytest
import sample_agents
from proxy_support import make_cfg

from areal_lite.rollout.agent import (
    BadReward,
    LegacyAgent,
    check_reward,
    resolve_workflow,
)
from areal_lite.rollout.stack import open_rollout
from areal_lite.testing.fake_sglang.server import FakeSGLangServer


@pytest.fixture
async def fake(tiny_tokenizer):
    async with FakeSGLangServer(vocab_size=len(tiny_tokenizer), max_context_len=1024,
                                eos_token_id=tiny_tokenizer.eos_token_id, eos_prob=0.2) as fake:
        yield fake


@pytest.mark.parametrize("mode", ["inline", "subproc"])
async def test_group_of_multi_turn_episodes(fake, tiny_model_dir, mode):
    cfg = make_cfg(tiny_model_dir, fake.url, f"rollout.agent.mode={mode}",
                   "rollout.agent.subproc_max_workers=2", "rollout.agent.agent_kwargs={turns=3}",
                   "rollout.agent.turn_discount=0.5")
    async with open_rollout(cfg, "sample_agents:ChatAgent") as stack:
        group = await stack.controller.run_group({"question": "count with me"}, 3)
        assert len(stack.proxy.sessions) == 0  # every session freed
    assert group.num_failed == 0 and len(group.episodes) == 3
    for ep in group.episodes:
        assert ep.num_completions == 3 and ep.reward == 3.0
        assert [s.reward for s in ep.samples] == pytest.approx([0.75, 1.5, 3.0])
        assert all(s.episode_id == ep.episode_id for s in ep.samples)


async def test_subproc_agent_reads_env_and_uses_sync_client(fake, tiny_model_dir):
    cfg = make_cfg(tiny_model_dir, fake.url, "rollout.agent.mode=subproc",
                   "rollout.agent.subproc_max_workers=1")
    async with open_rollout(cfg, sample_agents.SyncEnvAgent) as stack:
        group = await stack.controller.run_group({"question": "hi"}, 2)
    assert group.num_failed == 0
    assert [ep.reward for ep in group.episodes] == [1.0, 1.0]


async def test_subproc_error_that_does_not_unpickle_fails_only_its_episode(fake,
                                                                          tiny_model_dir,
                                                                          caplog):
    """openai.BadRequestError cannot be rebuilt in the parent: it must not break the
    pool (which would fail every episode); its episode fails, naming it, the rest run."""
    cfg = make_cfg(tiny_model_dir, fake.url, "rollout.agent.mode=subproc",
                   "rollout.agent.subproc_max_workers=2")
    async with open_rollout(cfg, sample_agents.UnpicklableErrorAgent) as stack:
        bad, good = await asyncio.gather(stack.controller.run_episode({"fail": True}),
                                         stack.controller.run_episode({}))
        after = await stack.controller.run_episode({})
    assert bad.error == "exception:RuntimeError"
    logged = "\n".join(r.getMessage() + str(r.exc_info) for r in caplog.records)
    assert "openai.BadRequestError: bad on purpose" in logged
    assert not good.failed and good.reward == 1.0
    assert not after.failed and after.reward == 1.0


async def test_a_dead_subproc_worker_fails_its_episode_and_the_pool_restarts(
        fake, tiny_model_dir, caplog):
    cfg = make_cfg(tiny_model_dir, fake.url, "rollout.agent.mode=subproc",
                   "rollout.agent.subproc_max_workers=1")
    async with open_rollout(cfg, sample_agents.DyingAgent) as stack:
        first = await stack.controller.run_episode({})
        dead = await stack.controller.run_episode({"die": True})
        after = await stack.controller.run_episode({})
        restarts = stack.controller.stats.pool_restarts
    assert not first.failed and not after.failed and after.reward == 1.0
    assert dead.error == "exception:RuntimeError" and restarts == 1
    assert any("new worker pool was started" in r.getMessage() for r in caplog.records)


async def test_a_pool_that_breaks_before_any_episode_is_not_restarted(fake, tiny_model_dir,
                                                                     caplog):
    cfg = make_cfg(tiny_model_dir, fake.url, "rollout.agent.mode=subproc",
                   "rollout.agent.subproc_max_workers=1")
    async with open_rollout(cfg, sample_agents.DyingAgent) as stack:
        dead = await stack.controller.run_episode({"die": True})
        again = await stack.controller.run_episode({})
        restarts = stack.controller.stats.pool_restarts
    assert dead.failed and again.failed and restarts == 0
    assert any("not restarted" in r.getMessage() for r in caplog.records)


async def test_legacy_module_runs_in_a_subprocess(fake, tiny_model_dir):
    cfg = make_cfg(tiny_model_dir, fake.url, "agent_module_path=legacy_agent",
                   "rollout.agent.subproc_max_workers=1")
    assert cfg.workflow == "legacy_agent"
    async with open_rollout(cfg) as stack:
        assert stack.controller.pool is not None
        ep = await stack.controller.run_episode({"question": "hi"})
    assert not ep.failed and ep.reward == 0.5 and len(ep.samples) == 1


async def test_dict_rewards_keyed_by_completion_id(fake, tiny_model_dir):
    async with open_rollout(make_cfg(tiny_model_dir, fake.url), "sample_agents.DictRewardAgent") as stack:
        ep = await stack.controller.run_episode({})
    assert [s.raw_reward for s in ep.samples] == [0.25, 1.0]


async def test_failing_agent_fails_only_its_episode(fake, tiny_model_dir, caplog):
    async with open_rollout(make_cfg(tiny_model_dir, fake.url), sample_agents.FailingAgent()) as stack:
        with caplog.at_level(logging.WARNING):
            bad = await stack.controller.run_group({"fail": True}, 3)
            good = await stack.controller.run_group({"fail": False}, 2)
        assert len(stack.proxy.sessions) == 0
        stats = stack.controller.stats
    assert bad.num_failed == 3 and all(ep.error == "exception:RuntimeError" for ep in bad.episodes)
    assert good.num_failed == 0 and len(good.samples) == 2
    assert stats.num_failed == 3 and stats.failures == {"exception:RuntimeError": 3}
    logged = [r for r in caplog.records if "exploded on purpose" in r.getMessage()]
    assert len(logged) == 1  # one traceback for three identical failures


async def test_bad_reward_fails_the_episode(fake, tiny_model_dir):
    async with open_rollout(make_cfg(tiny_model_dir, fake.url), "sample_agents.BadRewardAgent") as stack:
        ep = await stack.controller.run_episode({})
    assert ep.error == "bad_reward" and ep.samples == [] and ep.num_completions == 1


async def test_episode_timeout(fake, tiny_model_dir):
    class Sleeper:
        async def run(self, data, **kwargs):
            import asyncio
            await asyncio.Event().wait()

    cfg = make_cfg(tiny_model_dir, fake.url, "rollout.episode_timeout_s=0.2")
    async with open_rollout(cfg, Sleeper()) as stack:
        ep = await stack.controller.run_episode({})
        assert len(stack.proxy.sessions) == 0
    assert ep.error == "timeout"


@pytest.mark.parametrize("value, expected", [
    (1, 1.0), (True, 1.0), (np.float64(0.5), 0.5), (np.int32(3), 3.0), (-2.5, -2.5),
    ({"a": 1, "b": np.float32(0.5)}, {"a": 1.0, "b": 0.5}),
])
def test_check_reward_accepts_numbers(value, expected):
    assert check_reward(value) == expected


@pytest.mark.parametrize("value", ["1", None, float("nan"), float("inf"), [1.0], {"a": "x"},
                                   np.array([1.0, 2.0])])
def test_check_reward_rejects_non_numbers(value):
    with pytest.raises(BadReward):
        check_reward(value)


def test_resolve_workflow_forms():
    assert isinstance(resolve_workflow("sample_agents.ChatAgent"), sample_agents.ChatAgent)
    assert isinstance(resolve_workflow("sample_agents:ChatAgent"), sample_agents.ChatAgent)
    agent = resolve_workflow(sample_agents.ChatAgent, {"turns": 4})
    assert agent.turns == 4
    instance = sample_agents.FailingAgent()
    assert resolve_workflow(instance) is instance
    assert isinstance(resolve_workflow("legacy_agent"), LegacyAgent)
    for bad, fragment in [("", "no workflow"), ("sample_agents.Nope", "cannot import"),
                          ("no_such_module_xyz.Agent", "cannot import"),
                          ("sample_agents", "has no workflow"), (object(), "run")]:
        with pytest.raises(ValueError, match=fragment):
            resolve_workflow(bad)


async def test_timeout_during_a_proxy_call_aborts_the_request(tiny_model_dir, tiny_tokenizer):
    async with FakeSGLangServer(vocab_size=len(tiny_tokenizer), max_context_len=1024,
                                eos_token_id=tiny_tokenizer.eos_token_id, latency_s=0.05) as slow:
        cfg = make_cfg(tiny_model_dir, slow.url, "rollout.episode_timeout_s=0.3")
        async with open_rollout(cfg, sample_agents.ChatAgent(turns=1, max_tokens=200)) as stack:
            ep = await stack.controller.run_episode({"question": "talk for a while"})
            assert ep.error == "timeout" and len(stack.proxy.sessions) == 0
            await slow.state.wait_until(lambda: not slow.state.in_flight, 5.0)
        assert slow.state.aborted_rids  # the engine request was aborted, not left running


async def test_inline_env_var_agent_is_told_to_use_subproc(fake, tiny_model_dir, caplog,
                                                           monkeypatch):
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    async with open_rollout(make_cfg(tiny_model_dir, fake.url), sample_agents.SyncEnvAgent) as stack:
        with caplog.at_level(logging.WARNING):
            ep = await stack.controller.run_episode({"question": "hi"})
    assert ep.error == "exception:RuntimeError"
    assert any('rollout.agent.mode = "subproc"' in r.getMessage() for r in caplog.records)


async def test_dict_reward_episode_scores_its_best_completion(fake, tiny_model_dir):
    async with open_rollout(make_cfg(tiny_model_dir, fake.url), "sample_agents.DictRewardAgent") as stack:
        ep = await stack.controller.run_episode({})
    assert ep.reward == pytest.approx(0.625) and ep.score == 1.0  # solved on the 2nd try


async def test_failures_differing_only_in_ids_are_logged_once(fake, tiny_model_dir, caplog):
    class IdFailure:
        async def run(self, data, **kwargs):
            import secrets
            raise RuntimeError(f"request rid-{secrets.token_hex(12)} failed after {data['n']} s")

    async with open_rollout(make_cfg(tiny_model_dir, fake.url), IdFailure()) as stack:
        with caplog.at_level(logging.WARNING):
            for n in range(4):
                await stack.controller.run_episode({"n": n})
    assert stack.controller.stats.failures == {"exception:RuntimeError": 4}
    assert len([r for r in caplog.records if "failed after" in r.getMessage()]) == 1


@pytest.mark.parametrize("mode", ["inline", "subproc"])
async def test_episodes_running_at_shutdown_are_cancelled_not_failed(tiny_model_dir,
                                                                     tiny_tokenizer, caplog,
                                                                     mode):
    async with FakeSGLangServer(vocab_size=len(tiny_tokenizer), max_context_len=4096,
                                eos_token_id=tiny_tokenizer.eos_token_id,
                                latency_s=0.01) as fake:
        cfg = make_cfg(tiny_model_dir, fake.url, f"rollout.agent.mode={mode}",
                       "rollout.agent.subproc_max_workers=3",
                       "rollout.agent.agent_kwargs={turns=1000, max_tokens=4}")
        caplog.set_level(logging.INFO, logger="areal_lite.rollout.controller")
        async with open_rollout(cfg, "sample_agents:ChatAgent") as stack:
            group = asyncio.create_task(stack.controller.run_group({"question": "go"}, 3))
            # the episodes are under way (all three started, six engine calls made)
            await fake.state.wait_until(lambda: len(fake.state.generate_bodies) >= 6
                                        and stack.controller.num_running == 3, 60)
            group.cancel()  # what the trainer does to its producer when it finishes
            with pytest.raises(asyncio.CancelledError):
                await group
            stats = stack.controller.stats
            assert not [r for r in caplog.records if "episodes still running" in r.getMessage()]
    assert stats.num_cancelled == 3 and stats.num_failed == 0 and stats.failures == {}
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    (line,) = [r for r in caplog.records if "still running at shutdown" in r.getMessage()]
    assert line.levelno == logging.INFO
    assert line.getMessage() == "3 episodes still running at shutdown were cancelled"
