"""Horizontal bands of one image, one per process, and the row arithmetic every split op shares.

Geometry is kept in latent rows. Every UNet level (and the VAE's and a ControlNet's image-size levels) sees the
same bands scaled by its own factor: a process holding `rows` latent rows holds `rows * f` rows at a level of
scale f, so the level's scale is read off the local tensor's height and never has to be passed down.
Inner band edges sit on multiples of the UNet's total downsampling, so every level's edges are whole rows and
every stride-2 convolution's output band starts where its input band does, halved. An image whose height is not
such a multiple ("ragged": 1365 latent rows at 16384x10920) is split too: the last band carries the remainder,
and at each level down the image's height rounds up (as a stride-2 conv's output does), which only the last
band sees. Its level is then found among the powers of two, the scales every UNet, VAE and ControlNet level has.

Convolution rows: output rows [o0, o1) of a conv (kernel k, stride s, dilation d, top padding p) need input
rows [o0 s - p, (o1 - 1) s - p + d (k - 1) + 1); rows outside [0, H) are the conv's own zero padding.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING

from ..base.errors import UsageError

if TYPE_CHECKING:  # annotations only: the band arithmetic runs without torch (`plan --world-size`)
    import torch

LEVELS_UP = 3  # the largest scale a band is seen at: 2**3, the image rows of SD VAEs and ControlNet inputs


@dataclass(frozen=True)
class Bands:
    """Latent row edges: process r holds rows [edges[r], edges[r + 1]); `multiple` divides every inner edge.
    `width` (latent columns) is needed only to count a ragged image's tokens (see the module docstring)."""

    edges: tuple[int, ...]
    multiple: int = 1
    width: int | None = None

    @classmethod
    def split(cls, height: int, world: int, multiple: int = 1, width: int | None = None) -> Bands:
        """`height` latent rows in `world` near-equal bands whose inner edges are multiples of `multiple` (the
        last band also takes the remainder of a ragged height)."""
        if world < 1:
            raise UsageError(f"a split needs at least one process, got {world}")
        units = height // multiple
        if units < world:
            raise UsageError(
                f"a latent height of {height} rows gives at most {units} bands of {multiple} rows, "
                f"fewer than the {world} processes; use a taller image or fewer processes"
            )
        inner = tuple(round(i * units / world) * multiple for i in range(world))
        return cls((*inner, height), multiple, width)

    @classmethod
    def of_heights(cls, heights: Sequence[int], multiple: int = 1, width: int | None = None) -> Bands:
        """Bands of the given heights, top to bottom (unequal splits, tests); only the last may be ragged, and
        then it must hold at least `multiple` rows."""
        *inner, last = heights
        if any(h <= 0 or h % multiple for h in inner) or last < (multiple if last % multiple else 1):
            raise UsageError(f"band heights {list(heights)} must be positive multiples of {multiple}")
        return cls((0, *itertools.accumulate(heights)), multiple, width)

    @property
    def world(self) -> int:
        return len(self.edges) - 1

    @property
    def height(self) -> int:
        return self.edges[-1]

    @property
    def ragged(self) -> bool:
        """Whether the height is not a multiple of `multiple`: levels round up, the last band sees it."""
        return self.height % self.multiple != 0

    def rows(self, rank: int) -> tuple[int, int]:
        return self.edges[rank], self.edges[rank + 1]

    def heights(self, scale: Fraction | int = 1) -> list[int]:
        """Each band's rows at a level of this scale (latent rows by default)."""
        return [b - a for a, b in itertools.pairwise(self.at(scale))]

    def scale_of(self, rank: int, local_rows: int) -> Fraction:
        """The level's scale, read off this process's local height there."""
        start, end = self.rows(rank)
        if not self.ragged or rank < self.world - 1:
            return Fraction(local_rows, end - start)
        return self._level(lambda s: self.heights(s)[rank] == local_rows, f"{local_rows} rows of band {rank}")

    def scale_of_whole(self, whole_rows: int) -> Fraction:
        """The level's scale, read off the whole image's height there."""
        if not self.ragged:
            return Fraction(whole_rows, self.height)
        return self._level(lambda s: math.ceil(self.height * s) == whole_rows, f"{whole_rows} rows of the image")

    def token_level(self, rank: int, tokens: int) -> tuple[Fraction, int]:
        """(scale, columns) of the level at which this band holds `tokens` tokens (full-width rows)."""
        width = self.width
        if width is None:
            raise UsageError("a ragged split image needs its width to count tokens: Bands(..., width=...)")
        scale = self._level(
            lambda s: self.heights(s)[rank] * math.ceil(width * s) == tokens, f"{tokens} tokens of band {rank}"
        )
        return scale, math.ceil(width * scale)

    def token_counts(self, rank: int, tokens: int) -> list[int]:
        """Every band's token count at the level where this band holds `tokens` (full-width rows of tokens)."""
        if self.ragged:  # levels round the image's height up: count each band's rows at this band's level
            scale, columns = self.token_level(rank, tokens)
            return [rows * columns for rows in self.heights(scale)]
        heights = self.heights()
        start, end = self.rows(rank)
        if any(tokens * h % heights[rank] for h in heights):
            raise UsageError(f"{tokens} tokens are not a whole band of rows {start}-{end} of {self.height}")
        return [tokens * h // heights[rank] for h in heights]

    def at(self, scale: Fraction | int) -> tuple[int, ...]:
        """Row edges at a level of this scale (latent rows times `scale`); inner ones must be whole rows, the
        image's height rounds up."""
        scale = Fraction(scale)
        inner = [e * scale for e in self.edges[:-1]]
        if any(e.denominator != 1 for e in inner) or (not self.ragged and (self.height * scale).denominator != 1):
            raise UsageError(f"bands {list(self.edges)} have no whole-row edges at scale {scale}")
        return (*(int(e) for e in inner), math.ceil(self.height * scale))

    def take(self, x: torch.Tensor, rank: int, dim: int = -2) -> torch.Tensor:
        """This process's band of a whole-image tensor at any scale (latents, noise, an image): a view."""
        edges = self.at(self.scale_of_whole(x.shape[dim]))
        return x.narrow(dim, edges[rank], edges[rank + 1] - edges[rank])

    def _scales(self) -> Iterator[Fraction]:
        """The levels a ragged band can be seen at: 1/multiple (the UNet's deepest) up to 2**LEVELS_UP."""
        deepest = self.multiple.bit_length() - 1
        return (Fraction(2) ** k for k in range(-deepest, LEVELS_UP + 1))

    def _level(self, matches: Callable[[Fraction], bool], what: str) -> Fraction:
        found = next((s for s in self._scales() if matches(s)), None)
        if found is None:
            raise UsageError(f"{what} are at no level of bands {list(self.edges)} (multiple {self.multiple})")
        return found


def downsampling(block_out_channels: Sequence[int]) -> int:
    """The UNet's total downsampling (2 ** (levels - 1)): the multiple band edges sit on."""
    return 2 ** (len(block_out_channels) - 1)


# --- convolution rows -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConvRows:
    """A conv's geometry along the height, all in rows: what any process needs to know about any other."""

    kernel: int
    stride: int
    dilation: int
    pad_top: int
    pad_bottom: int

    @property
    def reach(self) -> int:
        return self.dilation * (self.kernel - 1)

    def out_height(self, height: int) -> int:
        return (height + self.pad_top + self.pad_bottom - self.reach - 1) // self.stride + 1

    def needs(self, out0: int, out1: int) -> tuple[int, int]:
        """Input rows [lo, hi) that output rows [out0, out1) read (may reach beyond the image)."""
        return out0 * self.stride - self.pad_top, (out1 - 1) * self.stride - self.pad_top + self.reach + 1

    def out_edges(self, edges: Sequence[int]) -> tuple[int, ...]:
        """Output band edges: input edges over the stride (the image's height rounded up). Only for convs that
        keep the grid (every UNet/VAE conv): output height = input height / stride, rounded up as a stride-2 conv
        with padding 1 rounds it; anything else would move rows between bands."""
        height = edges[-1]
        if any(e % self.stride for e in edges[:-1]) or self.out_height(height) != -(-height // self.stride):
            raise UsageError(
                f"a conv (kernel {self.kernel}, stride {self.stride}, dilation {self.dilation}, padding "
                f"{self.pad_top}/{self.pad_bottom}) maps {height} rows to {self.out_height(height)}, not "
                f"{height}/{self.stride} (rounded up): only grid-keeping convolutions can be split into bands"
            )
        return (*(e // self.stride for e in edges[:-1]), -(-height // self.stride))

    def edge_rows(self, edges: Sequence[int], rank: int) -> tuple[int, int]:
        """(top, bottom): how many of this band's first/last output rows read rows of another band; the rest
        read only the band's own rows or the image's zero padding."""
        (a, b), height = (edges[rank], edges[rank + 1]), edges[-1]
        out = self.out_edges(edges)
        o0, o1 = out[rank], out[rank + 1]
        top = 0 if a == 0 else min(o1 - o0, max(0, -((-(a + self.pad_top)) // self.stride) - o0))
        first_bottom = (b + self.pad_top - self.reach - 1) // self.stride + 1
        bottom = 0 if b == height else min(o1 - o0, max(0, o1 - max(first_bottom, o0)))
        return top, bottom


@dataclass(frozen=True)
class Transfer:
    """Rows [start, end) of the input (image rows at this level) that `src` sends to `dst`."""

    src: int
    dst: int
    start: int
    end: int


def halo_transfers(rows: ConvRows, edges: Sequence[int]) -> list[Transfer]:
    """Every rank-to-rank message one conv's halo exchange sends: for each band, the input rows its output rows
    need that another band holds. Empty for 1x1 convs."""
    out = rows.out_edges(edges)
    return row_transfers(edges, [rows.needs(out[r], out[r + 1]) for r in range(len(edges) - 1)])


def row_transfers(edges: Sequence[int], needs: Sequence[tuple[int, int]]) -> list[Transfer]:
    """The messages that give each band r the rows needs[r] = [lo, hi) held by other bands."""
    transfers = []
    for dst, (lo, hi) in enumerate(needs):
        for src in range(len(edges) - 1):
            start, end = max(lo, edges[src]), min(hi, edges[src + 1])
            if src != dst and start < end:
                transfers.append(Transfer(src, dst, start, end))
    return transfers


def conv_rows(conv: torch.nn.Conv2d) -> ConvRows:
    """The height geometry of a Conv2d as it is now (refine.dilated may have changed dilation and padding)."""
    kernel, stride, dilation = conv.kernel_size[0], conv.stride[0], conv.dilation[0]
    padding = conv.padding
    if isinstance(padding, str):  # "same" (stride 1) pads reach // 2 on top, the rest at the bottom; "valid" none
        total = dilation * (kernel - 1) if padding == "same" else 0
        return ConvRows(kernel, stride, dilation, total // 2, total - total // 2)
    return ConvRows(kernel, stride, dilation, padding[0], padding[0])


def width_padding(conv: torch.nn.Conv2d) -> tuple[int, int]:
    """(left, right) zero columns the conv pads: unchanged by a split."""
    padding = conv.padding
    if isinstance(padding, str):
        total = conv.dilation[1] * (conv.kernel_size[1] - 1) if padding == "same" else 0
        return total // 2, total - total // 2
    return padding[1], padding[1]
