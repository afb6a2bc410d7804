"""Trainer -> engine, broadcast path: rank 0 of the process group the SGLang servers join.

For `rollout.sglang.weight_update = "distributed"` (protocol section 2). The trainer
listens on a TCPStore and forms a *separate* process group from it (never
`init_process_group`, so the trainer's default group stays free for other uses). Server
i's TP workers join as ranks `1 + i * tp_size + tp_rank`. On each update, the tensor
names, dtypes and shapes go to every server over HTTP while a worker thread broadcasts
the tensors from rank 0 in the same order.

    async with WeightGroup(engine, cfg.rollout.sglang) as group:  # servers join too
        await group.update(model, version)  # with generation paused (weight_sync)

Failures raise EngineError. That covers a server that refuses to join (the error names
its URL), ranks that do not all join within `weight_group_timeout_s`, and a broadcast
that times out. After a failed update the group cannot be used again (gloo drops its
connections): close it and open a new one.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import torch.distributed as dist

from areal_lite.engine.base import EngineError
from areal_lite.models import named_weights

if TYPE_CHECKING:
    from areal_lite.config import SGLangConfig
    from areal_lite.engine.sglang.client import SGLangEngine

__all__ = ["WeightGroup", "resolve_backend"]

log = logging.getLogger(__name__)
_T = TypeVar("_T")
_POLL_S = 0.02  # how often an abandonable join re-checks the store


def resolve_backend(name: str) -> str:
    """Map "auto" to "nccl" when CUDA is available and to "gloo" otherwise; an explicit
    "nccl" is checked for CUDA."""
    cuda = torch.cuda.is_available() and dist.is_nccl_available()
    if name == "auto":
        return "nccl" if cuda else "gloo"
    if name == "nccl" and not cuda:
        raise ValueError("rollout.sglang.weight_group_backend = 'nccl' needs CUDA and a torch "
                         "build with NCCL; use 'gloo' or 'auto'")
    if name not in ("nccl", "gloo"):
        raise ValueError(f"rollout.sglang.weight_group_backend must be auto, nccl or gloo, "
                         f"got {name!r}")
    return name


class WeightGroup:
    """The trainer's rank 0 in the servers' weight-update group (see module docstring)."""

    def __init__(self, engine: SGLangEngine, cfg: SGLangConfig, *,
                 group_name: str = "weight_update_group") -> None:
        self.engine = engine
        self.group_name = group_name
        self.host = cfg.weight_group_host or "127.0.0.1"  # what servers connect to
        self.port = cfg.weight_group_port  # where the store listens, once open
        self._listen_port = cfg.weight_group_port  # 0 = a free one on each open()
        self.backend = resolve_backend(cfg.weight_group_backend)
        self.timeout_s = cfg.weight_group_timeout_s  # join, each collective, each HTTP call
        self.world_size = 1 + len(engine.urls) * engine.tp_size
        self._pg: Any = None  # ProcessGroupGloo / ProcessGroupNCCL, rank 0
        self._keys: _AbandonableStore | None = None  # the only owner of the TCPStore
        self._broken: str | None = None  # why a failed update left the group unusable

    @property
    def is_open(self) -> bool:
        return self._pg is not None

    async def __aenter__(self) -> WeightGroup:
        await self.open()
        return self

    async def __aexit__(self, exc_type: object, *_: object) -> None:
        try:
            await self.close()
        except EngineError:
            if exc_type is None:
                raise
            log.warning("could not destroy weight-update group %r on the servers",
                        self.group_name, exc_info=True)

    async def open(self) -> None:
        """Form the group: rank 0 joins in a worker thread while every server is asked
        to join (`/init_weights_update_group`); returns once all ranks have joined."""
        if self._pg is not None:
            raise RuntimeError(f"weight-update group {self.group_name!r} is already open")
        cancel = threading.Event()
        keys = _AbandonableStore(await asyncio.to_thread(self._listen), self.group_name,
                                 "cpu" if self.backend == "gloo" else "cuda", cancel,
                                 self.timeout_s)
        http = self.engine.init_weights_update_group(
            self.host, self.port, rank_offset=1, world_size=self.world_size,
            group_name=self.group_name, backend=self.backend, timeout_s=self.timeout_s)
        try:
            self._pg = await _alongside(http, lambda: self._join(keys), cancel,
                                        wait_for_thread=True)
        except BaseException:
            keys.release()  # the store stops listening: servers' pending joins fail now
            raise
        self._keys, self._broken = keys, None

    async def update(self, model: torch.nn.Module, version: int) -> None:
        """Send `model`'s state dict to every server as `version` (call while paused)."""
        pg = self._pg
        if pg is None:
            raise RuntimeError(f"weight-update group {self.group_name!r} is not open; "
                               "`await group.open()` (or `async with group:`) first")
        if self._broken is not None:
            raise RuntimeError(f"weight-update group {self.group_name!r} failed in an earlier "
                               f"update ({self._broken}); close it and open a new one")
        named = named_weights(model)
        tensors = [t for _, t in named]
        cancel = threading.Event()
        http = self.engine.update_weights_from_distributed(
            [n for n, _ in named], [t.dtype for t in tensors], [tuple(t.shape) for t in tensors],
            version, self.group_name, timeout_s=self.timeout_s)
        try:
            await _alongside(http, lambda: self._broadcast(pg, tensors, cancel), cancel,
                             wait_for_thread=False)
        except BaseException as e:
            self._broken = f"{type(e).__name__}: {e}"
            raise

    async def close(self) -> None:
        """Destroy the group on the servers and drop rank 0 (no-op when not open)."""
        pg, keys, self._pg, self._keys = self._pg, self._keys, None, None
        if pg is None:
            return
        try:
            await self.engine.destroy_weights_update_group(self.group_name)
        finally:
            if self.backend == "nccl":
                pg.shutdown()  # free the communicator now, not at interpreter exit
            if keys is not None:
                keys.release()

    # -- worker-thread halves ------------------------------------------------------

    def _listen(self) -> dist.TCPStore:
        try:
            store = dist.TCPStore(self.host, self._listen_port, self.world_size, is_master=True,
                                  timeout=timedelta(seconds=self.timeout_s),
                                  wait_for_workers=False)
        except (RuntimeError, OSError) as e:
            raise EngineError(
                f"cannot listen on {self.host}:{self._listen_port} for the weight-update group "
                f"({e}); set rollout.sglang.weight_group_port to a free port (0 = any)") from e
        self.port = store.port
        return store

    def _join(self, keys: _AbandonableStore) -> Any:
        timeout = timedelta(seconds=self.timeout_s)
        try:
            if self.backend == "gloo":  # blocks until every rank has joined
                pg = dist.ProcessGroupGloo(keys, 0, self.world_size, timeout)
            else:  # connects lazily, at the first broadcast
                opts = dist.ProcessGroupNCCL.Options()
                opts._timeout = timeout
                pg = dist.ProcessGroupNCCL(keys, 0, self.world_size, opts)
            pg._set_sequence_number_for_group()  # as torch does; older torch publishes it
        except Exception as e:
            raise EngineError(
                f"rank 0 could not form weight-update group {self.group_name!r} at "
                f"{self.host}:{self.port} (world_size {self.world_size}, {self.backend}): {e}; "
                "check that every server can reach that address "
                "(rollout.sglang.weight_group_host / weight_group_port)") from e
        return pg

    def _broadcast(self, pg: Any, tensors: list[torch.Tensor], cancel: threading.Event) -> None:
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        device = "cpu" if self.backend == "gloo" else "cuda"
        i = 0
        try:
            for i, t in enumerate(tensors):
                if cancel.is_set():  # the HTTP side failed; that error is reported
                    return
                pg.broadcast([t.detach().to(device).contiguous()], opts).wait()
            if device == "cuda":
                torch.cuda.current_stream().synchronize()
        except Exception as e:
            raise EngineError(
                f"broadcasting weights to the servers failed at tensor {i + 1}/{len(tensors)} "
                f"({e}); weight-update group {self.group_name!r} cannot be used again") from e


