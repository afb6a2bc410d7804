"""engine/ fake SGLang, weight-update group: this server's TP ranks in the trainer's group.

This works as in SGLang (protocol section 2). `/init_weights_update_group` joins a
tcp://-initialised process group as ranks `rank_offset .. rank_offset + tp_size - 1`,
and replies only once every rank of the group has joined. After that,
`/update_weights_from_distributed` receives each announced tensor as a broadcast from
rank 0. Only gloo is supported, so no GPU is needed. Each rank works in its own thread,
so the aiohttp loop never blocks; torch is imported only when a group is joined.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

__all__ = ["GroupMember"]


class GroupMember:
    """This fake server's ranks in one gloo weight-update group."""

    def __init__(self, body: dict[str, Any], tp_size: int, timeout_s: float) -> None:
        self.address = str(body["master_address"])
        self.port = int(body["master_port"])
        self.world_size = int(body["world_size"])
        self.ranks = [int(body["rank_offset"]) + i for i in range(tp_size)]
        self.group_name = str(body.get("group_name", "weight_update_group"))
        self._timeout = timedelta(seconds=timeout_s)  # join and each broadcast
        self._pool = ThreadPoolExecutor(max_workers=tp_size,
                                        thread_name_prefix="fake-sglang-rank")
        self._pgs: list[Any] = []  # one ProcessGroupGloo per TP rank

    async def join(self) -> None:
        """Join as every rank; returns once the whole group has formed."""
        self._pgs = await self._each(self._join_rank, self.ranks)

    async def receive(self, names: Sequence[str], dtypes: Sequence[str],
                      shapes: Sequence[Sequence[int]]) -> dict[str, Any]:
        """Receive one broadcast per name, in order, on every rank; rank 0's tensors."""
        import torch

        specs = [(n, getattr(torch, d), tuple(int(x) for x in s))
                 for n, d, s in zip(names, dtypes, shapes)]
        per_rank = await self._each(lambda pg: _receive(pg, specs), self._pgs)
        return per_rank[0]  # each TP rank gets the full tensors (SGLang shards them later)

    def close(self) -> None:
        """Drop the group (a thread stuck in a collective ends at its timeout)."""
        self._pgs = []
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def _each(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        loop = asyncio.get_running_loop()
        return await asyncio.gather(*(loop.run_in_executor(self._pool, fn, x) for x in items))

    def _join_rank(self, rank: int) -> Any:
        import torch.distributed as dist

        store = dist.TCPStore(self.address, self.port, self.world_size, is_master=False,
                              timeout=self._timeout)
        # key prefixes of SGLang's init_custom_process_group, then of torch's
        # _new_process_group_helper (group name, then device)
        store = dist.PrefixStore(self.group_name, store)
        store = dist.PrefixStore(f"{self.group_name}/", store)
        store = dist.PrefixStore("cpu/", store)
        pg = dist.ProcessGroupGloo(store, rank, self.world_size, self._timeout)
        pg._set_sequence_number_for_group()
        return pg


def _receive(pg: Any, specs: list[tuple[str, Any, tuple[int, ...]]]) -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    out = {}
    for name, dtype, shape in specs:
        t = torch.empty(shape, dtype=dtype)
        pg.broadcast([t], opts).wait()
        out[name] = t
    return out
