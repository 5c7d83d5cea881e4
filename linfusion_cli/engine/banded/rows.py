"""Where a band's rows come from: a feature map at one UNet level that the banded forwards read a few rows at a
time, without it having to exist whole on the device.

A `Rows` is (B, C, H, W) by its `shape` and gives rows [lo, hi) (0 <= lo < hi <= H) as a device tensor:
- `Whole`: a tensor on the device; the rows are a view.
- `Parked`: a tensor parked in CPU memory (engine/host.Host.park); the rows come back through `Host.fetch`.
- `Concat`: several sources side by side along channels (an up block's hidden state and its skip).
- `Summed`: a source plus a tensor of its shape (a skip and the ControlNet residual added to it).
- `Convolved`: a plain conv of a tensor, computed for the rows asked (conv_in's output, never made whole).
- `Nearest`: a lower level's tensor upsampled 2x (nearest), computed for the rows asked.
- `Upsampled`: diffusers' Upsample2D (nearest 2x, then a 3x3 conv) of a lower level's tensor, computed for the
  rows asked, so that the upsampled tensor (twice the height and width) never exists whole.
- `Haloed`: a source with the few rows just above and below it that other processes hold, when it is one
  process's share of a split image (share.py); a conv reading past the share reads them, as past a band it reads
  the rows in memory. Alone, a source with nothing around it.

Rows beyond the image are the caller's business (a conv pads its *input*, which is normalised and activated
first): `clip` and `padded` do that arithmetic on a Haloed source's `extent`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from ..host import Host
    from ..parallel.ops import ConvSpec


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
    """A plain stride-1 conv (`spec`) of a source, computed for the rows asked (halo rows read from the source and,
    past a split image's share, from the rows around it; zero rows beyond the image): the UNet's conv_in on its
    input, which is never made whole."""

    def __init__(self, spec: ConvSpec, source: Haloed) -> None:
        self.spec, self.source = spec, source
        batch, _, height, width = source.shape
        self._shape = (batch, int(spec.weight.shape[0]), height, width)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return self._shape

    def rows(self, lo: int, hi: int) -> torch.Tensor:
        first, end, top, bottom = clip(*self.spec.rows.needs(lo, hi), self.source.extent)
        return self.spec.run(padded(self.source.rows(first, end), top, bottom), 0)


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


class Nearest:
    """`low` upsampled to (height, width) by nearest neighbours, as diffusers' Upsample2D interpolates. Which input
    row feeds each output row is found by running the same F.interpolate on the row indices themselves, so ragged
    sizes (an `upsample_size` that is not twice the input) map as the module maps them."""

    def __init__(self, low: torch.Tensor, height: int, width: int) -> None:
        self.low, self.height, self.width = low, height, width
        rows_in = low.shape[-2]
        index = torch.arange(rows_in, dtype=torch.float32).view(1, 1, rows_in, 1)  # host arithmetic: a few rows
        self.source_row = F.interpolate(index, size=(height, 1), mode="nearest").view(-1).long().tolist()

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return self.low.shape[0], self.low.shape[1], self.height, self.width

    def rows(self, lo: int, hi: int) -> torch.Tensor:
        picked = self.source_row[lo:hi]
        first = picked[0]
        slab = self.low[:, :, first : picked[-1] + 1]  # the input rows these output rows repeat
        index = torch.tensor([r - first for r in picked], device=self.low.device)
        near = slab.index_select(2, index)
        return F.interpolate(near, size=(near.shape[-2], self.width), mode="nearest")  # the width, as the module


class Haloed:
    """A source and the rows just above (`above`, (B, C, n, W)) and below it that other processes hold (None:
    none, at the image's edge or alone): rows [lo, hi) for `extent`[0] <= lo < hi <= `extent`[1]."""

    def __init__(self, source: Rows, above: torch.Tensor | None = None, below: torch.Tensor | None = None) -> None:
        self.source, self.above, self.below = source, above, below

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return self.source.shape

    @property
    def extent(self) -> tuple[int, int]:
        """The rows there are, in the source's rows: from above it to below it."""
        height = self.shape[2]
        above = 0 if self.above is None else self.above.shape[2]
        return -above, height + (0 if self.below is None else self.below.shape[2])

    def rows(self, lo: int, hi: int) -> torch.Tensor:
        height = self.shape[2]
        pieces = []
        if lo < 0 and self.above is not None:
            pieces.append(self.above[:, :, self.above.shape[2] + lo : self.above.shape[2] + min(hi, 0)])
        if lo < height and hi > 0:
            pieces.append(self.source.rows(max(lo, 0), min(hi, height)))
        if hi > height and self.below is not None:
            pieces.append(self.below[:, :, max(lo - height, 0) : hi - height])
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=2)


class Upsampled:
    """diffusers' Upsample2D (nearest, then its conv) by rows (see the module docstring): its conv, run on the rows
    of `nearest` (the lower level's tensor upsampled by nearest neighbours, with the rows around a split image's
    share)."""

    def __init__(self, conv: ConvSpec, nearest: Haloed) -> None:
        self.conv, self.nearest = conv, nearest

    @property
    def shape(self) -> tuple[int, int, int, int]:
        batch, _, height, width = self.nearest.shape
        return batch, int(self.conv.weight.shape[0]), height, width

    def rows(self, lo: int, hi: int) -> torch.Tensor:
        first, end, top, bottom = clip(*self.conv.rows.needs(lo, hi), self.nearest.extent)
        return self.conv.run(padded(self.nearest.rows(first, end), top, bottom), 0)


def clip(lo: int, hi: int, extent: tuple[int, int]) -> tuple[int, int, int, int]:
    """Rows [lo, hi) of a source whose rows are `extent` (Haloed.extent; beyond them the image's zero padding):
    (first, end) inside it and (top, bottom) rows outside."""
    first, end = max(lo, extent[0]), min(hi, extent[1])
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
