"""Rollout stage: run groups of agent episodes through the proxy and export samples.

`RolloutController.run_group(row, n)` starts n sessions, runs the workflow once per
session (inline coroutine or subprocess), assigns the returned rewards to the
session's completions, exports them (individual/concat, turn discount) and frees the
session. A failing episode (exception, timeout, bad reward, a request the engine
aborted) fails alone: it is counted, logged once with its traceback, and its group goes
on with the others (decision 5). An aborted request fails its episode even when the
agent caught the error: its partial output is never training data (decision 10). An
episode cancelled by shutdown is no failure: it is counted (`num_cancelled`) and the
count logged once when the rollout stack closes.
"""

from __future__ import annotations

import asyncio
import logging
import re
import traceback
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any

from areal_lite.engine.base import GenerationAborted
from areal_lite.proxy.app import ProxyServer
from areal_lite.proxy.sessions import Session
from areal_lite.rollout.agent import BadReward, run_workflow
from areal_lite.types import Sample

log = logging.getLogger(__name__)
_IDS = re.compile(r"[0-9a-fA-F]{8,}|\d+")  # request ids, hex keys, counts, ports


@dataclass(slots=True)
class EpisodeResult:
    episode_id: str
    samples: list[Sample]  # empty when the episode failed
    reward: float | None  # the scalar reward, or the mean of a dict's values
    num_completions: int  # completions recorded in the episode's tree
    error: str | None = None  # "timeout" | "bad_reward" | "aborted" | "exception:<Type>"
    score: float | None = None  # per episode: the scalar reward, or the best of a dict's values

    @property
    def failed(self) -> bool:
        return self.error is not None


@dataclass(slots=True)
class GroupResult:
    data: dict  # the dataset row
    episodes: list[EpisodeResult]

    @property
    def samples(self) -> list[Sample]:
        return [s for ep in self.episodes for s in ep.samples]

    @property
    def num_failed(self) -> int:
        return sum(ep.failed for ep in self.episodes)


@dataclass(slots=True)
class RolloutStats:
    num_episodes: int = 0
    num_failed: int = 0
    num_cancelled: int = 0  # episodes still running when the run shut down (not failures)
    pool_restarts: int = 0  # subproc worker pools started again after a worker died
    failures: dict[str, int] = field(default_factory=dict)  # error kind -> count
    _logged: set = field(default_factory=set)  # failure signatures already logged


