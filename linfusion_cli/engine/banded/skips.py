"""The skip tensors a UNet's down path leaves for its up path, kept on the device or parked in CPU memory.

At 16384^2 the SD-1.5 down path leaves ~12.7 GiB of them (three 320-channel tensors of 2.5 GiB at the top level
alone), which the up path reads in reverse order, a block at a time. With `Banding.park` every skip of a banded
level is copied to CPU memory as soon as it is made (Host.park: a side stream on CUDA, so the copy overlaps the
next block) and its rows come back a band at a time when the up path reads it (Host.fetch). A ControlNet's
residual for a skip is added where the skip is read, band by band: the values diffusers' whole sum makes.

Skips that are cheap to make again are not kept at all. On a banded top level conv_in's output is made per band
from the UNet's input wherever it is read (rows.Convolved: 2.5 GiB at 16384^2, for a conv of 4 channels); and
unless skips are parked, the outputs of the resnets after it up to the first attention are made again when the up
path reads them (Remade: all of SDXL's first block, 5 GiB more at 16384^2, for three resnets more per UNet
call, ~2.5% of its work). Parked skips come back a band at a time, which a skip made again whole would not.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .banding import Banding
from .rows import Parked, Rows, Summed, Whole


@dataclass(frozen=True)
class Remade:
    """A skip not kept between the down and up paths, but how to make it again (`make` runs the same modules on the
    same input, so the values are the ones the down path made): the store makes it whole when the up path takes
    it, outside any loop over bands."""

    shape: tuple[int, int, int, int]
    make: Callable[[], torch.Tensor]


class SkipStore:
    """Skips pushed by the down path, popped by the up path (last in, first out); see the module docstring."""

    def __init__(self, banding: Banding, residuals: Sequence[torch.Tensor] | None = None) -> None:
        self.banding = banding
        self.residuals = list(residuals) if residuals is not None else None
        self._skips: list[Rows | Remade] = []

    def push(self, skip: torch.Tensor | Rows | Remade) -> None:
        """Keep a skip for the up path: a tensor (parked where the banding says so), or rows made on demand
        (rows.Convolved) or a way to make it again (Remade) as they are."""
        banding = self.banding
        if not isinstance(skip, torch.Tensor):
            self._skips.append(skip)
        elif banding.park and banding.banded(skip.shape, skip.shape[1], skip.element_size()):
            self._skips.append(Parked(banding.host, banding.host.park(skip), skip.device))
        else:
            self._skips.append(Whole(skip))

    def pop(self) -> Rows:
        """The last skip pushed, with its ControlNet residual when there is one."""
        kept = self._skips.pop()
        skip = Whole(kept.make()) if isinstance(kept, Remade) else kept
        return skip if self.residuals is None else Summed(skip, self.residuals.pop())

    def peek_shape(self) -> tuple[int, int, int, int]:
        return self._skips[-1].shape

    def __len__(self) -> int:
        return len(self._skips)
