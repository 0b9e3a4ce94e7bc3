"""torch.distributed glue for `torchrun`: one process per device.

Two uses. Data parallel (train.py): one model, DDP, each rank on its shard of the in-memory
data; `world_size()`, `rank()`, `shard()`, `barrier()` describe that group. Work split
(main.py -L): a list of independent jobs shared out among ranks, each rank training its own
models alone inside `independent()` (where those functions report a single process), with
`share_out`, `wait_all` and `merge_in_order` coordinating through the real group.

Without torchrun (no WORLD_SIZE in the environment) every function is a no-op for a
single process, so scripts call them unconditionally.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from typing import Hashable, Iterable, Sequence

import torch
import torch.distributed as dist

# How long a rank waits for the others at a work-split barrier: they may be training
# base models for hours. (NCCL's default watchdog would abort after 10 minutes.)
WAIT = datetime.timedelta(hours=float(os.environ.get("UNLEARNBENCH_WAIT_HOURS", "72")))

_alone = 0  # depth of independent() contexts
_coord = None  # the gloo group used for coordination (created on first use)


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def global_world_size() -> int:
    """Processes in the torchrun job, also inside independent()."""
    return dist.get_world_size() if _initialized() else 1


def global_rank() -> int:
    return dist.get_rank() if _initialized() else 0


def world_size() -> int:
    """Processes that train one model together (1 inside independent())."""
    return 1 if _alone else global_world_size()


def rank() -> int:
    return 0 if _alone else global_rank()


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


def gather_objects(obj) -> list:
    """Every rank's `obj`, in rank order (on every rank)."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


# ----------------------------------------------------------------------------- work split

@contextlib.contextmanager
def independent():
    """Inside, this rank works alone: world_size() is 1, rank() is 0, so training is plain
    (no DDP, no data shard) and saves its own checkpoints. For jobs split across ranks."""
    global _alone
    _alone += 1
    try:
        yield
    finally:
        _alone -= 1


def _coordination_group():
    """A gloo group with a long timeout, for waiting on the other ranks' work."""
    global _coord
    if _coord is None:
        _coord = dist.new_group(backend="gloo", timeout=WAIT)
    return _coord


def owners(keys: Sequence[Hashable]) -> list[int]:
    """The rank that handles each item: distinct keys dealt round-robin in first-seen
    order, equal keys to the same rank. The same answer on every rank."""
    world, deal, out = global_world_size(), {}, []
    for key in keys:
        if key not in deal:
            deal[key] = len(deal) % world
        out.append(deal[key])
    return out


def share_out(keys: Sequence[Hashable]) -> list[int]:
    """Indices of the items this rank handles: one per distinct key (its first
    occurrence), the distinct keys dealt round-robin. All indices in a single process."""
    me, seen, out = global_rank(), set(), []
    for i, (key, owner) in enumerate(zip(keys, owners(keys))):
        if key not in seen:
            seen.add(key)
            if owner == me:
                out.append(i)
    return out


def wait_all() -> None:
    """Barrier across the whole job (long timeout); a no-op in a single process."""
    if global_world_size() > 1:
        dist.barrier(group=_coordination_group())


def gather_all(obj) -> list:
    """Every rank's `obj`, in rank order, on every rank (long timeout)."""
    if global_world_size() == 1:
        return [obj]
    out = [None] * global_world_size()
    dist.all_gather_object(out, obj, group=_coordination_group())
    return out


def merge_in_order(pairs: Iterable[tuple[int, object]]) -> list:
    """All ranks' (index, value) pairs merged, as the values sorted by index (on every rank)."""
    merged = [p for part in gather_all(list(pairs)) for p in part]
    merged.sort(key=lambda p: p[0])
    return [v for _, v in merged]
