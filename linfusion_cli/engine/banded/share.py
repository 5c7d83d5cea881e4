"""What a UNet run in row bands needs to know about the rest of the image: nothing on one device (`Alone`), or, on
one process of a split image (engine/parallel), that its rows are a share of the image (`Share`).

A split image's process runs its share in bands as one device runs the whole image in bands; at each of the few
points where the bands meet the rest of the image, it takes what the split takes, with the split's own messages:
- GroupNorm statistics: the share's, streamed over its bands, then pooled over the processes (stats.py);
- LinFusion's K^T V and sum phi(k): summed over the share's bands, then over the processes (ops.AttentionReduce),
  each token scaled by the whole image's token count;
- a conv's rows past the share: received from the processes that hold them before the bands run (a `Haloed`
  source), where within the share they come from memory.
So a process's messages are the split's, whatever its bands (parallel/plan.py counts them), and every process
takes the banded path on the same levels (the tallest share decides), so they send them in the same order.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..parallel.ops import AttentionReduce, halo_around
from ..parallel.stats import pooled_moments
from .rows import Haloed, Rows

if TYPE_CHECKING:
    from ..bands import ConvRows
    from ..parallel.comm import Comm

Moments = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # count, mean, M2, (B, G) fp64


class Alone:
    """The whole image on one device: its bands are all there is."""

    def tallest(self, height: int) -> int:
        """The most rows any process holds at a level where this one holds `height`."""
        return height

    def pooled(self, moments: Moments) -> Moments:
        """The whole image's (count, mean, M2) from this process's."""
        return moments

    def whole_tokens(self, tokens: int) -> int:
        """The whole image's token count at a level where this process holds `tokens`."""
        return tokens

    def reduced(self, kv: torch.Tensor, k_sum: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole image's K^T V (B, C, C) and sum phi(k) (B, C) from this process's."""
        return kv, k_sum

    def halo(self, source: Rows, rows: ConvRows) -> Haloed:
        """`source` with the rows around it that a conv of geometry `rows` reads past it."""
        return Haloed(source)


class Share(Alone):
    """This process's rows of a split image (see the module docstring); `comm.bands` is the stage's split."""

    def __init__(self, comm: Comm) -> None:
        self.comm = comm

    def tallest(self, height: int) -> int:
        bands = self.comm.geometry()
        return max(bands.heights(bands.scale_of(self.comm.rank, height)))

    def pooled(self, moments: Moments) -> Moments:
        return pooled_moments(self.comm, *moments, "norm")

    def whole_tokens(self, tokens: int) -> int:
        return AttentionReduce(self.comm, 1).whole_tokens(tokens)

    def reduced(self, kv: torch.Tensor, k_sum: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
        return AttentionReduce(self.comm, heads).reduce(kv, k_sum)

    def halo(self, source: Rows, rows: ConvRows) -> Haloed:
        height = source.shape[2]
        above, below = -rows.needs(0, 1)[0], rows.needs(height - 1, height)[1] - height
        like = source.rows(0, 1)  # the rows received: their batch, channels, width and dtype
        top, bottom = halo_around(self.comm, like, height, max(0, above), max(0, below), "conv", source.rows)
        return Haloed(source, top, bottom)
