"""Gym-style environments and the token-level agent API: their episodes land in the same
interaction tree as chat agents' (engine ids, logprobs, versions), export and train."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from areal_lite.config_toml import load_config, loads_config
from areal_lite.export import export_episode
from areal_lite.rollout.env import ChatEnvWorkflow, NextTurn, TokenEnvWorkflow, make_env
from areal_lite.rollout.stack import open_rollout

ROOT = Path(__file__).resolve().parents[2]


class CountdownEnv:
    """Rewards turn k with k/10; ends after `turns` steps (truncated)."""

    def __init__(self, turns: int = 3) -> None:
        self.turns, self.k, self.actions = turns, 0, []

    async def reset(self, seed=None, options=None):
        self.k = 0
        return f"Count with me: {options['question']}", {"seed": seed}

    async def step(self, action):
        self.k += 1
        self.actions.append(action)
        return f"turn {self.k} done, go on", self.k / 10, False, self.k >= self.turns, {}


def _cfg(model_dir, tmp_path, *extra):
    return loads_config("", [f"actor.path={model_dir}", "actor.device=cpu", f"run_dir={tmp_path}",
                             "rollout.sampling.max_new_tokens=5", *extra])


async def test_token_agent_turns_chain_in_the_tree_with_per_turn_rewards(tiny_model_dir, tmp_path):
    wf = TokenEnvWorkflow(CountdownEnv, env_kwargs={"turns": 3}, model_path=str(tiny_model_dir),
                          max_turns=5, max_tokens=5)
    async with open_rollout(_cfg(tiny_model_dir, tmp_path), wf) as stack:
        session = stack.proxy.sessions.start()
        rewards = await wf.run({"question": "1 2 3"}, base_url=stack.proxy.base_url,
                               api_key=session.key, http_client=stack.controller.http_client)
        nodes = session.cache.nodes
        stack.proxy.sessions.end(session.id)
    assert len(nodes) == 3 and list(rewards) == [n.id for n in nodes]
    assert list(rewards.values()) == [0.1, 0.2, 0.3]
    assert [n.parent_id for n in nodes] == [None, nodes[0].id, nodes[1].id]  # one chain
    for n in nodes:
        assert len(n.output_ids) == len(n.logprobs) == len(n.versions) > 0
        assert all(v == 0 for v in n.versions)
    tok = stack.tokenizer
    assert "turn 1 done, go on" in tok.decode(nodes[1].prompt_ids)
    assert tok.decode(nodes[0].prompt_ids).startswith("<|im_start|>user\nCount with me: 1 2 3")
    session.cache.set_rewards(rewards)
    ind = export_episode(session.cache, style="individual", gamma=1.0, agg="mean", episode_id="e")
    assert [s.raw_reward for s in ind] == [0.1, 0.2, 0.3]
    assert [round(s.reward, 6) for s in ind] == [0.6, 0.5, 0.3]  # discounted back the chain
    (cat,) = export_episode(session.cache, style="concat", gamma=1.0, agg="mean", episode_id="e")
    assert sum(cat.loss_mask) == sum(len(n.output_ids) for n in nodes)
    assert cat.input_ids == nodes[2].prompt_ids + nodes[2].output_ids


async def test_chat_agent_on_an_env_observations_become_user_turns(tiny_model_dir, tmp_path):
    wf = ChatEnvWorkflow(CountdownEnv, env_kwargs={"turns": 2}, max_turns=4, max_tokens=4)
    async with open_rollout(_cfg(tiny_model_dir, tmp_path), wf) as stack:
        ep = await stack.controller.run_episode({"question": "9 8"})
        prompt = stack.tokenizer.decode(ep.samples[-1].input_ids)
    assert not ep.failed and ep.num_completions == 2
    assert sorted(s.raw_reward for s in ep.samples) == [0.1, 0.2]
    assert "Count with me: 9 8" in prompt and "turn 1 done, go on" in prompt


def test_next_turn_matches_the_template(tiny_tokenizer):
    """Appending NextTurn's tokens to a reply gives exactly what the template renders."""
    tok = tiny_tokenizer
    messages = [{"role": "user", "content": "hi"}]
    first = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    reply = tok.encode("yes", add_special_tokens=False) + [tok.eos_token_id]
    ids = tok.encode(first, add_special_tokens=False) + reply
    ids += NextTurn(tok)(reply, "more?")
    want = tok.apply_chat_template(messages + [{"role": "assistant", "content": "yes"},
                                               {"role": "user", "content": "more?"}],
                                   add_generation_prompt=True, tokenize=False)
    assert tok.decode(ids) == want


def test_make_env_names_what_is_wrong():
    with pytest.raises(ValueError, match="lacks"):
        make_env(dict, {})
    with pytest.raises(ValueError, match="max_turns"):
        ChatEnvWorkflow(CountdownEnv, max_turns=0)


async def test_multiturn_math_example_trains_one_step(tiny_model_dir, tmp_path, monkeypatch):
    """The example config (token agent + MathEnv with "wrong, try again" feedback) trains."""
    from areal_lite.trainer import Trainer

    monkeypatch.syspath_prepend(str(ROOT))
    cfg = load_config(ROOT / "examples/multiturn_math/config.toml", [
        f"actor.path={tiny_model_dir}", f"run_dir={tmp_path}", "rollout.batch_size=2",
        "rollout.group_size=2", "trainer.total_steps=1", "trainer.eval_every=0",
        "trainer.save_every=0", "rollout.sampling.max_new_tokens=6", "metrics.progress=false",
        "metrics.plots=false",
        f'rollout.agent.agent_kwargs={{env="examples.multiturn_math.env.MathEnv", '
        f'env_kwargs={{max_turns=3}}, model_path="{tiny_model_dir}", max_turns=3, max_tokens=6}}'])
    trainer = Trainer(cfg)
    last = await trainer.atrain()
    assert trainer.step == 1 and last["train/num_tokens"] > 0
    # a random tiny model never answers right: every episode takes all 3 turns
    assert last["rollout/completions_per_episode"] == 3.0
    rows = [json.loads(x) for x in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [1]
    assert sys.modules["examples.multiturn_math.env"].FEEDBACK


async def test_token_route_refuses_bad_input_naming_the_field(tiny_model_dir, tmp_path):
    import httpx2

    async with open_rollout(_cfg(tiny_model_dir, tmp_path), "sample_agents.ChatAgent") as stack:
        session = stack.proxy.sessions.start()
        auth = {"Authorization": f"Bearer {session.key}"}
        async with httpx2.AsyncClient(timeout=60) as http:
            url = stack.proxy.base_url + "/tokens/generate"
            assert (await http.post(url, json={"input_ids": [1]})).status_code == 401
            for body, field in [({"input_ids": []}, "input_ids"), ({"input_ids": ["a"]}, "input_ids"),
                                ({"input_ids": [1], "top_k": 0}, "top_k"),
                                ({"input_ids": [1], "max_new_tokens": 10**6}, "input_ids")]:
                resp = await http.post(url, headers=auth, json=body)
                assert resp.status_code == 400 and resp.json()["error"]["param"] == field, body
        assert len(session.cache) == 0
