"""Scale-out under `torchrun`: one process per device, PyTorch DDP, and rank 0 as the only writer.

Without torchrun (no WORLD_SIZE > 1 in the environment) every helper here is the identity or a no-op,
so single-process code paths need no special case. Under torchrun the run directory and the cache
must be on a filesystem every node sees: rank 0 writes, the others read after a barrier.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist


def init_from_env() -> None:
    """Join the process group torchrun describes; gloo for CPU tensors, NCCL for CUDA ones."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("cpu:gloo,cuda:nccl")
    else:
        dist.init_process_group("gloo")


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def rank_seed(seed: int) -> int:
    """A seed of this rank's own, for randomness that must differ across ranks (diffusion noise, sampling)."""
    return seed + 1_000_003 * rank()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (any picklable object)."""
    if not is_distributed():
        return obj
    box = [obj if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank."""
    if not is_distributed():
        return [obj]
    boxes: list[Any] = [None] * world_size()
    dist.all_gather_object(boxes, obj)
    return boxes


def shard(indices: torch.Tensor) -> torch.Tensor:
    """This rank's share of `indices`: every world_size-th one, starting at its rank."""
    return indices[rank() :: world_size()]


def local_device(device: torch.device) -> torch.device:
    """Under torchrun each process drives the GPU of its local rank."""
    if device.type == "cuda" and is_distributed():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device
