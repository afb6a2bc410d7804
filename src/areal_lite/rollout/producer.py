"""Rollout stage: keep groups of episodes flowing under the staleness bound.

Decision 8: a new group may start only while
    (max_head_offpolicyness + version + 1) * batch_size > accepted + running
counted in groups, where `accepted` counts finished groups that produced samples
(consumed or queued). With max_head_offpolicyness = 0 this is synchronous RL: the
groups of step k+1 start only after the weights of step k are in the engine.

Prompts are drawn from a `PromptStream` by cursor; cursors of groups that are
running or queued but not yet trained are reported by `unfinished()` so a checkpoint
can hand them out again after a restart (no prompt trained twice, none skipped).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from areal_lite.data.prompts import PromptStream
from areal_lite.rollout.controller import GroupResult, RolloutController

log = logging.getLogger(__name__)


class GroupProducer:
    """Background task that runs groups and queues the finished ones."""

    def __init__(self, controller: RolloutController, prompts: PromptStream, *,
                 batch_size: int, group_size: int, max_head_offpolicyness: int,
                 version: Callable[[], int], consumed: int = 0,
                 max_failures_frac: float = 1.0) -> None:
        self.controller, self.prompts = controller, prompts
        self.max_failures_frac = max_failures_frac  # failed episodes a batch may hold (fraction)
        self.num_batches_dropped = 0  # batches over that limit: not trained on
        self.batch_size, self.group_size = batch_size, group_size
        self.eta = max_head_offpolicyness
        self.version = version  # current weight version of the engine
        # groups finished with samples (queued or consumed); a resumed run starts with the
        # groups its earlier steps consumed, so the bound holds from the first new group
        self.num_accepted = consumed
        self.num_rejected = 0  # groups whose every episode failed
        self.rejected_streak = 0  # consecutive rejected groups (the agent may be broken)
        self._running: dict[int, asyncio.Task] = {}  # cursor -> task
        self._ready: list[tuple[int, GroupResult, int]] = []  # (cursor, group, start version)
        self._changed = asyncio.Condition()  # notified on group end and version change

    def capacity(self) -> int:
        """Groups that may start now under the staleness bound."""
        limit = (self.eta + self.version() + 1) * self.batch_size
        return limit - self.num_accepted - len(self._running)

    def unfinished(self) -> list[int]:
        """Cursors drawn but not yet handed to the trainer."""
        return sorted([*self._running, *(c for c, _, _ in self._ready)])

    async def notify(self) -> None:
        """Call after the version changes: capacity may have grown."""
        async with self._changed:
            self._changed.notify_all()

    async def run(self) -> None:
        """Start groups whenever there is capacity; runs until cancelled.

        The group tasks live in this coroutine's TaskGroup: an exception that escapes a
        group (past the episode boundary, so a bug or an engine failure, not an agent's)
        cancels the other groups and ends `run` with that exception, which the caller's
        own TaskGroup (the trainer's) turns into the run's failure. Cancelling `run`
        cancels every running group, whose episodes abort their engine requests.
        """
        async with asyncio.TaskGroup() as groups:
            while True:
                async with self._changed:
                    await self._changed.wait_for(lambda: self.capacity() > 0)
                for _ in range(self.capacity()):
                    (drawn,) = self.prompts.draw(1)
                    task = groups.create_task(self._group(drawn.cursor, drawn.row))
                    self._running[drawn.cursor] = task

    async def _group(self, cursor: int, row: dict) -> None:
        started = self.version()
        try:
            group = await self.controller.run_group(row, self.group_size)
        finally:
            self._running.pop(cursor, None)
        if group.samples:
            self.num_accepted += 1
            self.rejected_streak = 0
            self._ready.append((cursor, group, started))
        else:
            self.num_rejected += 1
            self.rejected_streak += 1
        async with self._changed:
            self._changed.notify_all()

    async def next_batch(self) -> tuple[list[GroupResult], list[int]]:
        """Wait for `batch_size` finished groups; returns them and their start versions.
        A batch whose failed episodes exceed `max_failures_frac` is dropped (counted in
        `num_batches_dropped`, logged) and the next one awaited; its groups no longer
        count against the staleness bound."""
        give_up = 4 * self.batch_size
        while True:
            async with self._changed:
                await self._changed.wait_for(lambda: len(self._ready) >= self.batch_size
                                             or self.rejected_streak >= give_up)
                if len(self._ready) < self.batch_size:
                    raise RuntimeError(f"every episode of the last {self.rejected_streak} groups "
                                       "failed; see the logged traceback of the agent's failure")
                batch, self._ready = self._ready[: self.batch_size], self._ready[self.batch_size:]
                groups = [g for _, g, _ in batch]
                num_failed = sum(g.num_failed for g in groups)
                frac = num_failed / max(1, sum(len(g.episodes) for g in groups))
                if frac <= self.max_failures_frac:
                    return groups, [v for _, _, v in batch]
                self.num_batches_dropped += 1
                self.num_accepted -= len(batch)  # never trained: room for new groups
                self._changed.notify_all()
            log.warning("dropped a batch: %d of its episodes failed (%.0f%% > "
                        "rollout.max_episode_failures_frac = %s); %d batches dropped so far",
                        num_failed, 100 * frac, self.max_failures_frac, self.num_batches_dropped)
