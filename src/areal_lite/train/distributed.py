"""Trainer stage, many processes: the learner as N FSDP2 ranks under torchrun.

Rank 0 owns the whole rollout side (one event loop: proxy, agents, engine client,
producer) and drives the others; ranks 1..N-1 only train (decision 9). Every rank holds
the whole step's batch (rank 0 broadcasts it; it is a few MB of token ids), so every rank
computes the same advantages and the same loss normalizer over each whole minibatch; a
rank then runs forward/backward only on its share of the minibatch's rows::

    rows of a minibatch --token_balanced_split--> one share per rank (by tokens, LPT)
    each rank: micro-batches of its share; loss / whole-minibatch normalizer x world
    FSDP2 reduce-scatter averages (divides by world): the sum is the 1-process gradient
    clip over the sharded gradients (norm of DTensors, reduced) -> sharded AdamW step

FSDP2 needs every rank in each forward/backward (all-gather, reduce-scatter), so ranks
agree on the largest micro-batch count and the shorter ones run zero-weight micro-batches.

Commands (`Leader` on rank 0 -> `serve_followers` on the rest, by broadcast):
"train" (groups), "export" (full tensors, parameter by parameter), "save" / "load"
(torch.distributed.checkpoint into a directory every rank can reach), "stop".
"""

from __future__ import annotations

import ctypes
import datetime
import heapq
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "Dist",
    "Leader",
    "full_state_dict",
    "grad_norm_and_clip",
    "init_dist",
    "load_sharded",
    "save_sharded",
    "serve_followers",
    "shard_model",
    "token_balanced_split",
]


@dataclass(frozen=True, slots=True)
class Dist:
    """This process's place in the learner's process group."""

    rank: int
    world: int
    device: torch.device

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    def all_sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks (float64, so counts stay exact)."""
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device)
        dist.all_reduce(t)
        return t.tolist()

    def all_max(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.long, device=self._comm_device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def broadcast(self, obj: Any = None) -> Any:
        """Rank 0's `obj` on every rank (pickled)."""
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self._comm_device)
        return box[0]

    @property
    def _comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")


def init_dist(device: str | torch.device = "cpu", timeout_s: float = 1800.0) -> Dist:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR/PORT):
    NCCL on CUDA (one GPU per LOCAL_RANK), gloo on CPU."""
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"not started by torchrun: {', '.join(missing)} unset; run "
                           f"`torchrun --nproc-per-node N -m areal_lite.cli train ...` or set "
                           f"scheduler.train_processes and let `areal-lite train` start it")
    if "TORCHELASTIC_RUN_ID" in os.environ:
        _die_with_launcher()
    device = torch.device(device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s))
    return Dist(rank=dist.get_rank(), world=dist.get_world_size(), device=device)


def _die_with_launcher() -> None:
    """torchrun starts each rank in its own session, so a SIGKILL of the launcher (or of
    `areal-lite train` above it) would leave the ranks training on as orphans, racing a
    restarted run for the same checkpoints. Ask Linux to kill this rank with its parent."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(1, signal.SIGKILL, 0, 0, 0) != 0:  # 1 = PR_SET_PDEATHSIG
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() == 1:  # the launcher died before the call above
        os._exit(1)


def shard_model(model: torch.nn.Module, compute_dtype: torch.dtype) -> torch.nn.Module:
    """`fully_shard` each decoder layer, then the root (embeddings, norm, head). Parameters
    stay float32 master weights; with a lower `compute_dtype` they are gathered in it and
    gradients reduced in float32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    layers = _decoder_layers(model)
    for layer in layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def _decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    for path in ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers"):
        mod: Any = model
        for part in path.split("."):
            mod = getattr(mod, part, None)
        if isinstance(mod, torch.nn.ModuleList):
            return list(mod)
    raise ValueError(f"{type(model).__name__}: no decoder layer list found to shard "
                     f"(looked for model.layers, transformer.h, gpt_neox.layers)")


def token_balanced_split(lengths: Sequence[int], world: int) -> list[list[int]]:
    """Indices into `lengths`, one list per rank, balancing the summed lengths: longest
    first onto the rank with the fewest tokens so far (ties: lowest rank). Deterministic,
    so every rank computes the same split. Each list is in increasing index order."""
    heap = [(0, r) for r in range(world)]
    shares: list[list[int]] = [[] for _ in range(world)]
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        tokens, r = heapq.heappop(heap)
        shares[r].append(i)
        heapq.heappush(heap, (tokens + lengths[i], r))
    return [sorted(s) for s in shares]


def grad_norm_and_clip(params: list[torch.nn.Parameter], max_norm: float) -> float:
    """Global L2 norm of sharded (DTensor) gradients, reduced over ranks; clips in place."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads, 2.0)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return float(total.item())


