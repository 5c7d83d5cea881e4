"""The processes of a data-parallel run: who this process is, its device, and the few collectives it needs.

torchrun / accelerate launch / srun+torchrun set RANK, WORLD_SIZE and LOCAL_RANK; without them the run is one
process, and every collective here returns at once without touching torch.distributed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as td

from ..base.errors import UsageError
from ..engine.memory import resolve_device


@dataclass(frozen=True)
class Dist:
    """This process's place among the launcher's: rank 0 alone writes checkpoints and reports."""

    world: int
    rank: int
    local_rank: int

    @property
    def main(self) -> bool:
        return self.rank == 0


def dist_from_env() -> Dist:
    """What torchrun / accelerate launch / srun+torchrun set; one process otherwise."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as exc:
        raise UsageError(f"RANK / WORLD_SIZE / LOCAL_RANK must be whole numbers: {exc}") from None
    if world < 1 or not 0 <= rank < world:
        raise UsageError(f"RANK {rank} is not within WORLD_SIZE {world}")
    return Dist(world, rank, local)


@contextmanager
def process_group(dist: Dist, device: torch.device) -> Iterator[None]:
    """Join the launcher's process group (NCCL on CUDA, gloo on the CPU) for the run, if there are peers."""
    owned = dist.world > 1 and not td.is_initialized()
    if owned:
        td.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    try:
        yield
    finally:
        if owned and td.is_initialized():
            td.destroy_process_group()


def process_device(name: str, dist: Dist) -> torch.device:
    """This process's device: under a launcher, `cuda` (or auto) means cuda:LOCAL_RANK, one GPU per process."""
    device = resolve_device(name, dist.local_rank)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    return device


def all_sum(values: list[float], dist: Dist, device: torch.device) -> list[float]:
    """`values` summed over every rank (each rank passes its own, in the same order)."""
    if dist.world == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    td.all_reduce(tensor)
    return tensor.tolist()


def union(items: set[str], dist: Dist) -> list[str]:
    """The sorted union of every rank's `items`: what any of them saw."""
    if dist.world == 1:
        return sorted(items)
    gathered: list[Any] = [None] * dist.world
    td.all_gather_object(gathered, sorted(items))
    return sorted({item for part in gathered for item in part})


def barrier(dist: Dist) -> None:
    """Wait for every rank: after rank 0 wrote a checkpoint, before any of them goes on or leaves."""
    if dist.world > 1:
        td.barrier()
