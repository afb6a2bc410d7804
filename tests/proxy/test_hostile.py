"""Proxy under hostile input: every malformed request is a 4xx in its API's shape naming
the field, nothing a client sends runs template code or stalls other sessions, keyless
and slow clients are refused cheaply, and failures are logged once per kind."""

from __future__ import annotations

import asyncio
import logging

import httpx2
import pytest
from proxy_support import Script, make_cfg

from areal_lite.rollout.stack import open_rollout
from areal_lite.testing.fake_sglang.server import FakeSGLangServer

HI = [{"role": "user", "content": "hi"}]
BIG = 10 ** 400  # past float range: must be a 400, never an OverflowError

# (route, body, the field the 400 must name)
BAD_BODIES = [
    ("/v1/chat/completions", {"messages": HI, "max_tokens": BIG}, "max_tokens"),
    ("/v1/chat/completions", {"messages": HI, "n": BIG}, "'n'"),
    ("/v1/chat/completions", {"messages": HI, "top_k": BIG}, "top_k"),
    ("/v1/chat/completions", {"messages": HI, "top_k": 0}, "top_k"),
    ("/v1/chat/completions", {"messages": HI, "seed": 1 << 63}, "seed"),
    ("/v1/chat/completions", {"messages": HI, "temperature": BIG}, "temperature"),
    ("/v1/chat/completions", {"messages": HI, "stream": "false"}, "stream"),
    ("/v1/chat/completions", {"messages": HI, "logprobs": "yes"}, "logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": ["text"]}]}]},
     "content[0]"),
    ("/v1/chat/completions", {"messages": [{"role": ["user"], "content": "x"}]}, "role"),
    ("/v1/chat/completions", {"messages": HI, "chat_template_kwargs": {
        "chat_template": "{% for i in range(99999999) %}x{% endfor %}"}}, "chat_template"),
    ("/v1/chat/completions", {"messages": HI, "chat_template_kwargs": {"tokenize": True}},
     "tokenize"),
    ("/v1/chat/completions", {"messages": HI, "chat_template_kwargs": {"tools": []}}, "tools"),
    ("/v1/chat/completions", {"messages": HI, "chat_template_kwargs": {
        "enable_thinking": "no"}}, "enable_thinking"),
    ("/v1/messages", {"max_tokens": BIG, "messages": HI}, "max_tokens"),
    ("/v1/messages", {"max_tokens": 4, "messages": [
        {"role": "user", "content": [{"type": {"a": 1}}]}]}, "content[0]"),
    ("/v1/messages", {"max_tokens": 4, "messages": [{"role": ["user"], "content": "x"}]},
     "role"),
    ("/v1/responses", {"input": "hi", "max_output_tokens": BIG}, "max_output_tokens"),
    ("/v1/responses", {"input": [{"role": ["user"], "content": "x"}]}, "role"),
    ("/v1/responses", {"input": [{"role": "user", "content": [{"type": ["input_text"]}]}]},
     "content[0]"),
]


def _encode(body) -> bytes:
    import json
    return json.dumps(body).encode()


def assert_error_shape(route: str, resp: httpx2.Response, status: int, field: str | None):
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    if route.startswith("/v1/messages"):
        assert body["type"] == "error" and isinstance(body["error"]["message"], str)
        message = body["error"]["message"]
    else:
        assert set(body["error"]) == {"message", "type", "param", "code"}
        message = body["error"]["message"] + " " + str(body["error"]["param"])
    if field is not None:
        assert field in message, message
    assert "127.0.0.1" not in message and "http://" not in message


@pytest.mark.parametrize("in_process", [True, False], ids=["inproc", "tcp"])
async def test_malformed_bodies_are_400_naming_the_field(env, in_process):
    key = env.stack.proxy.sessions.start().key
    base = env.stack.proxy.base_url.removesuffix("/v1")
    client = env.stack.proxy.http_client(base_url=base) if in_process else \
        httpx2.AsyncClient(base_url=base)
    async with client:
        for route, body, field in BAD_BODIES:
            r = await client.post(route, content=_encode(body),
                                  headers={"Authorization": f"Bearer {key}"})
            assert_error_shape(route, r, 400, field)
        deep = b"[" * 5000 + b"]" * 5000
        r = await client.post("/v1/chat/completions", content=deep,
                              headers={"Authorization": f"Bearer {key}"})
        assert_error_shape("/v1/chat/completions", r, 400, "nested")
        big = b'{"messages": "' + b"x" * (17 << 20) + b'"}'
        r = await client.post("/v1/messages", content=big, headers={"x-api-key": key})
        assert_error_shape("/v1/messages", r, 413, "max_request_mb")
        # the server still serves the session, and allowed flags work
        r = await client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                              json={"messages": HI, "max_tokens": 4,
                                    "chat_template_kwargs": {"enable_thinking": False}})
        assert r.status_code == 200, r.text
    assert env.stack.proxy.stats()["failures"] == {}


async def test_admin_reward_of_309_digits_is_400(env):
    session = env.stack.proxy.sessions.start()
    admin = {"Authorization": f"Bearer {env.stack.proxy.sessions.admin_key}"}
    async with env.stack.proxy.http_client(base_url="http://proxy") as http:
        r = await http.post(f"/admin/sessions/{session.id}/reward", headers=admin,
                            content=b'{"reward": ' + str(BIG).encode() + b"}")
    assert_error_shape("/admin", r, 400, "reward")


