"""An engine that refuses a client's values: a 400 in the route's API shape on every
route, streaming or not, with the engine's reason and no internal address (the engine
side: tests/engine/test_sglang_rejections.py)."""

from __future__ import annotations

import contextlib
import logging

import anthropic
import openai
import pytest
from anthropic import AsyncAnthropic
from openai import AsyncOpenAI
from proxy_support import make_cfg

from areal_lite.rollout.stack import open_rollout
from areal_lite.testing.fake_sglang.server import FakeSGLangServer
from areal_lite.testing.tiny import MARKUP_TOKENS

VOCAB_ERROR = "contains values greater than the vocab size"
# "<think>" is an added token of the tiny tokenizer that the server's model lacks below
BAD = [{"role": "user", "content": "please <think> hard"}]
GOOD = [{"role": "user", "content": "hello there"}]


async def _chat(client: AsyncOpenAI, messages, stream: bool):
    out = await client.chat.completions.create(model="default", messages=messages,
                                               max_tokens=4, stream=stream)
    return [c async for c in out] if stream else out


async def _responses(client: AsyncOpenAI, messages, stream: bool):
    out = await client.responses.create(model="default", input=messages[0]["content"],
                                        max_output_tokens=4, stream=stream)
    return [e async for e in out] if stream else out


async def _messages(client: AsyncAnthropic, messages, stream: bool):
    out = await client.messages.create(model="default", messages=messages, max_tokens=4,
                                       stream=stream)
    return [e async for e in out] if stream else out


@pytest.mark.parametrize("in_process", [True, False])
async def test_every_route_answers_a_rejection_with_400(tiny_model_dir, tiny_tokenizer,
                                                        in_process, caplog):
    vocab = len(tiny_tokenizer) - len(MARKUP_TOKENS)  # a model without the markup tokens
    assert tiny_tokenizer.convert_tokens_to_ids("<think>") >= vocab
    async with FakeSGLangServer(vocab_size=vocab, max_context_len=1024,
                                eos_token_id=tiny_tokenizer.eos_token_id) as fake:
        async with open_rollout(make_cfg(tiny_model_dir, fake.url),
                                "sample_agents.ChatAgent") as stack:
            key = stack.proxy.sessions.start().key
            http = stack.controller.http_client if in_process else None
            oai = AsyncOpenAI(base_url=stack.proxy.base_url, api_key=key, max_retries=0,
                              http_client=http)
            ant = AsyncAnthropic(base_url=stack.proxy.base_url.removesuffix("/v1"),
                                 api_key=key, max_retries=0, http_client=http)
            caplog.set_level(logging.WARNING)
            async with contextlib.AsyncExitStack() as own:
                if not in_process:  # their own connections, over TCP
                    await own.enter_async_context(oai)
                    await own.enter_async_context(ant)
                for call, client, error in ((_chat, oai, openai.BadRequestError),
                                            (_responses, oai, openai.BadRequestError),
                                            (_messages, ant, anthropic.BadRequestError)):
                    for stream in (False, True):
                        calls = fake.state.calls["/generate"]
                        with pytest.raises(error) as info:
                            await call(client, BAD, stream)
                        assert fake.state.calls["/generate"] == calls + 1  # asked once
                        reply = info.value.response
                        assert reply.status_code == 400
                        body = reply.json()
                        if client is ant:
                            assert body["type"] == "error"
                            assert body["error"]["type"] == "invalid_request_error"
                        else:
                            assert body["error"]["type"] == "invalid_request_error"
                            assert body["error"]["code"] == "rejected_by_engine"
                        message = body["error"]["message"]
                        assert VOCAB_ERROR in message, (call.__name__, stream, message)
                        assert fake.url.split("//")[1] not in message and "http" not in message
                        assert await call(client, GOOD, stream)  # the session goes on
            failures = stack.proxy.stats()["failures"]
    assert not failures  # the client's fault: not a proxy failure
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
