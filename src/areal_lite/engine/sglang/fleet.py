"""engine/ SGLang servers the run owns: launch all, supervise each, stop all.

`async with ServerFleet(cfg.rollout.sglang, model_path=..., run_dir=..., session=...)`
launches `num_servers` servers (launcher.py), waits until every one is healthy, and on
exit (success, failure or Ctrl-C) stops their process groups. `supervise(engine)`
watches each process: one that exits is taken out of the engine's routing and control
calls, restarted after a backoff (at most `max_restarts` times, counted in
`num_restarts`), and brought to the engine's current weight version before it gets
traffic again: from the last checkpoint the engine loaded from disk (kept here, hard
linked, because the trainer deletes its copy), or, for tensor updates, by holding it
out of routing until the next update reaches it. A server of a distributed (NCCL)
weight-update group cannot rejoin it, so there an exit ends the run. When a server
cannot come back, `wait_failure()` raises an error naming it and its log.

`servers.json` in the log directory lists each server's url, pid and log.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import aiohttp

from areal_lite.engine.base import EngineError
from areal_lite.engine.sglang.launcher import (
    LaunchedServer,
    ServerLaunchError,
    assign_gpus,
    free_port,
    server_argv,
    visible_gpus,
)

if TYPE_CHECKING:
    from areal_lite.config import SGLangConfig
    from areal_lite.engine.sglang.client import SGLangEngine

__all__ = ["ServerFleet"]

log = logging.getLogger(__name__)


class ServerFleet:
    """The launched servers of one run (module docstring)."""

    def __init__(self, cfg: SGLangConfig, *, model_path: str, log_dir: Path,
                 session: aiohttp.ClientSession, gpus_per_node: int = 0) -> None:
        self.cfg = cfg
        self.log_dir = Path(log_dir)
        self._session = session
        devices = assign_gpus(cfg, visible_gpus(gpus_per_node))
        self.servers: list[LaunchedServer] = []
        for i in range(cfg.num_servers):
            port = cfg.base_port + i if cfg.base_port else free_port(cfg.host)
            self.servers.append(LaunchedServer(
                i, server_argv(cfg, model_path, port), f"http://{cfg.host}:{port}",
                self.log_dir / f"server_{i}.log", devices[i]))
        self.num_restarts = 0  # over all servers
        self._restarts = [0] * cfg.num_servers  # per server
        self._engine: SGLangEngine | None = None
        self._watchers: list[asyncio.Task] = []
        self._failure: asyncio.Future | None = None
        self._stopping = False
        self._weights: tuple[Path, int] | None = None  # kept checkpoint dir, its version
        self._changed = asyncio.Condition()  # notified when a server goes or comes back

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.servers]

    @property
    def num_down(self) -> int:
        engine = self._engine
        return 0 if engine is None else len(engine.router.offline)

    def metrics(self) -> dict[str, float]:
        """Totals since start: restarts, servers down now, and the engine's view."""
        out = {"servers/restarts": float(self.num_restarts),
               "servers/down": float(self.num_down)}
        if self._engine is not None:
            e = self._engine
            out |= {"servers/affinity_misses": float(e.router.num_affinity_misses),
                    "servers/aborted_requests": float(e.num_aborted),
                    "servers/resubmitted": float(e.num_resubmitted),
                    "servers/control_retries": float(e.control.num_retries)}
        return out

    # -- lifecycle -----------------------------------------------------------------

    async def __aenter__(self) -> ServerFleet:
        self._failure = asyncio.get_running_loop().create_future()
        try:
            for s in self.servers:
                await s.start()
            self._write_manifest()
            log.info("launched %d SGLang servers: %s (logs in %s)", len(self.servers),
                     ", ".join(self.urls), self.log_dir)
            await asyncio.gather(*(s.wait_healthy(self._session, self.cfg.launch_timeout_s)
                                   for s in self.servers))
        except BaseException:
            await self._stop_all()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stop_all()

    async def _stop_all(self) -> None:
        self._stopping = True
        for task in self._watchers:
            task.cancel()
        try:
            await asyncio.gather(*self._watchers, return_exceptions=True)
            await asyncio.gather(*(s.stop() for s in self.servers))
        finally:  # cancelled while stopping (a second Ctrl-C): leave no orphan
            for s in self.servers:
                s.kill_now()
            self._watchers.clear()
            if self._weights is not None:
                shutil.rmtree(self._weights[0], ignore_errors=True)

    def supervise(self, engine: SGLangEngine) -> None:
        """Watch every server for `engine`; keep disk checkpoints for restarts."""
        self._engine = engine
        engine.on_disk_weights = self._keep_weights
        self._watchers = [asyncio.create_task(self._watch(s), name=f"sglang-server-{s.index}")
                          for s in self.servers]
        if self.cfg.health_check_interval_s:
            self._watchers += [asyncio.create_task(self._probe(s), name=f"sglang-probe-{s.index}")
                               for s in self.servers]

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        """Return once `predicate()` holds, checked whenever a server goes or comes back."""
        async with self._changed:
            await self._changed.wait_for(lambda: predicate() or bool(
                self._failure is not None and self._failure.done()))

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def wait_failure(self) -> NoReturn:
        """Block until a server cannot come back, then raise that error."""
        assert self._failure is not None, "enter the fleet first"
        await self._failure
        raise AssertionError("unreachable: the failure future only ever holds an error")

    # -- supervision ---------------------------------------------------------------

    async def _watch(self, server: LaunchedServer) -> None:
        try:
            while True:
                code = await server.wait_exit()
                if self._stopping:
                    return
                log.warning("%s exited with code %s; restarting it", server.describe(), code)
                assert self._engine is not None
                self._engine.server_down(server.url)
                if self.cfg.weight_update == "distributed":
                    raise ServerLaunchError(
                        f"{server.describe()} exited with code {code}; a restarted server "
                        f"cannot rejoin the trainer's weight-update group, so the run "
                        f"stops (use rollout.sglang.weight_update = 'disk' to survive "
                        f"restarts). Its log:\n{server.log_tail()}")
                await self._notify()
                await self._restart(server, code)
                await self._notify()
        except ServerLaunchError as e:
            log.error("%s", e)
            if self._failure is not None and not self._failure.done():
                self._failure.set_exception(e)
            await self._notify()

    async def _probe(self, server: LaunchedServer, misses_to_kill: int = 3) -> None:
        """Kill a server that is up but stopped answering (a stall): `_watch` then
        restarts it. Not probed while down or paused (a paused server's probe waits)."""
        interval = self.cfg.health_check_interval_s
        timeout_s = min(30.0, max(1.0, 3 * interval))
        misses = 0
        while True:
            await asyncio.sleep(interval)
            engine = self._engine
            if engine is None or engine.paused or server.url in engine.router.offline:
                misses = 0
                continue
            misses = 0 if await server.probe(self._session, timeout_s=timeout_s) else misses + 1
            if misses >= misses_to_kill:
                log.warning("%s missed %d health probes in a row; killing it to restart it",
                            server.describe(), misses)
                server.kill_now()
                misses = 0

    async def _restart(self, server: LaunchedServer, code: int) -> None:
        cfg = self.cfg
        while True:
            i = server.index
            if self._restarts[i] >= cfg.max_restarts:
                raise ServerLaunchError(
                    f"{server.describe()} exited (last code {code}) and was restarted "
                    f"{self._restarts[i]} times (rollout.sglang.max_restarts = "
                    f"{cfg.max_restarts}); giving up. Its log:\n{server.log_tail()}")
            self._restarts[i] += 1
            self.num_restarts += 1
            await asyncio.sleep(cfg.restart_backoff_s * 2 ** (self._restarts[i] - 1))
            await server.start()
            self._write_manifest()
            try:
                await server.wait_healthy(self._session, cfg.launch_timeout_s)
                await self._catch_up(server)
                log.info("%s is back (restart %d)", server.describe(), self._restarts[i])
                return
            except EngineError as e:
                log.warning("restart %d of %s failed: %s", self._restarts[i],
                            server.describe(), e)
                server.kill_now()
                code = await server.wait_exit()

    async def _catch_up(self, server: LaunchedServer) -> None:
        """Give the restarted server the engine's current weights, then traffic."""
        engine = self._engine
        assert engine is not None
        async with engine.weights_lock:  # no update runs meanwhile
            version = engine.version
            current = version == engine.initial_version
            if not current and self._weights is not None and self._weights[1] == version:
                await engine.load_weights_on(server.url, str(self._weights[0]), version)
                current = True
            if not current:
                log.warning("%s holds the initial weights, not version %d: it gets traffic "
                            "after the next weight update", server.describe(), version)
            engine.server_up(server.url, current=current)

    async def _keep_weights(self, path: str, version: int) -> None:
        """Keep the checkpoint the servers just loaded (hard links; the caller may delete
        its own copy) and drop the one before."""
        dest = self.log_dir / f"weights_v{version}"
        await asyncio.to_thread(_link_tree, Path(path), dest)
        old, self._weights = self._weights, (dest, version)
        if old is not None and old[0] != dest:
            await asyncio.to_thread(shutil.rmtree, old[0], True)

    def _write_manifest(self) -> None:
        rows: list[dict[str, Any]] = [
            {"index": s.index, "url": s.url, "pid": s.pid, "log": str(s.log_path),
             "starts": s.num_starts, "devices": s.devices} for s in self.servers]
        tmp = self.log_dir / "servers.json.tmp"
        tmp.write_text(json.dumps(rows, indent=1))
        tmp.replace(self.log_dir / "servers.json")


def _link_tree(src: Path, dest: Path) -> None:
    shutil.rmtree(dest, ignore_errors=True)

    def link(s: str, d: str) -> None:
        try:
            os.link(s, d)
        except OSError:  # another filesystem: copy
            shutil.copy2(s, d)

    with contextlib.suppress(FileExistsError):
        shutil.copytree(src, dest, copy_function=link)
