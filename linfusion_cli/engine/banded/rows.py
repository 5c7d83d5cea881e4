"""Where a band's rows come from: a feature map at one UNet level that the banded forwards read a few rows at a
time, without it having to exist whole on the device.

A `Rows` is (B, C, H, W) by its `shape` and gives rows [lo, hi) (0 <= lo < hi <= H) as a device tensor:
- `Whole`: a tensor on the device; the rows are a view.
- `Parked`: a tensor parked in CPU memory (engine/host.Host.park); the rows come back through `Host.fetch`.
- `Concat`: several sources side by side along channels (an up block's hidden state and its skip).
- `Summed`: a source plus a tensor of its shape (a skip and the ControlNet residual added to it).
- `Convolved`: a plain conv of a tensor, computed for the rows asked (conv_in's output, never made whole).
- `Remade`: a skip made again from the UNet's input when it is read, instead of being kept.
- `Upsampled`: diffusers' Upsample2D (nearest 2x, then a 3x3 conv) of a lower level's tensor, computed for the
  rows asked, so that the upsampled tensor (twice the height and width) never exists whole.

Rows beyond the image are the caller's business (a conv pads its *input*, which is normalised and activated
first): `clip` and `padded` do that arithmetic.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F

from ..parallel.ops import ConvSpec
from .banding import Block

if TYPE_CHECKING:
    from ..host import Host


class Rows(Protocol):
    """A (B, C, H, W) feature map read by rows (see the module docstring)."""

    @property
    def shape(self) -> tuple[int, int, int, int]: ...

    def rows(self, lo: int, hi: int) -> torch.Tensor:
        """Rows [lo, hi) as a (B, C, hi - lo, W) tensor on the device."""
        ...


class Whole:
    """A tensor on the device."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return _shape4(self.tensor.shape)

    def rows(self, lo: int, hi: int) -> torch.Tensor:
        return self.tensor[:, :, lo:hi]


class Parked:
    """A tensor parked in CPU memory by Host.park (rows first), its rows fetched back to `device` on demand."""

    def __init__(self, host: Host, parked: torch.Tensor, device: torch.device) -> None:
        self.host, self.parked, self.device = host, parked, device

    @property
    def shape(self) -> tuple[int, int, int, int]:
        height, batch, channels, width = self.parked.shape
        return int(batch), int(channels), int(height), int(width)

    def rows(self, lo: int, hi: int) -> torch.Tensor:
        return self.host.fetch(self.parked, lo, hi, self.device)


class Convolved:
    """A plain stride-1 conv of a device tensor, computed for the rows asked (halo rows read from the tensor, zero
    rows beyond its edges): the UNet's conv_in on its input, which is never made whole."""

    def __init__(self, conv: Block, source: torch.Tensor) -> None:
        self.spec, self.source = ConvSpec.of(conv), source
        batch, _, height, width = _shape4(source.shape)
        self._shape = (batch, int(conv.out_channels), height, width)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return self._shape

    def rows(self, lo: int, hi: int) -> torch.Tensor:
        first, end, top, bottom = clip(*self.spec.rows.needs(lo, hi), self._shape[2])
        return self.spec.run(padded(self.source[:, :, first:end], top, bottom), 0)


class Remade:
    """A skip tensor not kept between the down and up paths but made again when the up path takes it (`made`):
    `make` runs the same modules on the same input, so the values are the ones the down path made."""

    def __init__(self, shape: tuple[int, int, int, int], make: Callable[[], torch.Tensor]) -> None:
        self._shape, self.make = shape, make

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return self._shape

    def rows(self, lo: int, hi: int) -> torch.Tensor:
        return self.made().tensor[:, :, lo:hi]

    def made(self) -> Whole:
        """The skip, made whole (once per take: outside any loop over bands)."""
        return Whole(self.make())


class Concat:
    """Sources of one height and width side by side along channels, in order (torch.cat(dim=1) per band)."""

    def __init__(self, parts: Sequence[Rows]) -> None:
        self.parts = list(parts)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        batch, _, height, width = self.parts[0].shape
        return batch, sum(p.shape[1] for p in self.parts), height, width

    def rows(self, lo: int, hi: int) -> torch.Tensor:
        return torch.cat([p.rows(lo, hi) for p in self.parts], dim=1)


class Summed:
    """A source plus a device tensor of its shape: the sum made per band (the same values as made whole)."""

    def __init__(self, source: Rows, added: torch.Tensor) -> None:
        self.source, self.added = source, added

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return self.source.shape

    def rows(self, lo: int, hi: int) -> torch.Tensor:
        return self.source.rows(lo, hi) + self.added[:, :, lo:hi]


class Upsampled:
    """diffusers' Upsample2D (nearest, then its conv) of `low` to (height, width), by rows (see the module
    docstring). Which input row feeds each output row is found by running the same F.interpolate on the row
    indices themselves, so ragged sizes (an `upsample_size` that is not twice the input) map as the module maps
    them."""

    def __init__(self, module: Block, low: torch.Tensor, height: int, width: int) -> None:
        self.module, self.low, self.height, self.width = module, low, height, width
        self.conv = ConvSpec.of(module.conv)
        rows_in = low.shape[-2]
        index = torch.arange(rows_in, dtype=torch.float32).view(1, 1, rows_in, 1)  # host arithmetic: a few rows
        self.source_row = F.interpolate(index, size=(height, 1), mode="nearest").view(-1).long().tolist()

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return self.low.shape[0], int(self.module.conv.out_channels), self.height, self.width

    def rows(self, lo: int, hi: int) -> torch.Tensor:
        need_lo, need_hi = self.conv.rows.needs(lo, hi)
        top, bottom = max(0, -need_lo), max(0, need_hi - self.height)
        picked = self.source_row[need_lo + top : need_hi - bottom]
        first = picked[0]
        slab = self.low[:, :, first : picked[-1] + 1]  # the input rows these output rows repeat
        index = torch.tensor([r - first for r in picked], device=self.low.device)
        near = slab.index_select(2, index)
        near = F.interpolate(near, size=(near.shape[-2], self.width), mode="nearest")  # the width, as the module
        return self.conv.run(padded(near, top, bottom), 0)


def clip(lo: int, hi: int, height: int) -> tuple[int, int, int, int]:
    """Rows [lo, hi) of an image `height` rows tall: (first, end) inside it and (top, bottom) rows outside."""
    first, end = max(lo, 0), min(hi, height)
    return first, end, first - lo, hi - end


def padded(x: torch.Tensor, top: int, bottom: int) -> torch.Tensor:
    """x (B, C, h, W) with `top` and `bottom` zero rows (a conv's zero padding, added after its input's
    normalisation and activation)."""
    if not top and not bottom:
        return x
    return F.pad(x, (0, 0, top, bottom))


def _shape4(shape: torch.Size) -> tuple[int, int, int, int]:
    batch, channels, height, width = shape
    return int(batch), int(channels), int(height), int(width)
