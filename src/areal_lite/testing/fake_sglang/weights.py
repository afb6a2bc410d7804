"""engine/ fake SGLang, weight endpoints: what every update call checks and does.

`apply_update` handles each endpoint in four steps:
1. A check validates the body like SGLang would. On failure the reply is
   `{"success": false, "message"}` with status 400.
2. Calls that load weights take the writer lock.
3. An action applies the side effect. For gloo groups that means really joining the
   group, receiving, or leaving (`fake_sglang_group`); nccl groups are only recorded.
4. The weight version is set.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Awaitable, Callable
from typing import Any

from areal_lite.testing.fake_sglang.group import GroupMember
from areal_lite.testing.fake_sglang.state import FakeSGLangState

__all__ = ["DTYPES", "LOADS", "UPDATE_CHECKS", "apply_update"]

# torch attribute names SGLang resolves with getattr(torch, name)
DTYPES = frozenset({"float32", "float16", "bfloat16", "float64", "float8_e4m3fn",
                    "float8_e5m2", "int8", "uint8", "int16", "int32", "int64", "bool"})


def _check_disk(st: FakeSGLangState, body: dict) -> str | None:
    return None if isinstance(body.get("model_path"), str) else "model_path is required"


def _check_tensor(st: FakeSGLangState, body: dict) -> str | None:
    entries = body.get("serialized_named_tensors")
    if not isinstance(entries, list) or not entries:
        return "serialized_named_tensors must be a non-empty list (one entry per TP rank)"
    try:
        raw = [base64.b64decode(e, validate=True) for e in entries]
    except (binascii.Error, TypeError, ValueError):
        return "serialized_named_tensors entries must be base64 strings"
    if st.decode_tensors:
        from multiprocessing.reduction import ForkingPickler

        import torch.multiprocessing  # noqa: F401  (tensor rebuild functions)

        st.received_tensors = dict(ForkingPickler.loads(raw[0]))
    return None


def _check_distributed(st: FakeSGLangState, body: dict) -> str | None:
    names, dtypes, shapes = (body.get(k) for k in ("names", "dtypes", "shapes"))
    if not (isinstance(names, list) and isinstance(dtypes, list) and isinstance(shapes, list)
            and len(names) == len(dtypes) == len(shapes)):
        return "names, dtypes and shapes must be lists of equal length"
    bad = [d for d in dtypes if d not in DTYPES]
    if bad:
        return f"module 'torch' has no attribute {bad[0]!r}"
    group = body.get("group_name", "weight_update_group")
    return None if group in st.groups else f"weight update group {group!r} not initialized"


def _check_init_group(st: FakeSGLangState, body: dict) -> str | None:
    try:
        int(body["master_port"]), str(body["master_address"])
        offset, world = int(body["rank_offset"]), int(body["world_size"])
    except (KeyError, TypeError, ValueError) as e:
        return f"bad init_weights_update_group body: {e!r}"
    if not 1 <= offset <= world - st.tp_size:
        return (f"Failed to initialize custom process group: ranks {offset}.."
                f"{offset + st.tp_size - 1} (tp_size {st.tp_size}) do not fit in world_size "
                f"{world} with the trainer as rank 0.")
    return None


def _check_destroy_group(st: FakeSGLangState, body: dict) -> str | None:
    group = body.get("group_name", "weight_update_group")
    return None if group in st.groups else f"weight update group {group!r} does not exist"


def _check_version(st: FakeSGLangState, body: dict) -> str | None:
    return "new_version is required" if body.get("new_version") is None else None


async def _join_group(st: FakeSGLangState, body: dict) -> str | None:
    name = body.get("group_name", "weight_update_group")
    if body.get("backend", "nccl") != "gloo":  # no GPUs here: record the group only
        st.groups[name] = body
        return None
    if name in st.group_members:
        return (f"Failed to initialize custom process group: Process group with name "
                f"{name} already exists.")
    member = GroupMember(body, st.tp_size, st.group_timeout_s)
    try:
        await member.join()  # replies once every rank of the group has joined
    except BaseException as e:
        member.close()
        if not isinstance(e, Exception):
            raise
        return f"Failed to initialize custom process group: {e}."
    st.groups[name], st.group_members[name] = body, member
    return None


async def _receive(st: FakeSGLangState, body: dict) -> str | None:
    member = st.group_members.get(body.get("group_name", "weight_update_group"))
    if member is None:  # an nccl group: accepted without a transfer
        return None
    try:
        st.received_tensors = await member.receive(body["names"], body["dtypes"],
                                                   body["shapes"])
    except Exception as e:
        return (f"Failed to update parameter online: {e}. The model weights may be partially "
                "updated; discard them.")
    return None


async def _leave_group(st: FakeSGLangState, body: dict) -> str | None:
    name = body.get("group_name", "weight_update_group")
    st.groups.pop(name, None)
    member = st.group_members.pop(name, None)
    if member is not None:
        member.close()
    return None


async def apply_update(st: FakeSGLangState, path: str, body: Any) -> tuple[dict[str, Any], int]:
    """Handle one weight endpoint; returns (reply, HTTP status)."""
    if not isinstance(body, dict):
        return {"success": False, "message": "the body must be a JSON object"}, 400
    error = UPDATE_CHECKS[path](st, body)
    if error is not None:
        return {"success": False, "message": error}, 400
    relabel = path == "/update_weight_version"
    if body.get("abort_all_requests", relabel):
        st.abort_all("Aborted")
    if path in LOADS and st.paused and st.strict_flush and body.get("flush_cache", True) \
            and st.in_flight:
        return {"error": {"message": "flush_cache failed: requests are still held by a "
                          "retract/in_place pause; send flush_cache=false"}}, 500
    locked = path in LOADS and not st.paused  # writer lock; a paused server skips it
    if locked:  # new requests wait; those in flight finish first
        st.updating += 1
    try:
        if locked:
            await st.wait_until(lambda: not st.in_flight, None)
        action = _ACTIONS.get(path)
        error = None if action is None else await action(st, body)
    finally:
        if locked:
            st.updating -= 1
            st.notify()
    if error is not None:
        return {"success": False, "message": error}, 400
    if path in LOADS:
        st.num_weight_updates += 1
    version = body.get("new_version" if relabel else "weight_version")
    if version is not None:
        st.weight_version = str(version)
    st.notify()
    reply: dict[str, Any] = {"success": True, "message": "Succeeded to update model weights."}
    if path == "/update_weights_from_disk":
        reply["num_paused_requests"] = 0
    if relabel:
        reply["new_version"] = st.weight_version
    return reply, 200


_ACTIONS: dict[str, Callable[[FakeSGLangState, dict], Awaitable[str | None]]] = {
    "/init_weights_update_group": _join_group,
    "/update_weights_from_distributed": _receive,
    "/destroy_weights_update_group": _leave_group,
}
UPDATE_CHECKS: dict[str, Callable[[FakeSGLangState, dict], str | None]] = {
    "/update_weights_from_disk": _check_disk,
    "/update_weights_from_tensor": _check_tensor,
    "/update_weights_from_distributed": _check_distributed,
    "/init_weights_update_group": _check_init_group,
    "/destroy_weights_update_group": _check_destroy_group,
    "/update_weight_version": _check_version,
}
LOADS = ("/update_weights_from_disk", "/update_weights_from_tensor",
         "/update_weights_from_distributed")
