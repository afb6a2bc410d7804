"""Proxy: the older proxy style's reward door, where an agent sets its own rewards.

    POST /v1/rl/set_reward   session key  {"interaction_id": str | null, "reward": x}

A session key may only reward its own session's completions; `interaction_id` is a
completion or response id (`response.id`), null for the most recent one. This is what
`run_and_submit_rewards` (rollout/agent.py) posts to, for modules written against the
reference documents' `run_and_submit` pattern.
"""

from __future__ import annotations

from areal_lite.proxy.app import ProxyServer, _json_body, set_reward_from_body
from areal_lite.proxy.http import ApiError, ProxyRequest, ProxyResponse, json_response

ROUTE = "/v1/rl/set_reward"


def mount_rewards(proxy: ProxyServer) -> None:
    """Serve `POST /v1/rl/set_reward` on `proxy`, session key required."""

    async def handle(req: ProxyRequest, path: str) -> ProxyResponse:
        if path != ROUTE or req.method != "POST":
            raise ApiError(404, f"unknown route {req.method} {req.path}", code="not_found")
        session = proxy._session_for(req)
        body = _json_body(req)
        if isinstance(body, dict) and "interaction_id" in body:
            body = {"reward": body.get("reward"), "completion_id": body["interaction_id"]}
        set_reward_from_body(session, body)
        return json_response({"ok": True})

    proxy.mounts[ROUTE] = handle
