"""engine/ SGLang servers the run starts: command line, GPUs, one log each, health, stop.

`LaunchedServer` is one `python -m sglang.launch_server ...` child (the command is
`rollout.sglang.launch_command`, so tests launch the fake) in its own process group,
so stopping it stops every worker it forked. Its output goes to one log file; waiting
for `/health_generate` ends early when the process exits, and every launch error names
that log. Supervision (restarts, weights, routing) is `fleet.py`'s.

GPUs: without colocation the trainer keeps the first visible device and server i gets
the next `tp_size` ones; colocated servers share the trainer's devices and are started
with `--enable-memory-saver`. Visible devices are `CUDA_VISIBLE_DEVICES`, else the first
`scheduler.gpus_per_node`; with neither, servers inherit the environment as it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp

from areal_lite.engine.base import EngineError

if TYPE_CHECKING:
    from areal_lite.config import SGLangConfig

__all__ = ["LaunchedServer", "ServerLaunchError", "assign_gpus", "free_port",
           "server_argv", "visible_gpus"]


class ServerLaunchError(EngineError):
    """A launched server did not come up (or exited); the message names its log."""


def visible_gpus(gpus_per_node: int, env: dict[str, str] | None = None) -> list[str] | None:
    """Device ids the run may use, or None when nothing says (leave servers' env alone)."""
    env = os.environ if env is None else env
    listed = env.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [d for d in (x.strip() for x in listed.split(",")) if d]
    return [str(i) for i in range(gpus_per_node)] if gpus_per_node else None


def assign_gpus(cfg: SGLangConfig, visible: list[str] | None) -> list[str | None]:
    """CUDA_VISIBLE_DEVICES for each server (None = inherit)."""
    if visible is None:
        return [None] * cfg.num_servers
    offset = 0 if cfg.colocate else 1  # the trainer keeps the first device
    need = offset + cfg.num_servers * cfg.tp_size
    if need > len(visible):
        raise EngineError(
            f"rollout.sglang.num_servers = {cfg.num_servers} x tp_size = {cfg.tp_size} "
            f"needs {need} GPUs{'' if cfg.colocate else ' (one of them for the trainer)'}, "
            f"but {len(visible)} are visible ({','.join(visible) or 'none'}); lower them, "
            f"set rollout.sglang.colocate = true, or make more GPUs visible")
    return [",".join(visible[offset + i * cfg.tp_size: offset + (i + 1) * cfg.tp_size])
            for i in range(cfg.num_servers)]


def server_argv(cfg: SGLangConfig, model_path: str, port: int) -> list[str]:
    """The full command line of one server (SGLang's flags, protocol section 7)."""
    argv = list(cfg.launch_command) or [sys.executable, "-m", "sglang.launch_server"]
    argv += ["--model-path", model_path, "--host", cfg.host, "--port", str(port),
             "--tp-size", str(cfg.tp_size)]
    if cfg.mem_fraction_static:
        argv += ["--mem-fraction-static", str(cfg.mem_fraction_static)]
    if cfg.colocate:
        argv.append("--enable-memory-saver")
    if cfg.api_key:
        argv += ["--api-key", cfg.api_key]
    return argv + list(cfg.server_args)


def free_port(host: str) -> int:
    """A port nobody listens on now (the server binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class LaunchedServer:
    """One server process: `start`, `wait_healthy`, `wait_exit`, `stop` (idempotent)."""

    def __init__(self, index: int, argv: list[str], url: str, log_path: Path,
                 devices: str | None = None) -> None:
        self.index = index
        self.argv = argv
        self.url = url
        self.log_path = log_path
        self.devices = devices  # CUDA_VISIBLE_DEVICES; None = inherit
        self.proc: asyncio.subprocess.Process | None = None
        self.num_starts = 0

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def describe(self) -> str:
        return f"server {self.index} ({self.url}, log {self.log_path})"

    async def start(self) -> None:
        env = dict(os.environ)
        if self.devices is not None:
            env["CUDA_VISIBLE_DEVICES"] = self.devices
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.num_starts += 1
        with open(self.log_path, "ab") as log:  # the child keeps its own descriptor
            log.write(f"=== start {self.num_starts}: {' '.join(self.argv)}\n".encode())
            log.flush()
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv, stdin=asyncio.subprocess.DEVNULL, stdout=log,
                stderr=asyncio.subprocess.STDOUT, env=env, start_new_session=True)

    async def wait_healthy(self, session: aiohttp.ClientSession, timeout_s: float, *,
                           poll_s: float = 0.25) -> None:
        """Return once GET /health_generate answers 200; raise ServerLaunchError naming
        the log when the process exits first or `timeout_s` passes."""
        assert self.proc is not None, "start() first"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        exited = asyncio.ensure_future(self.proc.wait())
        try:
            while True:
                if exited.done():
                    raise ServerLaunchError(
                        f"{self.describe()} exited with code {exited.result()} before it "
                        f"was healthy; see the log:\n{self.log_tail()}")
                if await self.probe(session, timeout_s=5.0):
                    return
                if loop.time() >= deadline:
                    raise ServerLaunchError(
                        f"{self.describe()} not healthy after {timeout_s}s "
                        f"(rollout.sglang.launch_timeout_s); see the log:\n{self.log_tail()}")
                await asyncio.wait([exited], timeout=min(poll_s, deadline - loop.time()))
                poll_s = min(poll_s * 1.5, 2.0)
        finally:
            if not exited.done():
                exited.cancel()

    async def probe(self, session: aiohttp.ClientSession, *, timeout_s: float) -> bool:
        """Whether GET /health_generate answers 200 within `timeout_s` (a 1-token probe)."""
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            async with session.get(self.url + "/health_generate",
                                   timeout=aiohttp.ClientTimeout(total=timeout_s)) as r:
                return r.status == 200
        return False

    async def wait_exit(self) -> int:
        assert self.proc is not None, "start() first"
        return await self.proc.wait()

    async def stop(self, *, grace_s: float = 10.0) -> None:
        """SIGTERM the process group, SIGKILL it after `grace_s`; wait for the exit."""
        proc = self.proc
        if proc is None:
            return
        if proc.returncode is None:
            self._signal_group(signal.SIGTERM)
            try:
                await asyncio.wait_for(asyncio.shield(proc.wait()), grace_s)
            except TimeoutError:
                pass
        self.kill_now()  # workers it forked may outlive the leader
        with contextlib.suppress(asyncio.CancelledError):
            await proc.wait()

    def kill_now(self) -> None:
        """SIGKILL the whole process group, without awaiting (safe while unwinding)."""
        self._signal_group(signal.SIGKILL)

    def _signal_group(self, sig: int) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)  # start_new_session: pgid == pid

    def log_tail(self, num_lines: int = 20) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join("  | " + line for line in lines[-num_lines:])