class RolloutController:
    """Runs episodes of one workflow against one proxy; owns no resources itself."""

    def __init__(self, proxy: ProxyServer, workflow: Any, *, http_client: Any,
                 episode_timeout_s: float, max_concurrent: int,
                 pool: ProcessPoolExecutor | None = None,
                 new_pool: Callable[[], ProcessPoolExecutor] | None = None,
                 end_session: Callable[[str], str | None] | None = None) -> None:
        self.proxy, self.workflow, self.http_client, self.pool = proxy, workflow, http_client, pool
        self._new_pool = new_pool  # starts a replacement when a worker died (`_pool_broke`)
        self._pool_served = False  # an episode finished on the current pool
        self._end_session = end_session  # engine hook: forget the episode, say if aborted
        self.episode_timeout_s = episode_timeout_s
        self._slots = asyncio.Semaphore(max_concurrent)
        self.stats = RolloutStats()
        self.num_running = 0  # episodes in flight (staleness accounting)

    async def run_group(self, data: dict, n: int, *, greedy: bool = False) -> GroupResult:
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(self.run_episode(data, greedy=greedy)) for _ in range(n)]
        return GroupResult(data=data, episodes=[t.result() for t in tasks])

    async def run_episode(self, data: dict, *, greedy: bool = False) -> EpisodeResult:
        """One episode; `greedy` forces temperature 0 on all its requests (eval)."""
        async with self._slots:
            self.num_running += 1
            session = self.proxy.sessions.start(greedy=greedy)
            try:
                return await self._episode(session, data)
            finally:
                self.num_running -= 1
                if not session.ended:
                    self.proxy.sessions.end(session.id)
                if self._end_session is not None:
                    self._end_session(session.id)

    async def _episode(self, session: Session, data: dict) -> EpisodeResult:
        self.stats.num_episodes += 1
        pool = self.pool
        try:
            reward = await asyncio.wait_for(
                run_workflow(self.workflow, data, base_url=self.proxy.base_url,
                             api_key=session.key, http_client=self.http_client, pool=pool),
                self.episode_timeout_s)
            self._pool_served = self._pool_served or pool is self.pool
            _assign(session, reward)
        except asyncio.CancelledError:  # shutdown (trainer done, Ctrl-C): not the agent's fault
            self.stats.num_cancelled += 1
            raise
        except TimeoutError as e:
            return self._fail(session, "timeout", e)
        except BadReward as e:
            return self._fail(session, "bad_reward", e)
        except Exception as e:  # episode boundary: the agent's failure is its own
            if isinstance(e.__cause__, BrokenProcessPool):
                self._pool_broke(pool)
            aborted = self._end_session(session.id) if self._end_session else None
            if aborted is not None:
                return self._fail(session, "aborted", GenerationAborted(aborted))
            return self._fail(session, f"exception:{type(e).__name__}", e)
        aborted = self._end_session(session.id) if self._end_session else None
        if aborted is not None:  # the agent went on past the error: still no samples
            return self._fail(session, "aborted", GenerationAborted(aborted))
        samples = self.proxy.exporter(self.proxy.sessions.end(session.id))
        scalar = reward if isinstance(reward, float) else (
            sum(reward.values()) / len(reward) if reward else None)
        score = reward if isinstance(reward, float) else max(reward.values(), default=None)
        return EpisodeResult(episode_id=session.id, samples=samples, reward=scalar,
                             score=score, num_completions=len(session.cache))

    def _pool_broke(self, pool: ProcessPoolExecutor | None) -> None:
        """A subproc worker died (a crash, an OOM kill, `os._exit`): the executor then
        fails every episode it holds and refuses new ones, so a new pool takes its place.
        Not when the broken pool never finished an episode: its workers cannot even run
        one (a script without a `__main__` guard, an agent that fails to import), and
        restarting would only repeat that; its episodes keep failing with the reason."""
        if pool is None or pool is not self.pool or self._new_pool is None:
            return  # inline agents, or this pool was already replaced
        if not self._pool_served:
            log.error("the subproc agent pool broke before any episode finished on it; "
                      "it is not restarted (see the first failure's traceback)")
            self._new_pool = None
            return
        self.pool, self._pool_served = self._new_pool(), False
        pool.shutdown(wait=False, cancel_futures=True)
        self.stats.pool_restarts += 1
        log.warning("a subproc agent worker died: the episodes it held failed; a new worker "
                    "pool was started (%d restarts so far)", self.stats.pool_restarts)

    def close_pool(self) -> None:
        """Stop the current subproc pool (the run is over)."""
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)

    def log_shutdown(self) -> None:
        """One line for the episodes that shutdown cancelled (call once, at shutdown)."""
        if self.stats.num_cancelled:
            log.info("%d episodes still running at shutdown were cancelled",
                     self.stats.num_cancelled)

    def _fail(self, session: Session, kind: str, exc: BaseException) -> EpisodeResult:
        self.stats.num_failed += 1
        self.stats.failures[kind] = self.stats.failures.get(kind, 0) + 1
        # ids and numbers differ between otherwise identical failures: not in the key
        signature = (kind, _IDS.sub("#", str(exc)[:200]))
        if signature not in self.stats._logged:  # log each distinct failure once
            self.stats._logged.add(signature)
            tb = "".join(traceback.format_exception(exc))
            log.warning("episode %s failed (%s); further identical failures are only counted:\n%s",
                        session.id, kind, tb)
        return EpisodeResult(episode_id=session.id, samples=[], reward=None,
                             num_completions=len(session.cache), error=kind)


def _assign(session: Session, reward: float | dict[str, float]) -> None:
    """Attach the workflow's reward to the session's completions."""
    cache = session.cache
    if isinstance(reward, dict):
        try:
            cache.set_rewards(reward)  # all or nothing
        except KeyError as e:
            raise BadReward(str(e.args[0])) from None
    elif len(cache):
        cache.set_last_reward(reward)
