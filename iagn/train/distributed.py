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
        dist.init_process_group(backend="nccl" if chosen.type == "cuda" else "gloo")
    return Runtime(device=chosen, rank=dist.get_rank(), world_size=dist.get_world_size())


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
