"""Distributed data parallel under `torchrun`: gloo on CPU, NCCL on GPU; rank 0 writes."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from iagn.device import pick_device


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    nodes: int = 1  # torchrun's launchers (one per node), for messages

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_runtime(device: str = "auto") -> Runtime:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Runtime(device=pick_device(device))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    chosen = pick_device(device)
    if chosen.type == "cuda":
        torch.cuda.set_device(local_rank)
        chosen = torch.device("cuda", local_rank)
    if not dist.is_initialized():
        backend = "nccl" if chosen.type == "cuda" else "gloo"
        store, rank, size = _store_of_this_attempt()
        dist.init_process_group(backend=backend, store=store, rank=rank, world_size=size)
    # torchrun's GROUP_WORLD_SIZE: how many launchers (nodes) joined the rendezvous.
    nodes = int(os.environ.get("GROUP_WORLD_SIZE", "1"))
    return Runtime(
        device=chosen, rank=dist.get_rank(), world_size=dist.get_world_size(), nodes=nodes
    )


def _store_of_this_attempt() -> tuple[dist.Store, int, int]:
    """The env:// rendezvous store (torchrun's), its keys prefixed by torchrun's restart
    count.

    With a c10d rendezvous (`--standalone` or `--rdzv-backend c10d`), the store outlives a
    restart of the workers (`--max-restarts`): without the prefix, the restarted ranks read
    the process-group addresses the previous attempt's ranks published, and gloo tries to
    connect to a killed worker ("Gloo connectFullMesh failed ... Connection refused";
    measured with torch 2.14, tests/test_multinode.py)."""
    store, rank, size = next(dist.rendezvous("env://"))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"iagn/attempt-{attempt}", store), rank, size


def all_reduce_mean(value: float, runtime: Runtime) -> float:
    if not runtime.distributed:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=runtime.device)
    dist.all_reduce(tensor)
    return float(tensor.item() / runtime.world_size)


def barrier(runtime: Runtime) -> None:
    if runtime.distributed:
        dist.barrier()


def any_rank(flags: list[bool], runtime: Runtime) -> list[bool]:
    """Each flag OR-ed over all ranks: one small all_reduce, so every rank takes the same
    branch (a rank that raised or stopped alone would leave the others waiting forever at
    their next collective)."""
    if not runtime.distributed:
        return flags
    tensor = torch.tensor([float(f) for f in flags], device=runtime.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return [value > 0 for value in tensor.tolist()]


def gather_to_main(value: Any, runtime: Runtime) -> list[Any] | None:
    """Every rank's `value` (picklable), in rank order, on rank 0; None on the others."""
    if not runtime.distributed:
        return [value]
    gathered = [None] * runtime.world_size if runtime.is_main else None
    dist.gather_object(value, gathered, dst=0)
    return gathered


def broadcast_from_main(value: Any, runtime: Runtime) -> Any:
    """Rank 0's `value` (picklable) on every rank. Nodes need not share a disk: what only
    rank 0 can read (the partial checkpoint it wrote) reaches the others this way."""
    if not runtime.distributed:
        return value
    box = [value if runtime.is_main else None]
    dist.broadcast_object_list(box, src=0, device=runtime.device)
    return box[0]
