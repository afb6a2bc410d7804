"""Proxy stage 0: who is calling. Per-episode sessions, their keys and their caches.

Each episode gets a random API key; requests carrying it are recorded in that
episode's InteractionCache and nowhere else. The admin key (start/reward/end/export)
is a different random secret that no session ever sees.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field

from areal_lite.cache import InteractionCache


@dataclass(eq=False)
class Session:
    """One episode's view of the proxy."""

    id: str  # episode id
    key: str  # bearer key the agent uses; never shared between sessions
    cache: InteractionCache = field(default_factory=InteractionCache)
    started_s: float = field(default_factory=time.monotonic)
    num_requests: int = 0  # chat requests served
    num_prefix_breaks: int = 0  # requests that continued a chat we could not token-match
    num_inflight: int = 0  # requests being served right now
    ended: bool = False
    greedy: bool = False  # eval episodes: every request is sampled greedily


class SessionTable:
    """Owns every live session; lookups by key are O(1)."""

    def __init__(self) -> None:
        self.admin_key = "sk-admin-" + secrets.token_hex(16)
        self._by_key: dict[str, Session] = {}
        self._by_id: dict[str, Session] = {}
        self.num_started = 0
        self.num_prefix_breaks = 0  # over the whole run (metric cache/prefix_breaks)

    def __len__(self) -> int:
        return len(self._by_id)

    def start(self, episode_id: str | None = None, *, greedy: bool = False) -> Session:
        sid = episode_id or "ep-" + secrets.token_hex(8)
        if sid in self._by_id:
            raise ValueError(f"session {sid!r} already exists")
        session = Session(id=sid, key="sk-sess-" + secrets.token_hex(16), greedy=greedy)
        self._by_key[session.key] = session
        self._by_id[sid] = session
        self.num_started += 1
        return session

    def by_key(self, key: str) -> Session | None:
        return self._by_key.get(key)

    def by_id(self, sid: str) -> Session | None:
        return self._by_id.get(sid)

    def end(self, sid: str) -> Session:
        """Forget a session at once (its key stops working); returns it for export."""
        session = self._by_id.pop(sid, None)
        if session is None:
            raise KeyError(f"unknown session {sid!r}")
        self._by_key.pop(session.key, None)
        session.ended = True
        return session

    def count_prefix_break(self, session: Session) -> None:
        session.num_prefix_breaks += 1
        self.num_prefix_breaks += 1
