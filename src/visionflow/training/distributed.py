"""Multi-process data-parallel training (DDP) under `torchrun`, one process per device.

`torchrun --nproc_per_node N -m visionflow.cli stage train-<task>` sets RANK / WORLD_SIZE /
LOCAL_RANK; `init_from_env` then joins the process group (NCCL on CUDA, gloo on the CPU).
Without those variables everything here is a no-op for a single process.

Contract: `train.batch_size` is per process (global batch = batch_size x world size); rank 0
alone evaluates, writes checkpoints and outputs, and broadcasts what every rank must agree on
(validation metrics, the early-stopping decision), so the ranks never diverge.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = DistInfo()


def init_from_env(device_type: str) -> DistInfo:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend=backend)
    return info


def broadcast(obj: Any, info: DistInfo) -> Any:
    """Rank 0's `obj` on every rank."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def mean_over_ranks(values: dict[str, float], info: DistInfo) -> dict[str, float]:
    """Each key's mean over the ranks (every rank gets the same dict). The train loader gives
    every rank the same number of samples (DistributedSampler and the loader drop the
    remainder), so the mean of per-rank means is the mean over all samples of the epoch."""
    if not info.enabled:
        return values
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, values)
    return {k: sum(float(o[k]) for o in out) / len(out) for k in values}


def require_same_on_ranks(value: Any, what: str, hint: str, info: DistInfo) -> None:
    """Fail on every rank, naming each rank's value, unless all ranks hold the same `value`.
    A rank that disagrees (say, one node resumes a checkpoint the other cannot see) would
    otherwise run a different number of steps and hang the others in a collective."""
    if not info.enabled:
        return
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, value)
    if any(v != out[0] for v in out):
        raise RuntimeError(f"DDP ranks disagree on {what}: " + ", ".join(f"rank {r}: {v}" for r, v in enumerate(out))
                           + f"; {hint}")


def sync_buffers(model: torch.nn.Module, info: DistInfo) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank. DDP averages gradients,
    so parameters agree, but each rank updates its running statistics on its own shard; DDP
    only re-broadcasts them at the start of the next forward."""
    if info.enabled:
        for buf in model.buffers():
            dist.broadcast(buf, src=0)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over a state dict's tensors in key order (bitwise identity of weights)."""
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().to("cpu").contiguous()
        h.update(k.encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.view(torch.int16).numpy().tobytes())
    return h.hexdigest()


def gather_digests(state: dict[str, torch.Tensor], info: DistInfo) -> list[str]:
    """Every rank's weight digest (rank order); one entry for a single process."""
    mine = state_digest(state)
    if not info.enabled:
        return [mine]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, mine)
    return list(out)


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
