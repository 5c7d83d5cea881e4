"""The host side of a simulated run (engine/host.py's seam, answered for the meta device): values look healthy (every
check for NaN or overflow takes the no-overflow path), copies to CPU memory become meta tensors counted as host
memory, each loop over work of one shape runs its first item and counts the work of all of them, and phases go to
the trace."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence, Sized
from typing import Any, TypeVar

import numpy as np
import torch

from ..host import Host
from .trace import MemoryTrace

S = TypeVar("S", bound=Sized)
MID_GREY = 128  # what a simulated image holds: it has a shape, not pixels (and is not a failed, black one)


class _Once:
    """The first of `items` stands for all of them: iterating yields it alone, and the work done meanwhile is
    counted `times` over (MemoryTrace.scaled)."""

    def __init__(self, items: Any, trace: MemoryTrace, times: float) -> None:
        self.items = items
        self.trace = trace
        self.times = times

    def __len__(self) -> int:
        return 1

    def __iter__(self) -> Iterator[Any]:
        with self.trace.scaled(self.times):
            yield self.items[0]

    def __getitem__(self, index: Any) -> Any:
        return self.items[:1][index]


class MetaHost(Host):
    """engine/host.Host for a simulation on the meta device (see the module docstring)."""

    def __init__(self, trace: MemoryTrace) -> None:
        super().__init__()
        self.trace = trace

    def all_finite(self, tensor: torch.Tensor) -> bool:
        return True

    def each(self, items: S, work: Sequence[float] | None = None) -> S:
        count = len(items)
        if count <= 1:
            return items
        times = sum(work) / work[0] if work else float(count)
        return _Once(items, self.trace, times)  # type: ignore[return-value]

    def timestep_device(self, device: torch.device) -> torch.device:
        """Schedulers look values up by timestep (a host read): their timesteps stay on the CPU."""
        return torch.device("cpu")

    def download(self, tensor: torch.Tensor, pinned: bool) -> torch.Tensor:
        copy = torch.empty_like(tensor)
        self.trace.to_host(copy)
        return copy

    def host_buffer(self, shape: tuple[int, ...], dtype: torch.dtype, pinned: bool) -> torch.Tensor:
        buffer = torch.empty(shape, dtype=dtype, device="meta")
        self.trace.to_host(buffer)
        return buffer

    def park(self, tensor: torch.Tensor) -> torch.Tensor:
        """Counted as CPU memory from now on, rows first as Host.park lays it out; the device tensor's bytes go
        when the caller drops it."""
        parked = torch.empty(
            (tensor.shape[-2], *tensor.shape[:-2], tensor.shape[-1]), dtype=tensor.dtype, device="meta"
        )
        self.trace.to_host(parked)
        return parked

    def fetch(self, parked: torch.Tensor, lo: int, hi: int, device: torch.device) -> torch.Tensor:
        """A new device tensor of those rows (a view of the parked one would count as CPU memory)."""
        return torch.empty_like(parked[lo:hi]).movedim(0, -2)

    def to_numpy(self, tensor: torch.Tensor) -> np.ndarray:
        """A mid-grey array of the tensor's shape: one byte, broadcast (no memory for a 16K image)."""
        return np.broadcast_to(np.array(MID_GREY, dtype=np.uint8), tuple(tensor.shape))

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        with self.trace.phase(name):
            yield
