"""engine/ routing: which SGLang server a request goes to (pure bookkeeping, no I/O).

Session-affine: every request of one episode (`session_id`) goes to the server that
served the episode before, while that server is healthy, so its radix cache keeps the
shared prefix. New sessions (and requests without one) go to the server with the fewest
requests in flight, ties broken round robin. A server that failed is avoided for
`cooldown_s` seconds unless every server is down; one marked offline (its supervisor
saw it exit, or it is catching up on weights) gets no new request while another is up.
A session moved off its server is counted (`num_affinity_misses`); the episode's end
drops its binding (`forget`).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable

__all__ = ["SessionRouter"]


class SessionRouter:
    """Pick a server per request and count requests in flight per server."""

    def __init__(
        self,
        urls: list[str],
        *,
        cooldown_s: float = 5.0,  # how long a failed server is avoided
        max_sessions: int = 100_000,  # session bindings kept (least recently used dropped)
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not urls:
            raise ValueError("SessionRouter needs at least one server url, got []")
        if len(set(urls)) != len(urls):
            raise ValueError(f"server urls must be distinct, got {urls}")
        self.urls = list(urls)
        self.in_flight: dict[str, int] = dict.fromkeys(urls, 0)
        self._down_until: dict[str, float] = dict.fromkeys(urls, 0.0)
        self.offline: set[str] = set()  # servers that must get no new request
        self.num_affinity_misses = 0  # sessions moved off the server they were bound to
        self._sessions: OrderedDict[str, str] = OrderedDict()
        self._next = 0  # round-robin cursor for ties
        self._cooldown_s = cooldown_s
        self._max_sessions = max_sessions
        self._clock = clock

    def healthy(self, url: str) -> bool:
        return url not in self.offline and self._down_until[url] <= self._clock()

    def set_offline(self, url: str, offline: bool) -> None:
        (self.offline.add if offline else self.offline.discard)(url)

    def pick(self, session_id: str | None) -> str:
        """The server for a new request of `session_id` (binds new sessions)."""
        if session_id is not None:
            url = self._sessions.get(session_id)
            if url is not None and self.healthy(url):
                self._sessions.move_to_end(session_id)
                return url
        url = self._least_loaded(self.urls)
        if session_id is not None:
            self.bind(session_id, url)
        return url

    def fallback(self, session_id: str | None, failed: Iterable[str]) -> str:
        """Another server after `failed` ones did not answer (rebinds the session):
        one up and not failed, else one up, else any."""
        failed = set(failed)
        up = [u for u in self.urls if u not in self.offline]
        candidates = [u for u in up if u not in failed] or up or self.urls
        url = self._least_loaded(candidates)
        if session_id is not None:
            self.bind(session_id, url)
        return url

    def bind(self, session_id: str, url: str) -> None:
        if self._sessions.get(session_id, url) != url:
            self.num_affinity_misses += 1
        self._sessions[session_id] = url
        self._sessions.move_to_end(session_id)
        if len(self._sessions) > self._max_sessions:
            self._sessions.popitem(last=False)

    def forget(self, session_id: str) -> None:
        """Drop a finished episode's binding (the LRU cap is only a backstop)."""
        self._sessions.pop(session_id, None)

    def session_url(self, session_id: str) -> str | None:
        return self._sessions.get(session_id)

    def report_failure(self, url: str) -> None:
        self._down_until[url] = self._clock() + self._cooldown_s

    def report_success(self, url: str) -> None:
        if self._down_until[url]:
            self._down_until[url] = 0.0

    def begin(self, url: str) -> None:
        self.in_flight[url] += 1

    def end(self, url: str) -> None:
        self.in_flight[url] -= 1

    def _least_loaded(self, candidates: list[str]) -> str:
        up = ({u for u in candidates if self.healthy(u)}
              or {u for u in candidates if u not in self.offline} or set(candidates))
        low = min(self.in_flight[u] for u in up)
        n = len(self.urls)
        for k in range(n):
            i = (self._next + k) % n
            url = self.urls[i]
            if url in up and self.in_flight[url] == low:
                self._next = (i + 1) % n
                return url
        raise AssertionError("unreachable: a least-loaded candidate always exists")
