"""The tiled VAE's geometry: the image split evenly into cores, each tile its core plus a halo (all tiles the same
window size, shifted inward at the borders, so they batch), an evenly spread sample of them for the statistics
pass, and one process's share of them when the image is split over processes."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# A split image's GroupNorm statistics: (every process's element count, this process's mean and M2 per group)
# -> the mean and M2 of every process's parts combined (vae_stats.NormControl.pool). Quoted: the planner imports
# this module, and the CLI starts without torch.
Pool = Callable[[list[float], "torch.Tensor", "torch.Tensor"], tuple["torch.Tensor", "torch.Tensor"]]


@dataclass(frozen=True)
class Window:
    """One tile: its window (what the network sees) and core (what it owns), in units of one grid (px)."""

    y0: int
    x0: int
    height: int
    width: int
    core: tuple[int, int, int, int]  # (top, left, bottom, right) relative to the window

    def core_slices(self, scale: float = 1.0) -> tuple[slice, slice]:
        top, left, bottom, right = self.core
        return (slice(round(top * scale), round(bottom * scale)), slice(round(left * scale), round(right * scale)))


@dataclass(frozen=True)
class WindowShare:
    """One process's part of a split image's tiles: a contiguous run of tile rows, so what it writes is one band
    of output rows. Each process runs the statistics pass on its own tiles, and `pool` combines every GroupNorm's
    statistics over the processes as they are measured (vae_stats.NormControl), so they are the whole image's
    (tiles never show seams). `agree` gives every process's value of an int (in rank order); `combine` sums a
    tensor over the processes in place (each wrote its own rows, zeros elsewhere); `gather` puts uint8 row bands
    (this process's rows [start, end)) together on the first process (None elsewhere)."""

    rank: int
    world: int
    combine: Callable[[torch.Tensor], torch.Tensor]
    gather: Callable[[torch.Tensor, list[tuple[int, int]]], torch.Tensor | None]
    pool: Pool
    agree: Callable[[int], list[int]]

    def mine(self, windows: list[Window], rank: int | None = None) -> set[int]:
        """Indices of the windows a process writes (this one's by default): its chunk of the grid's rows."""
        rank = self.rank if rank is None else rank
        rows = sorted({w.y0 for w in windows})
        start, end = (round(r * len(rows) / self.world) for r in (rank, rank + 1))
        owned = set(rows[start:end])
        return {i for i, w in enumerate(windows) if w.y0 in owned}

    def rows(self, windows: list[Window], scale: int, rank: int) -> tuple[int, int]:
        """The output rows [start, end) a process writes (scale: output px per window unit); empty if none."""
        cores = [windows[i] for i in sorted(self.mine(windows, rank))]
        if not cores:
            return 0, 0
        return (cores[0].y0 + cores[0].core[0]) * scale, (cores[-1].y0 + cores[-1].core[2]) * scale


def _even_split(total: int, target: int, multiple: int) -> list[tuple[int, int]]:
    """Split [0, total) into ceil(total/target) near-equal parts whose boundaries are multiples of `multiple`."""
    count = max(1, math.ceil(total / target))
    units = total // multiple
    bounds = [round(i * units / count) * multiple for i in range(count)] + [total]
    return [(a, b) for a, b in itertools.pairwise(bounds) if b > a]


def tile_windows(height: int, width: int, core: int, halo: int, multiple: int = 1) -> list[Window]:
    """Same-size windows covering a (height, width) grid: cores partition it, halos give context."""
    rows = _even_split(height, core, multiple)
    cols = _even_split(width, core, multiple)
    win_h = min(height, max(b - a for a, b in rows) + 2 * halo)
    win_w = min(width, max(b - a for a, b in cols) + 2 * halo)
    windows = []
    for r0, r1 in rows:
        y0 = _place(r0, r1, halo, win_h, height, multiple)
        for c0, c1 in cols:
            x0 = _place(c0, c1, halo, win_w, width, multiple)
            windows.append(Window(y0, x0, win_h, win_w, (r0 - y0, c0 - x0, r1 - y0, c1 - x0)))
    return windows


def _place(core_start: int, core_end: int, halo: int, size: int, total: int, multiple: int) -> int:
    """Window start: `halo` before the core, centred when there is room to spare, kept inside [0, total)."""
    spare = size - (core_end - core_start)
    start = core_start - min(halo, spare // 2) if spare < 2 * halo else core_start - spare // 2
    start = (max(0, min(start, total - size)) // multiple) * multiple
    return max(0, min(start, total - size))


def spread(count: int, take: int) -> list[int]:
    """`take` indices spread evenly over range(count)."""
    if take >= count:
        return list(range(count))
    return sorted({min(count - 1, int((i + 0.5) * count / take)) for i in range(take)})
