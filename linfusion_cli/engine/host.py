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


class Host:
    """What a real run's device path asks of the host (see the module docstring)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)  # wall time per phase name, over the whole job

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

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """A named part of a stage ("upscale", "vae encode", "unet", "vae decode"...), timed."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start
