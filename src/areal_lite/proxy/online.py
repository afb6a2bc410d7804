"""Proxy: admin routes for agents that live outside the trainer (`areal-lite serve`).

An outside agent runner (another process or machine, an agent harness, a coding CLI
pointed at a base URL) drives episodes with the admin key:

    POST /admin/online/sessions              {"group_id"?: str, "data"?: {...}}
         -> {"session_id", "api_key", "base_url", "group_id"}
         waits while the staleness bound allows no new group (a reply may take a while)
    POST /admin/online/sessions/{id}/reward  {"reward": x, "completion_id"?: str}
         (no completion_id: the session's most recent completion)
    POST /admin/online/sessions/{id}/end     {"reward"?: x}  -> {"num_samples", "num_completions"}
         exports the episode to the trainer; "reward" sets the last completion's first

The agent itself only sees `base_url` and `api_key` (a session key), as inline agents do.
A session not ended within `session_timeout_s` is ended by the proxy: its key stops
working, its memory is freed and its episode counts as failed ("timeout").

Episodes with the same `group_id` form one group (GRPO's group of n per prompt); without
one each episode is a group of its own. Where groups go is the `OnlineSink` (the
trainer's producer in rollout/online.py).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from areal_lite.proxy.app import ProxyServer, _json_body, set_reward_from_body
from areal_lite.proxy.http import ApiError, ProxyRequest, ProxyResponse, json_response
from areal_lite.proxy.sessions import Session
from areal_lite.types import Sample

log = logging.getLogger(__name__)

PREFIX = "/admin/online/"


class OnlineSink(Protocol):
    """Where online episodes go (rollout/online.py's OnlineProducer)."""

    async def admit(self, group_id: str | None) -> str:
        """Wait until the episode may start; returns the key of its group.
        Raises ApiError(409) when the group is already full."""
        ...

    def finish(self, group_key: str, *, data: dict, session_id: str, samples: list[Sample],
               reward: float | None, num_completions: int, error: str | None) -> None:
        """An episode of `group_key` ended (exported, or failed with `error`)."""
        ...


class OnlineRoutes:
    """The `/admin/online/` routes on one proxy, feeding one sink."""

    def __init__(self, proxy: ProxyServer, sink: OnlineSink, *, session_timeout_s: float) -> None:
        self.proxy, self.sink, self.timeout_s = proxy, sink, session_timeout_s
        self._open: dict[str, tuple[str, dict, asyncio.TimerHandle]] = {}  # id -> group, data, timer
        self.num_timed_out = 0  # sessions the proxy ended because they were abandoned
        proxy.mounts[PREFIX] = self.handle

    async def handle(self, req: ProxyRequest, path: str) -> ProxyResponse:
        # the admin key was checked from the headers by ProxyServer.authorize before any
        # mount is dispatched (and, over TCP, before the body was read)
        parts = path.split("/")  # ["", "admin", "online", "sessions", id?, verb?]
        if req.method == "POST" and parts[3:] == ["sessions"]:
            return await self._start(_object(req, allow_empty=True))
        if req.method == "POST" and len(parts) == 6 and parts[3] == "sessions":
            session = self.proxy.sessions.by_id(parts[4])
            if session is None or session.id not in self._open:
                raise ApiError(404, f"no live online session {parts[4]!r} (ended or timed out?)",
                               code="not_found")
            if parts[5] == "reward":
                set_reward_from_body(session, _object(req))
                return json_response({"ok": True})
            if parts[5] == "end":
                return self._end(session, _object(req, allow_empty=True))
        raise ApiError(404, f"unknown admin route {req.method} {req.path}", code="not_found")

    async def _start(self, body: dict) -> ProxyResponse:
        group_id, data = body.get("group_id"), body.get("data", {})
        if group_id is not None and (not isinstance(group_id, str) or not group_id):
            raise ApiError(400, f"'group_id' must be a non-empty string, got {group_id!r}",
                           param="group_id")
        if not isinstance(data, dict):
            raise ApiError(400, "'data' must be a JSON object (the episode's dataset row)",
                           param="data")
        group_key = await self.sink.admit(group_id)
        session = self.proxy.sessions.start()
        timer = asyncio.get_running_loop().call_later(self.timeout_s, self._expire, session.id)
        self._open[session.id] = (group_key, data, timer)
        return json_response({"session_id": session.id, "api_key": session.key,
                              "base_url": self.proxy.base_url, "group_id": group_key})

    def _end(self, session: Session, body: dict) -> ProxyResponse:
        if "reward" in body:
            set_reward_from_body(session, {"reward": body["reward"]})
        group_key, data, timer = self._open.pop(session.id)
        timer.cancel()
        self.proxy.sessions.end(session.id)
        samples = self.proxy.exporter(session)
        rewards = [session.cache.raw_reward(n.id) for n in session.cache.nodes]
        given = [r for r in rewards if r is not None]
        self.sink.finish(group_key, data=data, session_id=session.id, samples=samples,
                         reward=sum(given) / len(given) if given else None,
                         num_completions=len(session.cache), error=None)
        return json_response({"num_samples": len(samples), "num_completions": len(session.cache)})

    def _expire(self, session_id: str) -> None:
        group_key, data, _ = self._open.pop(session_id)
        session = self.proxy.sessions.end(session_id)
        self.num_timed_out += 1
        log.warning("online session %s was not ended within %.0f s: freed, episode failed",
                    session_id, self.timeout_s)
        self.sink.finish(group_key, data=data, session_id=session_id, samples=[], reward=None,
                         num_completions=len(session.cache), error="timeout")

    def close(self) -> None:
        """Cancel the timers of sessions still open (the run is ending)."""
        for _, _, timer in self._open.values():
            timer.cancel()
        self._open.clear()


def _object(req: ProxyRequest, *, allow_empty: bool = False) -> dict:
    if allow_empty and not req.body:
        return {}
    body = _json_body(req)
    if not isinstance(body, dict):
        raise ApiError(400, "body must be a JSON object")
    return body
