"""Shared scaffolding of the proxy tests: a scripted fake SGLang model, the rollout
stack over it (the `env` fixture, registered in conftest.py) and assertions on what a
session recorded."""

from __future__ import annotations

import contextlib
from collections import deque
from dataclasses import dataclass

import pytest
from openai import AsyncOpenAI

from areal_lite.config_toml import loads_config
from areal_lite.rollout.stack import RolloutStack, open_rollout
from areal_lite.testing.fake_sglang.server import FakeSGLangServer


class Script:
    """Scripted model: each call emits the next queued reply, then eos."""

    def __init__(self, tok) -> None:
        self.tok, self.replies = tok, deque()
        self.prompts: list[list[int]] = []

    def __call__(self, input_ids, sampling):
        self.prompts.append(list(input_ids))
        text = self.replies.popleft() if self.replies else "ok fine"
        return self.tok.encode(text, add_special_tokens=False) + [self.tok.eos_token_id]


@dataclass
class Env:
    stack: RolloutStack
    fake: FakeSGLangServer
    script: Script

    def client(self, key: str | None = None, *, in_process: bool = True) -> AsyncOpenAI:
        if key is None:
            key = self.stack.proxy.sessions.start().key
        return AsyncOpenAI(base_url=self.stack.proxy.base_url, api_key=key, max_retries=0,
                           http_client=self.stack.controller.http_client if in_process else None)


def make_cfg(model_dir, url, *extra):
    return loads_config("", [f"actor.path={model_dir}", "rollout.backend=sglang",
                             f'rollout.sglang.urls=["{url}"]', "rollout.episode_timeout_s=60",
                             *extra])


def assert_one_reply_recorded(env: Env, session, tok, reply_id: str, text: str,
                              input_tokens: int, output_tokens: int):
    """The session recorded exactly one completion, keyed `reply_id`, whose sampled tokens
    are `text` + eos with one logprob and version each; the reply's usage counts match;
    its id keys rewards. Returns the node."""
    (node,) = session.cache.nodes
    assert node.id == node.response_id == reply_id and node.parent_id is None
    assert node.prompt_ids == env.script.prompts[0]
    assert node.output_ids[-1] == tok.eos_token_id
    assert tok.decode(node.output_ids[:-1]) == text
    assert len(node.logprobs) == len(node.output_ids) == len(node.versions)
    assert input_tokens == len(node.prompt_ids) and output_tokens == len(node.output_ids)
    session.cache.set_reward(reply_id, 1.0)
    assert session.cache.raw_reward(node.id) == 1.0
    return node


def assert_token_chain(stack: RolloutStack, session, ids: list[str]) -> None:
    """The session's completions are `ids`, each the child of the one before, each
    prompt starting with its parent's exact prompt + sampled tokens (no prefix break)."""
    nodes = session.cache.nodes
    assert [n.id for n in nodes] == ids
    assert [n.parent_id for n in nodes] == [None, *ids[:-1]]
    for parent, child in zip(nodes, nodes[1:]):
        assert child.prompt_ids[: len(parent.prompt_ids) + len(parent.output_ids)] == (
            parent.prompt_ids + parent.output_ids)
    assert session.num_prefix_breaks == 0 and stack.proxy.sessions.num_prefix_breaks == 0


def assert_tool_turn_continues(env: Env, session, first_id: str, second_id: str) -> None:
    """The turn after an `add` tool call (whose result was "3") continues the call's
    completion: the call re-rendered exactly, and the tool result is in the prompt."""
    assert session.cache.get(second_id).parent_id == first_id
    assert session.num_prefix_breaks == 0
    prompt = env.stack.tokenizer.decode(env.script.prompts[1])
    assert "<tool_response>\n3\n</tool_response>" in prompt and '"name": "add"' in prompt


@contextlib.asynccontextmanager
async def stop_string_stack(model_dir, tok, reply: str):
    """A proxy over a fake server that answers `reply`, its detokenizer able to see stop
    strings; yields the rollout stack."""
    script = Script(tok)
    script.replies.append(reply)
    async with FakeSGLangServer(vocab_size=len(tok), max_context_len=1024,
                                eos_token_id=tok.eos_token_id, responder=script,
                                decode=lambda ids: tok.decode(ids)) as fake:
        async with open_rollout(make_cfg(model_dir, fake.url), "sample_agents.ChatAgent") as stack:
            yield stack


@pytest.fixture
async def env(tiny_model_dir, tiny_tokenizer):
    script = Script(tiny_tokenizer)
    async with FakeSGLangServer(vocab_size=len(tiny_tokenizer), max_context_len=1024,
                                eos_token_id=tiny_tokenizer.eos_token_id,
                                responder=script) as fake:
        async with open_rollout(make_cfg(tiny_model_dir, fake.url),
                                "sample_agents.ChatAgent") as stack:
            yield Env(stack, fake, script)
