"""How one UNet call runs in row bands on one device: how tall a band is at each level, how the loops over bands
run (engine/host.Host.each: all bands in a real run, one standing for all in a memory simulation), and whether
skip tensors are parked in CPU memory.

Band heights: `rows` fixed at every level (tests pick small and ragged ones), else as many rows as keep the widest
band temporary within `band_bytes`. A level only one band tall runs as diffusers runs it. On a split image's
process (`share`: share.py) the bands cover its share, and a level is banded where the tallest share takes more
than one band, on every process alike.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from ..memory_plan import BAND_BYTES
from ..parallel.stats import combine_moments, local_moments
from .share import Alone, Moments

if TYPE_CHECKING:
    from ..host import Host
    from .rows import Rows

T = TypeVar("T")
# A diffusers module (UNet, block, resnet, transformer): its attributes are read as diffusers sets them, which
# nn.Module's typing cannot say (every attribute is a Tensor | Module to it).
Block = Any


@dataclass(frozen=True)
class Banding:
    """See the module docstring. `park`: skip tensors of banded levels go to CPU memory as the down path makes
    them; `share`: what the rest of a split image adds (share.Share), nothing alone."""

    host: Host
    rows: int | None = None
    band_bytes: int = BAND_BYTES
    park: bool = False
    share: Alone = field(default_factory=Alone)

    def bands(self, shape: Sequence[int], channels: int, itemsize: int) -> list[tuple[int, int]]:
        """Row bands [a, b) covering a level of `shape` (B, C, H, W) whose widest tensor has `channels`."""
        batch, _, height, width = shape
        rows = self.rows or max(1, self.band_bytes // max(1, batch * channels * width * itemsize))
        return [(a, min(a + rows, height)) for a in range(0, height, rows)]

    def banded(self, shape: Sequence[int], channels: int, itemsize: int) -> bool:
        """Whether a level of this shape takes more than one band (on a split image: the tallest share does)."""
        batch, _, height, width = shape
        return len(self.bands((batch, channels, self.share.tallest(height), width), channels, itemsize)) > 1

    def each(self, bands: list[tuple[int, int]]) -> Iterable[tuple[int, int]]:
        """The loop over bands (Host.each; a band's work is its height)."""
        looped: Any = self.host.each(bands, [b - a for a, b in bands])
        return looped  # type: ignore[no-any-return]


def group_moments(banding: Banding, source: Rows, groups: int, bands: list[tuple[int, int]]) -> Moments:
    """Per (sample, group) (count, mean, M2) of a whole source, streamed over its bands and combined in band order
    (engine/parallel/stats.py: exact up to fp32 reduction order); on a split image pooled over the processes."""
    batch = source.shape[0]
    parts = [local_moments(source.rows(a, b).reshape(batch, groups, -1)) for a, b in banding.each(bands)]
    return moments_of(banding, parts)


def moments_of(banding: Banding, parts: list[Moments]) -> Moments:
    """The bands' (count, mean, M2) combined in order: the whole image's (on a split image: the share's, pooled
    over the processes)."""
    return banding.share.pooled(combine_moments([p[0] for p in parts], [p[1] for p in parts], [p[2] for p in parts]))
