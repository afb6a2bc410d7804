"""engine/ SGLang weight updates: the HTTP side of swapping new weights into servers.

Three ways in (protocol section 2): tensors by CUDA IPC handle for a colocated trainer
(`/update_weights_from_tensor`), a broadcast from the trainer over NCCL or gloo
(`/init_weights_update_group` + `/update_weights_from_distributed`; the broadcast itself
is the trainer's job), or a checkpoint on disk (`/update_weights_from_disk`). Each
sends `weight_version=str(version)` and raises EngineError unless every server says
`{"success": true}`. `flush_cache` is sent only when the caller sets it: it must be
false after a `retract`/`in_place` pause, and the default (true) is right after the
`abort` pause the engine uses.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from areal_lite.engine.base import EngineError
from areal_lite.engine.sglang.control import SGLangControl

__all__ = [
    "destroy_weights_update_group",
    "dtype_name",
    "init_weights_update_group",
    "serialize_named_tensors",
    "update_weight_version",
    "update_weights_from_disk",
    "update_weights_from_distributed",
    "update_weights_from_tensor",
]

NamedTensors = Mapping[str, Any] | Iterable[tuple[str, Any]]
_LOADS = ("/update_weights_from_tensor", "/update_weights_from_disk",
          "/update_weights_from_distributed")  # calls that change the weights


def serialize_named_tensors(named_tensors: NamedTensors, *, tp_size: int = 1) -> list[str]:
    """base64 ForkingPickler pickles of [(name, tensor)], one entry per TP rank.

    CUDA tensors travel as IPC handles (same node only); CPU tensors as shared memory.
    """
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing  # noqa: F401  (registers the tensor reducers)

    if tp_size < 1:
        raise ValueError(f"tp_size must be >= 1, got {tp_size}")
    items = list(named_tensors.items() if isinstance(named_tensors, Mapping) else named_tensors)
    if not items:
        raise ValueError("update_weights got no tensors; pass {name: tensor, ...}")
    payload = base64.b64encode(bytes(ForkingPickler.dumps(items))).decode("ascii")
    return [payload] * tp_size


def dtype_name(dtype: Any) -> str:
    """torch attribute name SGLang expects ("bfloat16"), from a dtype or a string."""
    return str(dtype).removeprefix("torch.")


def _options(version: int | None, **extra: Any) -> dict[str, Any]:
    body = {k: v for k, v in extra.items() if v is not None}
    if version is not None:
        body["weight_version"] = str(version)
    return body


def _check(results: list[Any], path: str, urls: Sequence[str]) -> None:
    bad = [
        f"{u}: {r.get('message') if isinstance(r, dict) else r!r}"
        for u, r in zip(urls, results)
        if not (isinstance(r, dict) and r.get("success") is True)
    ]
    if bad:
        raise EngineError(f"{path} did not succeed on {len(bad)} servers: " + "; ".join(bad))


async def _update(control: SGLangControl, path: str, body: Any, timeout_s: float) -> None:
    try:
        replies = await control.call_each(path, body, timeout_s=timeout_s)
    except EngineError as e:
        if path not in _LOADS:
            raise
        # add what to do to the per-server messages
        raise type(e)(f"{e} (the servers may hold mixed weights; retry the update)") from e
    _check(list(replies.values()), path, list(replies))


async def _collective(control: SGLangControl, path: str, body: Any, timeout_s: float) -> None:
    """`_update` for calls that block in a collective on the servers (joining the group,
    receiving a broadcast). If one server fails, the others wait for it in vain. So the
    first failure cancels the rest and is raised at once, naming the server."""
    urls = control.urls
    bodies = [body(i, u) if callable(body) else body for i, u in enumerate(urls)]
    calls = {asyncio.ensure_future(control.call(u, path, b, timeout_s=timeout_s)): u
             for u, b in zip(urls, bodies)}
    pending = set(calls)
    try:
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            bad = []
            for task in done:
                try:
                    r = task.result()
                except EngineError as e:  # names url and path
                    bad.append(str(e))
                    continue
                if not (isinstance(r, dict) and r.get("success") is True):
                    bad.append(f"{calls[task]}: {r.get('message') if isinstance(r, dict) else r!r}")
            if bad:
                hint = " (the servers may hold mixed weights; retry)" if path in _LOADS else ""
                raise EngineError(f"{path} failed: " + "; ".join(bad) + hint
                                  + f"; stopped waiting for {len(pending)} other servers")
    finally:
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)


async def update_weights_from_tensor(
    control: SGLangControl,
    named_tensors: NamedTensors,
    version: int,
    *,
    tp_size: int = 1,
    load_format: str | None = None,
    flush_cache: bool | None = None,
    timeout_s: float = 600.0,
) -> None:
    body = {
        "serialized_named_tensors": serialize_named_tensors(named_tensors, tp_size=tp_size),
        **_options(version, load_format=load_format, flush_cache=flush_cache),
    }
    await _update(control, "/update_weights_from_tensor", body, timeout_s)


async def update_weights_from_disk(
    control: SGLangControl,
    model_path: str,
    version: int,
    *,
    load_format: str | None = None,
    flush_cache: bool | None = None,
    timeout_s: float = 1800.0,
) -> None:
    body = {
        "model_path": str(model_path),
        "abort_all_requests": True,
        **_options(version, load_format=load_format, flush_cache=flush_cache),
    }
    await _update(control, "/update_weights_from_disk", body, timeout_s)


async def init_weights_update_group(
    control: SGLangControl,
    *,
    master_address: str,
    master_port: int,
    rank_offset: int,
    world_size: int,
    group_name: str = "weight_update_group",
    backend: str = "nccl",
    tp_size: int = 1,
    timeout_s: float = 600.0,
) -> None:
    """Every server joins the trainer's process group; server i's TP workers take
    ranks `rank_offset + i * tp_size + tp_rank`. Blocks until all ranks have joined,
    so the trainer must join concurrently (as rank 0)."""

    def body(i: int, _url: str) -> dict[str, Any]:
        return {
            "master_address": master_address,
            "master_port": int(master_port),
            "rank_offset": rank_offset + i * tp_size,
            "world_size": world_size,
            "group_name": group_name,
            "backend": backend,
        }

    await _collective(control, "/init_weights_update_group", body, timeout_s)


async def destroy_weights_update_group(
    control: SGLangControl, group_name: str = "weight_update_group", *, timeout_s: float = 60.0
) -> None:
    await _update(control, "/destroy_weights_update_group", {"group_name": group_name},
                  timeout_s)


async def update_weights_from_distributed(
    control: SGLangControl,
    names: Sequence[str],
    dtypes: Sequence[Any],
    shapes: Sequence[Sequence[int]],
    version: int,
    *,
    group_name: str = "weight_update_group",
    load_format: str | None = None,
    flush_cache: bool | None = None,
    timeout_s: float = 600.0,
) -> None:
    """Announce a broadcast of `names` from rank 0; the trainer broadcasts concurrently."""
    if not len(names) == len(dtypes) == len(shapes):
        raise ValueError(f"names, dtypes and shapes must have equal lengths, got "
                         f"{len(names)}, {len(dtypes)}, {len(shapes)}")
    body = {
        "names": list(names),
        "dtypes": [dtype_name(d) for d in dtypes],
        "shapes": [[int(x) for x in s] for s in shapes],
        "group_name": group_name,
        **_options(version, load_format=load_format, flush_cache=flush_cache),
    }
    await _collective(control, "/update_weights_from_distributed", body, timeout_s)


async def update_weight_version(
    control: SGLangControl, version: int, *, abort_all_requests: bool = False,
    timeout_s: float = 60.0,
) -> None:
    """Relabel the servers' weights without loading anything."""
    body = {"new_version": str(version), "abort_all_requests": abort_all_requests}
    await _update(control, "/update_weight_version", body, timeout_s)
