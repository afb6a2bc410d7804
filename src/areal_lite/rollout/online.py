"""Rollout stage: groups of episodes that outside agents ran (rollout.agent.mode = "online").

`OnlineProducer` stands where `GroupProducer` stands for the trainer (`run`,
`next_batch`, `notify`, `unfinished`), but its episodes arrive through the proxy's
`/admin/online/` routes (proxy/online.py) instead of being started here. The same
staleness bound holds, counted in groups: a session of a new group is admitted only while

    (max_head_offpolicyness + version + 1) * batch_size > accepted + open groups

so the start request of an outside runner waits while the trainer catches up. A group is
`group_size` episodes sharing the runner's `group_id`, or one episode without one.

On start it writes the admin key to `{run_dir}/admin_key` (mode 0600; or uses
`$AREAL_LITE_ADMIN_KEY` when set) and `{run_dir}/online.json` (base URL, admin URL, key
file, group size) for runners, and logs where both are.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from areal_lite.config import RolloutConfig
from areal_lite.proxy.app import ProxyServer
from areal_lite.proxy.http import ApiError
from areal_lite.proxy.online import OnlineRoutes
from areal_lite.rollout.controller import EpisodeResult, GroupResult
from areal_lite.types import Sample

log = logging.getLogger(__name__)

ADMIN_KEY_ENV = "AREAL_LITE_ADMIN_KEY"


@dataclass(slots=True)
class _OpenGroup:
    size: int  # episodes the group holds when complete
    started_version: int  # engine weight version when its first episode was admitted
    num_admitted: int = 1
    data: dict = field(default_factory=dict)
    episodes: list[EpisodeResult] = field(default_factory=list)


def write_admin_key(path: Path, key: str) -> None:
    """Write `key` to `path`, readable by its owner only (0600)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    os.chmod(path, 0o600)  # the file may have existed with wider permissions


class OnlineProducer:
    """Collects outside agents' episodes into groups under the staleness bound."""

    def __init__(self, proxy: ProxyServer, cfg: RolloutConfig, *, run_dir: Path,
                 version: Callable[[], int], consumed: int = 0) -> None:
        self.batch_size, self.group_size = cfg.batch_size, cfg.group_size
        self.eta = cfg.max_head_offpolicyness
        self.version = version
        self.num_accepted = consumed  # groups finished with samples (queued or consumed)
        self.num_rejected = 0  # groups whose every episode failed
        self.num_batches_dropped = 0  # batches dropped for rollout.max_episode_failures_frac: none
        # here (a runner ends its own episodes; a failed one is already a rejected group)
        self._open: dict[str, _OpenGroup] = {}
        self._ready: list[tuple[GroupResult, int]] = []  # (group, start version)
        self._changed = asyncio.Event()  # replaced by a fresh one on every change (_wake)
        self.closed = False  # the run is ending: no new sessions
        env_key = os.environ.get(ADMIN_KEY_ENV)
        if env_key:
            proxy.sessions.admin_key = env_key
        self.routes = OnlineRoutes(proxy, self, session_timeout_s=cfg.agent.online_session_timeout_s)
        self.key_file = run_dir / "admin_key"
        write_admin_key(self.key_file, proxy.sessions.admin_key)
        admin_url = proxy.base_url.removesuffix("/v1")
        info = {"base_url": proxy.base_url, "admin_url": admin_url,
                "admin_key_file": str(self.key_file.resolve()), "group_size": self.group_size}
        (run_dir / "online.json").write_text(json.dumps(info, indent=1) + "\n")
        log.info("serving online agents: base URL %s, admin routes %s/admin/online/sessions, "
                 "admin key in %s (or $%s)", proxy.base_url, admin_url, info["admin_key_file"],
                 ADMIN_KEY_ENV)

    def capacity(self) -> int:
        limit = (self.eta + self.version() + 1) * self.batch_size
        return limit - self.num_accepted - len(self._open)

    def unfinished(self) -> list[int]:
        return []  # prompts come from outside: there are no cursors to hand out again

    async def notify(self) -> None:
        """Call after the version changes: capacity may have grown."""
        self._wake()

    def _wake(self) -> None:
        self._changed.set()  # wakes every waiter of the current event...
        self._changed = asyncio.Event()  # ...and later waiters wait for the next change

    async def _wait_for(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            await self._changed.wait()

    async def run(self) -> None:
        """Nothing to start here (the episodes come from outside); runs until cancelled."""
        try:
            await asyncio.Event().wait()
        finally:
            self.closed = True
            self.routes.close()
            self._wake()  # start requests waiting for capacity get a 503 now

    # --- the sink of proxy/online.py ---------------------------------------------------

    async def admit(self, group_id: str | None) -> str:
        group = self._open.get(group_id) if group_id else None
        if group is not None:
            if group.num_admitted >= group.size:
                raise ApiError(409, f"group {group_id!r} already has its {group.size} episodes "
                               "(rollout.group_size)", param="group_id", code="group_full")
            group.num_admitted += 1
            return group_id
        await self._wait_for(lambda: self.closed or self.capacity() > 0)
        if self.closed:
            raise ApiError(503, "the run is over: no new sessions", type="service_unavailable")
        key = group_id or "solo-" + secrets.token_hex(6)
        if key in self._open:  # another request opened it while we waited
            return await self.admit(group_id)
        self._open[key] = _OpenGroup(size=self.group_size if group_id else 1,
                                     started_version=self.version())
        return key

    def finish(self, group_key: str, *, data: dict, session_id: str, samples: list[Sample],
               reward: float | None, num_completions: int, error: str | None) -> None:
        group = self._open[group_key]
        group.data = group.data or data
        group.episodes.append(EpisodeResult(episode_id=session_id, samples=samples, reward=reward,
                                            num_completions=num_completions, error=error))
        if len(group.episodes) < group.size:
            return
        del self._open[group_key]
        result = GroupResult(data=group.data, episodes=group.episodes)
        if result.samples:
            self.num_accepted += 1
            self._ready.append((result, group.started_version))
        else:
            self.num_rejected += 1
        self._wake()

    async def next_batch(self) -> tuple[list[GroupResult], list[int]]:
        """Wait for `batch_size` finished groups; returns them and their start versions."""
        await self._wait_for(lambda: len(self._ready) >= self.batch_size)
        batch, self._ready = self._ready[: self.batch_size], self._ready[self.batch_size:]
        return [g for g, _ in batch], [v for _, v in batch]