class _AbandonableStore(dist.Store):
    """The group's view of the rendezvous store. It is the only owner of the TCPStore,
    so `release()` stops it listening, even while tracebacks still hold this object.

    Keys are laid out as on SGLang's servers. `init_custom_process_group` prefixes the
    tcp:// rendezvous store with the group name, then torch's
    `_new_process_group_helper` adds "<group_name>/" and "<device>/" ("cpu" for gloo,
    "cuda" for nccl). Waits give up once `cancel` is set: a gloo join blocks inside them,
    and `open` must be able to stop a join that cannot finish (a server refused).
    """

    def __init__(self, store: dist.TCPStore, group_name: str, device: str,
                 cancel: threading.Event, timeout_s: float) -> None:
        super().__init__()
        inner = dist.PrefixStore(group_name, store)
        inner = dist.PrefixStore(f"{group_name}/", inner)
        self._inner: Any = dist.PrefixStore(f"{device}/", inner)
        self._cancel = cancel
        self._timeout_s = timeout_s

    def release(self) -> None:
        self._inner = None

    def set(self, key: str, value: Any) -> None:
        self._inner.set(key, value)

    def get(self, key: str) -> bytes:
        self.wait([key])
        return self._inner.get(key)

    def add(self, key: str, amount: int) -> int:
        return self._inner.add(key, amount)

    def check(self, keys: list[str]) -> bool:
        return self._inner.check(keys)

    def wait(self, keys: list[str], timeout: timedelta | None = None) -> None:
        limit_s = self._timeout_s if timeout is None else timeout.total_seconds()
        deadline = time.monotonic() + limit_s
        while not self._inner.check(keys):
            if self._cancel.wait(_POLL_S):
                raise ConnectionAbortedError("join abandoned: the servers' side failed")
            if time.monotonic() > deadline:
                raise TimeoutError(f"not every rank joined within {limit_s:g}s")


async def _alongside(http: Awaitable[Any], work: Callable[[], _T], cancel: threading.Event, *,
                     wait_for_thread: bool) -> _T:
    """Run blocking `work` in a worker thread while `http` runs, and return its result.

    The first failure stops the other side: `cancel` is set and the HTTP call is
    cancelled. The HTTP error is raised if there is one, since it names the servers.
    A thread blocked in a collective cannot be interrupted. Unless `wait_for_thread`,
    it is left to end by its own timeout, and its outcome is discarded.
    """
    thread = asyncio.ensure_future(asyncio.to_thread(work))
    call = asyncio.ensure_future(http)
    for task in (thread, call):
        task.add_done_callback(_retrieve)
    try:
        await asyncio.wait((thread, call), return_when=asyncio.FIRST_EXCEPTION)
    finally:  # also when we are cancelled
        if not (thread.done() and call.done()):
            cancel.set()
            call.cancel()
            await asyncio.wait((call, thread) if wait_for_thread else (call,))
    for task in (call, thread):
        if task.done() and not task.cancelled() and task.exception() is not None:
            raise task.exception()
    return thread.result()


def _retrieve(task: asyncio.Future) -> None:
    """Mark a failure as seen (the one reported is chosen in `_alongside`)."""
    if not task.cancelled():
        task.exception()
