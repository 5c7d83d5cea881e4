"""The skip tensors a UNet's down path leaves for its up path, kept on the device or parked in CPU memory.

At 16384^2 the SD-1.5 down path leaves ~12.7 GiB of them (three 320-channel tensors of 2.5 GiB at the top level
alone), which the up path reads in reverse order, a block at a time. With `Banding.park` every skip of a banded
level is copied to CPU memory as soon as it is made (Host.park: a side stream on CUDA, so the copy overlaps the
next block) and its rows come back a band at a time when the up path reads it (Host.fetch). A ControlNet's
residual for a skip is added where the skip is read, band by band: the values diffusers' whole sum makes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .banding import Banding
from .rows import Parked, Rows, Summed, Whole


class SkipStore:
    """Skips pushed by the down path, popped by the up path (last in, first out); see the module docstring."""

    def __init__(self, banding: Banding, residuals: Sequence[torch.Tensor] | None = None) -> None:
        self.banding = banding
        self.residuals = list(residuals) if residuals is not None else None
        self._skips: list[Rows] = []

    def push(self, skip: torch.Tensor) -> None:
        banding = self.banding
        if banding.park and banding.banded(skip.shape, skip.shape[1], skip.element_size()):
            self._skips.append(Parked(banding.host, banding.host.park(skip), skip.device))
        else:
            self._skips.append(Whole(skip))

    def pop(self) -> Rows:
        """The last skip pushed, with its ControlNet residual when there is one."""
        skip = self._skips.pop()
        return skip if self.residuals is None else Summed(skip, self.residuals.pop())

    def peek_shape(self) -> tuple[int, int, int, int]:
        return self._skips[-1].shape

    def __len__(self) -> int:
        return len(self._skips)