# --------------------------------------------------------------------- weights out / in

def full_state_dict(model: torch.nn.Module, *, keep: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full tensor) for every state-dict entry, one at a time: each sharded
    parameter is all-gathered alone, so no rank holds more than one full parameter beyond
    what the caller keeps. Every rank must iterate it to the end (collective); `keep`
    False (followers) drops each tensor at once."""
    from torch.distributed.tensor import DTensor

    for name, t in model.state_dict().items():
        full = t.full_tensor() if isinstance(t, DTensor) else t
        yield name, (full.detach() if keep else full[:0])


def save_sharded(model, optimizer, path: str | Path) -> None:
    """Model + optimizer shards with torch.distributed.checkpoint (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path))


def load_sharded(model, optimizer, path: str | Path) -> None:
    """Inverse of `save_sharded`; the rank count may differ from the one that saved."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optim"])


# ------------------------------------------------------------------- leader / followers

class Leader:
    """Rank 0's handle on the learner: the same calls as a `Learner` (train_step,
    state_dict, step), each first broadcast to the followers so they run it too."""

    def __init__(self, learner, d: Dist) -> None:
        self.learner, self.dist = learner, d

    @property
    def device(self):
        """Rank 0's learner device (the rollout side and core planning read it)."""
        return self.learner.device

    @property
    def step(self) -> int:
        return self.learner.step

    def train_step(self, groups, *, current_version: int = 0,
                   on_microbatch=None) -> dict[str, float]:
        """`on_microbatch` runs on rank 0 only: the rank that shares this process's cores
        with a local engine."""
        self.dist.broadcast(("train", (list(map(list, groups)), current_version)))
        return self.learner.train_step(groups, current_version=current_version,
                                       on_microbatch=on_microbatch)

    def full_weights(self) -> list[tuple[str, torch.Tensor]]:
        """The whole model as full tensors on rank 0 (gathered one parameter at a time)."""
        self.dist.broadcast(("export", None))
        return list(full_state_dict(self.learner.model, keep=True))

    def save_sharded(self, path: Path) -> None:
        self.dist.broadcast(("save", str(path)))
        save_sharded(self.learner.model, self.learner.optimizer, path)

    def load_sharded(self, path: Path, step: int) -> None:
        self.dist.broadcast(("load", (str(path), step)))
        load_sharded(self.learner.model, self.learner.optimizer, path)
        self.learner.step = step

    def state_dict(self) -> dict:
        return {"step": self.learner.step, "sharded": "dcp"}

    def stop(self) -> None:
        """The followers leave their command loop; every rank then meets at a barrier and
        tears its process group down, so no rank exits while another still talks to it
        (one that exited with its gloo group alive once took a follower down with
        SIGABRT, "terminate called without an active exception")."""
        self.dist.broadcast(("stop", None))
        dist.barrier()
        dist.destroy_process_group()


def serve_followers(learner, d: Dist) -> None:
    """Ranks > 0: run rank 0's commands until "stop"."""
    while True:
        op, arg = d.broadcast()
        if op == "train":
            groups, version = arg
            learner.train_step(groups, current_version=version)
        elif op == "export":
            for _ in full_state_dict(learner.model, keep=False):
                pass
        elif op == "save":
            save_sharded(learner.model, learner.optimizer, arg)
        elif op == "load":
            load_sharded(learner.model, learner.optimizer, arg[0])
            learner.step = arg[1]
        elif op == "stop":
            dist.barrier()  # met by Leader.stop; the caller then destroys the group
            return
        else:
            raise RuntimeError(f"unknown learner command {op!r} from rank 0")

