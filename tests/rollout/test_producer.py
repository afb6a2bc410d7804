"""GroupProducer: rollout.max_episode_failures_frac drops a batch with too many failed
episodes (counted, logged) and hands out the next one instead."""

from __future__ import annotations

import asyncio
import logging

import sample_agents
from proxy_support import make_cfg

from areal_lite.data.prompts import PromptStream
from areal_lite.rollout.producer import GroupProducer
from areal_lite.rollout.stack import open_rollout
from areal_lite.testing.fake_sglang.server import FakeSGLangServer


class FirstEpisodeFails:
    """The very first episode raises; every later one makes one call and scores 1."""

    def __init__(self) -> None:
        self.num_runs = 0

    async def run(self, data, **kwargs):
        self.num_runs += 1
        if self.num_runs == 1:
            raise RuntimeError("first episode fails on purpose")
        return await sample_agents.ChatAgent(turns=1).run(data, **kwargs)


async def test_batch_over_the_failure_limit_is_dropped(tiny_model_dir, tiny_tokenizer, caplog):
    async with FakeSGLangServer(vocab_size=len(tiny_tokenizer), max_context_len=1024,
                                eos_token_id=tiny_tokenizer.eos_token_id) as fake:
        async with open_rollout(make_cfg(tiny_model_dir, fake.url), FirstEpisodeFails()) as stack:
            prompts = PromptStream([{"question": "hi"}], batch_size=1, seed=0)
            producer = GroupProducer(stack.controller, prompts, batch_size=1, group_size=2,
                                     max_head_offpolicyness=0, version=lambda: 0,
                                     max_failures_frac=0.25)
            with caplog.at_level(logging.WARNING):
                async with asyncio.TaskGroup() as tg:
                    running = tg.create_task(producer.run())
                    (group,), _ = await producer.next_batch()
                    running.cancel()
    assert producer.num_batches_dropped == 1  # the first group: 1 of 2 episodes failed
    assert group.num_failed == 0 and len(group.samples) == 2
    assert any("rollout.max_episode_failures_frac = 0.25" in r.getMessage()
               for r in caplog.records)
