"""The seam between the device path and the host: every place where a stage's work asks the host something (is
this tensor finite? copy it to CPU memory), every loop over work of one
shape (scheduler steps, VAE windows, feed-forward chunks), and every named phase of a stage.

`Host` is what real runs use: it answers by looking at the data, loops over everything, and times each phase.
The memory simulator (engine/simulate/) hands the same code a `MetaHost`: on the `meta` device there is no data
to look at, so it answers as a healthy run would (finite, no overflow), runs one item of each loop and scales the
work counted, and attributes memory to phases. The device code calls the seam instead of testing whether it is
being simulated.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence, Sized
from typing import TypeVar

import numpy as np
import torch

S = TypeVar("S", bound=Sized)  # a list, a tuple, a tensor of timesteps: anything with a length that slices
PARK_CHUNK_BYTES = 1 << 26  # a tensor parked in CPU memory goes over in blocks of rows of at most this


class Host:
    """What a real run's device path asks of the host (see the module docstring)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)  # wall time per phase ("vae encode/stats" nested)
        self.open: list[str] = []  # the phases open now, outermost first
        self._side: torch.cuda.Stream | None = None  # copies to and from CPU memory beside the compute stream

    def all_finite(self, tensor: torch.Tensor) -> bool:
        """Whether every value is finite (a synchronisation point on a GPU)."""
        return bool(torch.isfinite(tensor).all())

    def each(self, items: S, work: Sequence[float] | None = None) -> S:
        """A loop over items of one shape (scheduler steps, VAE windows, chunks): all of them. `work` is each
        item's share of the work when they differ (a shorter last chunk), for a simulation that runs one."""
        return items

    def timestep_device(self, device: torch.device) -> torch.device:
        """Where a stage's timesteps live: the device (schedulers index their tables with them)."""
        return device

    def download(self, tensor: torch.Tensor, pinned: bool) -> torch.Tensor:
        """A device tensor copied into CPU memory (asynchronously into a pinned buffer)."""
        return tensor.to("cpu", non_blocking=pinned)

    def host_buffer(self, shape: tuple[int, ...], dtype: torch.dtype, pinned: bool) -> torch.Tensor:
        """An uninitialised tensor in CPU memory (page-locked when `pinned`), for results leaving the device."""
        return torch.empty(shape, dtype=dtype, pin_memory=pinned)

    def to_numpy(self, tensor: torch.Tensor) -> np.ndarray:
        return tensor.numpy()

    def park(self, tensor: torch.Tensor) -> torch.Tensor:
        """A (..., H, W) device tensor parked in CPU memory (page-locked on CUDA), rows first: (H, ..., W), so
        that a band of rows is one block to copy back (`fetch`). On CUDA the copies run on a side stream, a band
        at a time, while the compute stream goes on; the caller may drop the device tensor at once."""
        cuda = tensor.device.type == "cuda"
        height = tensor.shape[-2]
        parked = torch.empty((height, *tensor.shape[:-2], tensor.shape[-1]), dtype=tensor.dtype, pin_memory=cuda)
        step = max(1, PARK_CHUNK_BYTES // max(1, tensor[..., :1, :].nbytes))
        for start in range(0, height, step):
            part = tensor[..., start : start + step, :].movedim(-2, 0).contiguous()  # a band, rows first
            if not cuda:
                parked[start : start + step].copy_(part)
                continue
            side = self._side_stream(tensor.device)
            side.wait_stream(torch.cuda.current_stream(tensor.device))  # the band is made
            with torch.cuda.stream(side):
                parked[start : start + step].copy_(part, non_blocking=True)
            part.record_stream(side)  # its memory is not reused before the copy is done
        return parked

    def fetch(self, parked: torch.Tensor, lo: int, hi: int, device: torch.device) -> torch.Tensor:
        """Rows [lo, hi) of a parked tensor as (..., hi - lo, W) on `device`. On CUDA the copy runs on the side
        stream (after the parking copies queued before it) and only the compute stream waits for it: the host runs
        ahead of the device, so the next band's rows come over while this band computes."""
        rows = parked[lo:hi]
        if device.type == "cuda":
            side = self._side_stream(device)
            with torch.cuda.stream(side):
                rows = rows.to(device, non_blocking=True)
            current = torch.cuda.current_stream(device)
            current.wait_stream(side)
            rows.record_stream(current)
        else:
            rows = rows.to(device)
        return rows.movedim(0, -2)

    def _side_stream(self, device: torch.device) -> torch.cuda.Stream:
        if self._side is None:
            self._side = torch.cuda.Stream(device)
        return self._side

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """A named part of a stage ("upscale", "vae encode", "unet", "vae decode"...), timed; one inside another
        is timed under both names joined ("vae encode/stats")."""
        self.open.append(name)
        path = "/".join(self.open)
        start = time.perf_counter()
        try:
            yield
        finally:
            if torch.cuda.is_initialized():  # the phase's kernels counted in it, not in the next that waits
                torch.cuda.synchronize()
            self.seconds[path] += time.perf_counter() - start
            self.open.pop()
