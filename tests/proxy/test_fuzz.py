"""Fuzzing every proxy route: hypothesis generates bodies (valid requests with fields
swapped for arbitrary JSON, and arbitrary JSON), headers and keys. Every reply must be a
2xx or a 4xx in its route's error shape; afterwards the proxy still serves a valid
request and no session is left behind."""

from __future__ import annotations

import json

import httpx2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

MAX_EXAMPLES = 300  # per run, all routes together; bounded to keep CI fast

SCALARS = (st.none() | st.booleans() | st.integers() | st.integers(min_value=-(10 ** 400),
                                                                    max_value=10 ** 400)
           | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20))
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=12), inner, max_size=4), max_leaves=12)
HI = [{"role": "user", "content": "hi"}]
# message lists close to valid: known roles and part types mixed with any JSON in place
PARTS = st.lists(st.fixed_dictionaries({
    "type": st.sampled_from(["text", "input_text", "image", "tool_result"]) | JSON,
    "text": st.text(max_size=5) | JSON}), max_size=2)
MESSAGES = st.lists(st.fixed_dictionaries({
    "role": st.sampled_from(["user", "assistant", "system", "tool", "developer"]) | JSON,
    "content": st.text(max_size=8) | PARTS | JSON}), min_size=1, max_size=3)
NUMBERS = st.integers(min_value=-(10 ** 400), max_value=10 ** 400) | st.sampled_from(
    [0, -1, 1 << 63, 1 << 64, 2 ** 31, "1", "false", True, 1e308, -0.0])
FIELD = st.one_of(NUMBERS, JSON, MESSAGES)
VALID = {
    "/v1/chat/completions": {"messages": HI, "max_tokens": 2, "n": 1, "temperature": 0.5,
                             "stream": False, "tools": [], "stop": "x", "seed": 1,
                             "logprobs": False, "chat_template_kwargs": {}, "top_k": -1},
    "/v1/messages": {"messages": HI, "max_tokens": 2, "system": "be brief", "stream": False,
                     "top_k": 5, "stop_sequences": [], "tools": []},
    "/v1/responses": {"input": "hi", "max_output_tokens": 2, "instructions": "x",
                      "stream": False, "tools": []},
    "/admin/sessions/{sid}/reward": {"reward": 1.0, "completion_id": None},
}
ROUTES = [*VALID, "/v1/models", "/admin/stats", "/nowhere"]


@st.composite
def requests(draw):
    route = draw(st.sampled_from(ROUTES))
    body = dict(VALID.get(route, {}))
    for key in sorted(body):  # each field, with odds 1/3: another value (type, range)
        if draw(st.integers(0, 2)) == 0:
            body[key] = draw(MESSAGES if key in ("messages", "input") else FIELD)
    if draw(st.booleans()):
        body[draw(st.text(max_size=10))] = draw(JSON)  # an unknown field
    content = json.dumps(body) if draw(st.integers(0, 9)) else draw(
        st.one_of(JSON.map(json.dumps), st.binary(max_size=40).map(repr)))
    method = "GET" if route in ("/v1/models", "/admin/stats") else "POST"
    if draw(st.integers(0, 19)) == 0:
        method = draw(st.sampled_from(["GET", "PUT", "DELETE", "PATCH"]))
    auth = draw(st.sampled_from(["session", "admin", "none", "garbage", "x-api-key"]))
    return route, method, content, auth


def _collect(n: int) -> list:
    out = []

    @settings(max_examples=n, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(requests())
    def gen(r):
        out.append(r)

    gen()
    return out


def _assert_shape(route: str, r: httpx2.Response, case) -> None:
    assert r.status_code < 500 and r.status_code not in (301, 302), (r.status_code, r.text, case)
    if r.status_code >= 400:
        body = r.json()
        if route.startswith("/v1/messages"):
            assert body["type"] == "error" and isinstance(body["error"]["message"], str), case
        else:
            assert isinstance(body["error"]["message"], str), case
    elif "stream" not in r.headers.get("content-type", ""):
        r.json()


async def test_fuzz_every_route(env):
    proxy = env.stack.proxy
    session = proxy.sessions.start()
    live = len(proxy.sessions)
    keys = {"session": session.key, "admin": proxy.sessions.admin_key, "none": None,
            "garbage": "sk-sess-" + "f" * 32, "x-api-key": session.key}
    async with proxy.http_client(base_url="http://proxy", timeout=60) as http:
        for case in dict.fromkeys(_collect(MAX_EXAMPLES)):  # distinct, in order
            route, method, content, auth = case
            route = route.format(sid=session.id)
            headers = {"content-type": "application/json"}
            if keys[auth] is not None:
                name = "x-api-key" if auth == "x-api-key" else "authorization"
                headers[name] = keys[auth] if name == "x-api-key" else f"Bearer {keys[auth]}"
            r = await http.request(method, route, content=content.encode(), headers=headers)
            _assert_shape(route, r, case)
        assert len(proxy.sessions) == live  # nothing leaked (and the session still works)
        r = await http.post("/v1/chat/completions", json={"messages": HI, "max_tokens": 2},
                            headers={"authorization": f"Bearer {session.key}"})
        assert r.status_code == 200
    assert proxy.stats()["failures"] == {}
    assert session.num_inflight == 0