async def test_message_limit_refuses_before_tokenizing_and_big_render_runs_off_loop(env):
    """A 15 MiB message is refused by its length alone. A 1M-character message (within
    the limit) renders in the proxy's worker thread: a small request sent after it is
    answered before it (the bound: a concurrent request never waits for a big render)."""
    proxy = env.stack.proxy
    key = proxy.sessions.start().key
    auth = {"Authorization": f"Bearer {key}"}
    async with proxy.http_client(base_url="http://proxy", timeout=120) as http:
        r = await http.post("/v1/chat/completions", headers=auth, json={
            "messages": [{"role": "user", "content": "x" * (15 << 20)}]})
        assert_error_shape("/v1/chat/completions", r, 400, "max_message_chars")
        order = []

        async def ask(name: str, text: str) -> None:
            r = await http.post("/v1/chat/completions", headers=auth,
                                json={"messages": [{"role": "user", "content": text}],
                                      "max_tokens": 2})
            order.append((name, r.status_code))

        big = asyncio.create_task(ask("big", "word " * 200_000))
        await asyncio.sleep(0)  # the big request is past its size check, rendering
        await ask("small", "hi")
        await big
    assert order[0] == ("small", 200)
    assert order[1][0] == "big" and order[1][1] in (200, 400)  # 400: longer than the context


async def _raw_exchange(port: int, head: bytes, timeout_s: float = 20.0) -> bytes:
    """Send `head` (headers, maybe some body) and read until the server closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), timeout_s)
    finally:
        writer.close()


async def test_keyless_upload_refused_from_headers_before_the_body(env):
    proxy = env.stack.proxy
    before = proxy.stats()["errors"].get("401", 0)
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\nContent-Length: 15728640\r\n\r\n")
    reply = await _raw_exchange(proxy.port, head)  # the 15 MiB body is never sent
    assert reply.startswith(b"HTTP/1.1 401") and b'"invalid_api_key"' in reply
    # a live session key on an admin route gets exactly the same reply as a guess
    for key in (proxy.sessions.start().key, "sk-sess-" + "0" * 32):
        head = (b"POST /admin/sessions HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n"
                b"Authorization: Bearer " + key.encode() + b"\r\nConnection: close\r\n\r\n")
        assert b'"invalid API key for this route"' in await _raw_exchange(proxy.port, head)
    assert proxy.stats()["errors"]["401"] == before + 3


@pytest.fixture
async def strict_env(tiny_model_dir, tiny_tokenizer):
    """A proxy with short read/idle timeouts."""
    async with FakeSGLangServer(vocab_size=len(tiny_tokenizer), max_context_len=1024,
                                eos_token_id=tiny_tokenizer.eos_token_id,
                                responder=Script(tiny_tokenizer)) as fake:
        cfg = make_cfg(tiny_model_dir, fake.url, "rollout.proxy.idle_timeout_s=0.3",
                       "rollout.proxy.body_timeout_s=0.3")
        async with open_rollout(cfg, "sample_agents.ChatAgent") as stack:
            yield stack


async def test_slow_clients_are_dropped(strict_env):
    proxy = strict_env.proxy
    key = proxy.sessions.start().key.encode()
    # slowloris: headers that never end; an idle keep-alive connection; both closed
    assert await _raw_exchange(proxy.port, b"POST /v1/chat/completions HTTP/1.1\r\nHo") == b""
    assert await _raw_exchange(proxy.port, b"") == b""
    # a body that stops arriving: 408 in the route's shape, connection closed
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n"
            b"Authorization: Bearer " + key + b"\r\n\r\n{\"messa")
    reply = await _raw_exchange(proxy.port, head)
    assert reply.startswith(b"HTTP/1.1 408") and b"within 0.3 s" in reply
    async with httpx2.AsyncClient(base_url=proxy.base_url) as http:  # still serving
        r = await http.post("/chat/completions", headers={"Authorization": f"Bearer {key.decode()}"},
                            json={"messages": HI, "max_tokens": 2})
        assert r.status_code == 200


async def test_engine_failures_logged_once_per_kind(tiny_model_dir, tiny_tokenizer, caplog):
    async with FakeSGLangServer(vocab_size=len(tiny_tokenizer), max_context_len=1024,
                                eos_token_id=tiny_tokenizer.eos_token_id) as fake:
        async with open_rollout(make_cfg(tiny_model_dir, fake.url),
                                "sample_agents.ChatAgent") as stack:
            key = stack.proxy.sessions.start().key
            caplog.set_level(logging.WARNING)
            fake.fail_next(5, 404)  # not retried: the engine error names the server's url
            async with stack.proxy.http_client(base_url="http://proxy") as http:
                for _ in range(5):
                    r = await http.post("/v1/chat/completions",
                                        headers={"Authorization": f"Bearer {key}"},
                                        json={"messages": HI, "max_tokens": 2})
                    assert r.status_code == 502
                    assert "injected" not in r.text and "127.0.0.1" not in r.text
            failures = stack.proxy.stats()["failures"]
    errors = [rec for rec in caplog.records if rec.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is not None
    assert list(failures.values()) == [5]
