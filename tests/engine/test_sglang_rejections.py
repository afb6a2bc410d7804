"""SGLang refusing a request (HTTP 400, or a streamed ValueError event): EngineRejected
with the server's reason, scrubbed of addresses; never retried on another server and
no server marked unhealthy."""

from __future__ import annotations

import aiohttp
import pytest

from areal_lite.engine.base import EngineRejected, scrub_addresses
from areal_lite.engine.sglang.client import SGLangEngine
from areal_lite.testing.fake_sglang.model import BadRequest
from areal_lite.testing.fake_sglang.server import FakeSGLangServer
from areal_lite.types import GenerateRequest, SamplingParams

VOCAB_ERROR = "contains values greater than the vocab size"


@pytest.fixture
async def aiohttp_session():
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.mark.parametrize("stream", [False, True])
async def test_rejection_is_not_retried_and_blames_no_server(aiohttp_session, stream):
    async with FakeSGLangServer(vocab_size=64) as a, FakeSGLangServer(vocab_size=64) as b:
        engine = SGLangEngine([a.url, b.url], session=aiohttp_session, max_context_len=512,
                              outage_timeout_s=60.0)
        await engine.start()
        bad_sampling = GenerateRequest(rid="r1", input_ids=[1, 2, 3], session_id="s",
                                       sampling=SamplingParams(max_new_tokens=4, top_p=0.0))
        out_of_vocab = GenerateRequest(rid="r2", input_ids=[1, 99], session_id="s",
                                       sampling=SamplingParams(max_new_tokens=4))
        for req, reason in ((bad_sampling, "top_p must be in"), (out_of_vocab, VOCAB_ERROR)):
            with pytest.raises(EngineRejected, match=reason) as info:
                if stream:
                    [c async for c in engine.stream(req)]
                else:
                    await engine.generate(req)
            assert info.value.server in (a.url, b.url) and reason in info.value.message
        assert a.state.calls["/generate"] + b.state.calls["/generate"] == 2  # no retries
        assert engine.num_resubmitted == 0
        assert all(engine.router.healthy(u) for u in (a.url, b.url))
        good = GenerateRequest(rid="r3", input_ids=[1, 2], session_id="s",
                               sampling=SamplingParams(max_new_tokens=3, ignore_eos=True))
        assert len((await engine.generate(good)).output_ids) == 3
        await engine.close()


async def test_a_rejection_never_carries_the_engine_address(aiohttp_session):
    def refuse(input_ids, sampling):
        raise BadRequest(f"adapter at {fake.url}/lora and 10.0.0.7:30000 is not loaded")

    async with FakeSGLangServer(vocab_size=64, responder=refuse) as fake:
        engine = SGLangEngine([fake.url], session=aiohttp_session, max_context_len=512)
        await engine.start()
        with pytest.raises(EngineRejected) as info:
            await engine.generate(GenerateRequest(rid="r", input_ids=[1],
                                                  sampling=SamplingParams(max_new_tokens=2)))
        await engine.close()
    assert info.value.message == "adapter at <engine> and <engine> is not loaded"
    assert info.value.server == fake.url  # kept apart, for the log


@pytest.mark.parametrize("text, scrubbed", [
    ("see https://node-3.cluster:30000/generate now", "see <engine> now"),
    ("host gpu-node-1:30001 refused", "host <engine> refused"),
    ("at [::1]:8000 and 127.0.0.1:8", "at <engine> and 127.0.0.1:8"),  # 1-digit: not a port
    ("at localhost:30000 or node7:8080", "at <engine> or <engine>"),
    ("top_k:40 and step:12 and ratio 3:45 stay", "top_k:40 and step:12 and ratio 3:45 stay"),
    ("top_p must be in (0.0, 1.0], got 0.0.", "top_p must be in (0.0, 1.0], got 0.0."),
])
def test_scrub_addresses(text, scrubbed):
    assert scrub_addresses(text) == scrubbed


def test_long_engine_messages_are_cut():
    assert len(scrub_addresses("x" * 10_000)) == 503
