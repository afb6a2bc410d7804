"""engine/ SGLang client, server side: weight updates, memory, info, servers that come and go.

`SGLangEngine` inherits these from `SGLangAdmin` (client.py owns the request path). Every
weight change holds `weights_lock`, so a supervisor bringing a restarted server to the
current version (`load_weights_on`, fleet.py) never interleaves with an update. An
update that succeeds makes every server it reached routable again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from areal_lite.engine.sglang import weights as weights
from areal_lite.engine.sglang.control import SGLangControl
from areal_lite.engine.sglang.routing import SessionRouter

__all__ = ["SGLangAdmin"]


class SGLangAdmin:
    """The non-generate half of `SGLangEngine` (its attributes are set there)."""

    urls: list[str]
    control: SGLangControl
    router: SessionRouter
    weights_lock: asyncio.Lock
    on_disk_weights: Any
    _aborted: dict[str, str]
    _tp_size: int
    _version: int

    # -- weights -------------------------------------------------------------------

    async def update_weights(
        self,
        named_tensors: Mapping[str, object] | Iterable[tuple[str, object]],
        version: int,
        *,
        flush_cache: bool | None = None,
        load_format: str | None = None,
    ) -> None:
        """Colocated update by CUDA IPC handles (`/update_weights_from_tensor`)."""
        async with self.weights_lock:
            await weights.update_weights_from_tensor(
                self.control, named_tensors, version, tp_size=self._tp_size,
                flush_cache=flush_cache, load_format=load_format)
            self._set_version(version)

    async def update_weights_from_disk(
        self, model_path: str, version: int, *, load_format: str | None = None
    ) -> None:
        """Load a checkpoint directory on every server (aborts requests in flight)."""
        async with self.weights_lock:
            await weights.update_weights_from_disk(self.control, model_path, version,
                                                   load_format=load_format)
            if self.on_disk_weights is not None:  # a supervisor keeps it for restarts
                await self.on_disk_weights(model_path, version)
            self._set_version(version)

    async def init_weights_update_group(
        self, master_address: str, master_port: int, rank_offset: int, world_size: int,
        group_name: str = "weight_update_group", backend: str = "nccl", *,
        timeout_s: float = 600.0,
    ) -> None:
        """Servers join the trainer's process group (see sglang_weights for ranks)."""
        await weights.init_weights_update_group(
            self.control, master_address=master_address, master_port=master_port,
            rank_offset=rank_offset, world_size=world_size, group_name=group_name,
            backend=backend, tp_size=self._tp_size, timeout_s=timeout_s)

    async def destroy_weights_update_group(self, group_name: str = "weight_update_group"
                                           ) -> None:
        await weights.destroy_weights_update_group(self.control, group_name)

    async def update_weights_from_distributed(
        self, names: Sequence[str], dtypes: Sequence[Any], shapes: Sequence[Sequence[int]],
        version: int, group_name: str = "weight_update_group", *,
        flush_cache: bool | None = None, load_format: str | None = None,
        timeout_s: float = 600.0,
    ) -> None:
        """HTTP half of a broadcast update; the trainer broadcasts the tensors meanwhile."""
        await weights.update_weights_from_distributed(
            self.control, names, dtypes, shapes, version, group_name=group_name,
            flush_cache=flush_cache, load_format=load_format, timeout_s=timeout_s)
        self._set_version(version)

    def _set_version(self, version: int) -> None:
        """Every server the update reached now holds `version`: route to all of them."""
        self._version = version
        for url in self.control.urls:
            self.router.set_offline(url, False)

    # -- servers coming and going (a supervisor calls these) ------------------------

    def server_down(self, url: str) -> None:
        """`url` is gone: no routing, no control calls (retries to it stop)."""
        self.router.set_offline(url, True)
        if url in self.control.urls:
            self.control.urls.remove(url)

    def server_up(self, url: str, *, current: bool) -> None:
        """`url` is back; routable now if it holds the current weights (`current`), else
        after the next weight update reaches it."""
        if url not in self.control.urls:
            self.control.urls = [u for u in self.urls if u in self.control.urls or u == url]
        self.router.set_offline(url, not current)

    async def load_weights_on(self, url: str, model_path: str, version: int) -> None:
        """Bring one server to `version` from a checkpoint dir (caller holds weights_lock)."""
        await weights.update_weights_from_disk(self.control.only(url), model_path, version)

    def end_session(self, session_id: str) -> str | None:
        """The episode is over: drop its routing binding; why a request of it was
        aborted, if one was (SessionAware)."""
        self.router.forget(session_id)
        return self._aborted.pop(session_id, None)

    async def release_memory_occupation(self, tags: list[str] | None = None) -> None:
        await self.control.release_memory_occupation(tags)

    async def resume_memory_occupation(self, tags: list[str] | None = None) -> None:
        await self.control.resume_memory_occupation(tags)

    async def flush_cache(self) -> None:
        await self.control.flush_cache()

    async def get_model_info(self, url: str | None = None) -> dict[str, Any]:
        return await self.control.model_info(url)

    async def get_server_info(self, url: str | None = None) -> dict[str, Any]:
        return await self.control.server_info(url)

    async def check_health(self) -> dict[str, bool]:
        return await self.control.check_health()
