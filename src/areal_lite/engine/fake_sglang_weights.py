"""engine/ fake SGLang, weight endpoints: body checks for every update call (no I/O).

Each check validates one endpoint's body like SGLang would and applies the side
state (process groups, decoded tensors); it returns an error message for a
`{"success": false}` reply, or None. The shared writer-lock/version handling is
`fake_sglang._update`.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable

from areal_lite.engine.fake_sglang_state import FakeSGLangState

__all__ = ["DTYPES", "LOADS", "UPDATE_CHECKS"]

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
        int(body["master_port"]), int(body["rank_offset"]), int(body["world_size"])
        str(body["master_address"])
    except (KeyError, TypeError, ValueError) as e:
        return f"bad init_weights_update_group body: {e!r}"
    st.groups[body.get("group_name", "weight_update_group")] = body
    return None


def _check_destroy_group(st: FakeSGLangState, body: dict) -> str | None:
    group = body.get("group_name", "weight_update_group")
    if st.groups.pop(group, None) is None:
        return f"weight update group {group!r} does not exist"
    return None


def _check_version(st: FakeSGLangState, body: dict) -> str | None:
    return "new_version is required" if body.get("new_version") is None else None


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
