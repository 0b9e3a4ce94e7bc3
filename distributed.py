"""torch.distributed glue for `torchrun` data parallelism (train.py): one model, DDP, each
rank on its shard of the in-memory data; `world_size()`, `rank()`, `shard()`, `barrier()`
describe that group. (Lists of independent runs go to jobs instead: launcher.py.)

Without torchrun (no WORLD_SIZE in the environment) every function is a no-op for a
single process, so scripts call them unconditionally.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Processes that train one model together."""
    return dist.get_world_size() if _initialized() else 1


def rank() -> int:
    return dist.get_rank() if _initialized() else 0


def is_main() -> bool:
    return rank() == 0


def shard() -> tuple[int, int] | None:
    """(rank, world_size) for a BatchLoader, or None in a single process."""
    return (rank(), world_size()) if world_size() > 1 else None


def init_from_env(device: torch.device) -> torch.device:
    """Join the process group torchrun describes; each rank gets cuda:LOCAL_RANK (or CPU
    with the gloo backend). Returns the device this rank should use."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def sync_buffers(model: torch.nn.Module) -> None:
    """BatchNorm statistics are per rank under DDP: take rank 0's so all ranks agree."""
    if world_size() > 1:
        for buf in model.buffers():
            dist.broadcast(buf, 0)
