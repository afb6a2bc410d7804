"""Trainer stage, persistence: the policy in Hugging Face format plus what resuming needs.

Layout under a run directory::

    checkpoints/
        step_12/        config.json, model.safetensors, tokenizer files   (HF-loadable)
                        state.pt: {"step", "learner", "extra", "rng"}
                        sharded/   torch.distributed.checkpoint shards (FSDP2 runs only)
        step_16/
        latest          "step_16" -- names the newest complete checkpoint

Atomicity: a checkpoint is written into a hidden temporary directory, fsynced and
renamed into place (a rename is atomic), and only then is `latest` replaced (temp file
+ `os.replace`). A crash at any point leaves the previous `latest` and its directory
intact; a stale temporary directory is removed by the next save. Only the newest `keep`
checkpoints are kept.

`state.pt` is read with `torch.load(weights_only=True)`, so `extra_state` must hold
plain data: dicts, lists, tuples, str, numbers, bools, None and tensors.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["SHARDED_DIR", "load_latest_checkpoint", "restore_rng", "rng_state", "save_checkpoint"]

_STEP_DIR = re.compile(r"step_(\d+)")
_STATE_FILE = "state.pt"
_POINTER = "latest"
SHARDED_DIR = "sharded"  # torch.distributed.checkpoint shards inside a checkpoint directory


def rng_state() -> dict[str, Any]:
    """Python, numpy, torch (and CUDA, when available) RNG states as plain data."""
    name, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Restore the RNG states saved in a checkpoint (`state` from `load_latest_checkpoint`,
    or `rng_state()` itself). CUDA states are restored only when CUDA is available."""
    rng = state.get("rng", state)
    random.setstate(rng["python"])
    name, keys, pos, has_gauss, gauss = rng["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def save_checkpoint(run_dir: str | Path, step: int, *, model, tokenizer=None,
                    learner_state: dict, extra_state: dict | None = None,
                    keep: int = 2, write_sharded: Callable[[Path], None] | None = None) -> Path:
    """Write `{run_dir}/checkpoints/step_{step}/` atomically, point `latest` at it and
    delete all but the newest `keep` checkpoints. Returns the checkpoint directory.

    `model` / `tokenizer` need `save_pretrained` (any HF model or tokenizer);
    `learner_state` is `Learner.state_dict()`; `extra_state` is the rest of the run's
    position (data cursor, weight version, ...). Saving the same step again replaces it.
    `write_sharded(dir)` (FSDP2 runs) writes the ranks' shards into `dir/sharded` of the
    temporary directory, so they are renamed into place with the rest.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1 checkpoint, got {keep}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(root)
    final = root / f"step_{step}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-step_{step}-", dir=root))
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if write_sharded is not None:
            write_sharded(tmp / SHARDED_DIR)
        state = {"step": step, "learner": learner_state, "extra": extra_state or {},
                 "rng": rng_state()}
        torch.save(state, tmp / _STATE_FILE)
        _fsync_tree(tmp)
        _replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _write_pointer(root, final.name)
    _prune(root, keep=keep, protect=final.name)
    return final


def load_latest_checkpoint(run_dir: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """(checkpoint directory, state dict) of the newest complete checkpoint, or None.

    The state holds "step", "learner" (for `Learner.load_state_dict`), "extra" and
    "rng" (for `restore_rng`); tensors are loaded on the CPU. Load the weights with
    `AutoModelForCausalLM.from_pretrained(path)`.
    """
    root = Path(run_dir) / "checkpoints"
    path = _resolve_latest(root)
    if path is None:
        return None
    state = torch.load(path / _STATE_FILE, map_location="cpu", weights_only=True)
    return path, state


# ----------------------------------------------------------------------------- internals

def _resolve_latest(root: Path) -> Path | None:
    """The directory `latest` names; without a usable pointer, the highest complete step."""
    pointer = root / _POINTER
    if pointer.is_file():
        name = pointer.read_text().strip()
        if _STEP_DIR.fullmatch(name) and (root / name / _STATE_FILE).is_file():
            return root / name
    complete = [d for d in _step_dirs(root) if (d / _STATE_FILE).is_file()]
    return complete[-1] if complete else None


def _step_dirs(root: Path) -> list[Path]:
    """step_N directories, oldest (lowest N) first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), d) for d in root.iterdir()
             if d.is_dir() and (m := _STEP_DIR.fullmatch(d.name))]
    return [d for _, d in sorted(found)]


def _replace_dir(src: Path, dst: Path) -> None:
    """Rename `src` to `dst`; an existing `dst` is moved aside first, then deleted."""
    if not dst.exists():
        os.replace(src, dst)
    else:
        old = Path(tempfile.mkdtemp(prefix=f".tmp-old-{dst.name}-", dir=dst.parent))
        os.replace(dst, old / dst.name)
        os.replace(src, dst)
        shutil.rmtree(old)
    _fsync_dir(dst.parent)


def _write_pointer(root: Path, name: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{_POINTER}-", dir=root)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(name + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, root / _POINTER)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(root)


def _prune(root: Path, *, keep: int, protect: str) -> None:
    dirs = _step_dirs(root)
    for d in dirs[:-keep] if len(dirs) > keep else []:
        if d.name != protect:
            shutil.rmtree(d)


def _remove_stale_temps(root: Path) -> None:
    """Leftovers of a save that crashed (one writer per run: none can be in progress)."""
    for entry in root.iterdir():
        if entry.name.startswith(".tmp-"):
            shutil.rmtree(entry, ignore_errors=True)
        elif entry.name.startswith(f".{_POINTER}-"):
            entry.unlink(missing_ok=True)


def _fsync_tree(path: Path) -> None:
    """Flush every file under `path` to disk, so the rename never exposes empty files."""
    for dirpath, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    if not hasattr(os, "O_DIRECTORY"):  # Windows cannot open directories
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
