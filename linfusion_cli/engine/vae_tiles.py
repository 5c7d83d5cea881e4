"""The tiled VAE's geometry: the image split evenly into cores, each tile its core plus a halo (all tiles the same
window size, shifted inward at the borders, so they batch), an evenly spread sample of them for the statistics
pass, and one process's share of them when the image is split over processes."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping
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
    """One process's part of a split image's tiles. The windows are dealt out in raster order, an equal count to
    each process (`mine`), and each row of tiles has one owner (`owners`: the process computing its middle
    window), so what a process ends up holding is one band of output rows (`rows`); the few windows a process
    computes in a row another owns travel to it. Each process runs the statistics pass on its own windows, and
    `pool` combines every GroupNorm's statistics over the processes as they are measured (vae_stats.NormControl),
    so they are the whole image's (tiles never show seams). `agree` gives every process's value of an int (in rank
    order); `exchange(sends, receives, kind)` sends tensors to peers and fills buffers from them, all at once."""

    rank: int
    world: int
    pool: Pool
    agree: Callable[[int], list[int]]
    exchange: Callable[[Mapping[int, torch.Tensor], Mapping[int, torch.Tensor], str], None]

    def mine(self, windows: list[Window], rank: int | None = None) -> list[int]:
        """Indices of the windows a process computes (this one's by default): its run of them in raster order."""
        rank = self.rank if rank is None else rank
        start, end = (round(r * len(windows) / self.world) for r in (rank, rank + 1))
        return list(range(start, end))

    def owners(self, windows: list[Window]) -> list[int]:
        """The process that holds each window's output: the one computing its row's middle window."""
        computes = [r for r in range(self.world) for _ in self.mine(windows, r)]
        rows = sorted({w.y0 for w in windows})
        middle = {y: [i for i, w in enumerate(windows) if w.y0 == y] for y in rows}
        owner = {y: computes[ids[len(ids) // 2]] for y, ids in middle.items()}
        return [owner[w.y0] for w in windows]

    def rows(self, windows: list[Window], scale: float, rank: int) -> tuple[int, int]:
        """The output rows [start, end) a process holds (scale: output units per window unit); empty if none."""
        owners = self.owners(windows)
        cores = [w for w, owner in zip(windows, owners, strict=True) if owner == rank]
        if not cores:
            return 0, 0
        return round((cores[0].y0 + cores[0].core[0]) * scale), round((cores[-1].y0 + cores[-1].core[2]) * scale)


class HandOver:
    """The cores a process of a split image computes of windows in rows another process holds: kept in one buffer
    per owner as they come (`keep`), sent at the end, when the cores others computed of this process's rows come
    in (`finish`). `like`: the cores' channels, dtype and device."""

    def __init__(
        self, share: WindowShare, windows: list[Window], out_grid: float, like: tuple[int, torch.dtype, torch.device]
    ) -> None:
        self.share, self.windows, self.out_grid = share, windows, out_grid
        self.owners = share.owners(windows)
        channels, self.dtype, self.device = like
        self.shapes = [(1, channels, *(s.stop - s.start for s in core_rows(w, out_grid))) for w in windows]
        self.slots: dict[int, tuple[int, int]] = {}  # window -> (owner, offset in its buffer)
        sizes: dict[int, int] = {}
        for i in share.mine(windows):
            owner = self.owners[i]
            if owner != share.rank:
                self.slots[i] = (owner, sizes.get(owner, 0))
                sizes[owner] = sizes.get(owner, 0) + math.prod(self.shapes[i])
        import torch  # lazy: the planner imports this module's tile geometry, and CLI start-up stays without torch

        self.sends = {peer: torch.empty(size, dtype=self.dtype, device=self.device) for peer, size in sizes.items()}

    def keep(self, index: int, core: torch.Tensor) -> bool:
        """Keep window `index`'s core for its owner; False if it is this process's to write."""
        if index not in self.slots:
            return False
        owner, offset = self.slots[index]
        self.sends[owner][offset : offset + core.numel()].view_as(core).copy_(core)
        return True

    def finish(self, write: Callable[[slice, slice, torch.Tensor], None]) -> None:
        """Send what was kept, one message per peer, and write the cores that come from the others."""
        import torch  # lazy: as in __init__

        share, windows = self.share, self.windows
        coming = {
            peer: [i for i in share.mine(windows, peer) if self.owners[i] == share.rank]
            for peer in range(share.world)
            if peer != share.rank
        }
        receives = {
            peer: torch.empty(sum(math.prod(self.shapes[i]) for i in ids), dtype=self.dtype, device=self.device)
            for peer, ids in coming.items()
            if ids
        }
        if self.sends or receives:
            share.exchange(self.sends, receives, "vae tiles")
        for peer, buffer in receives.items():
            offset = 0
            for i in coming[peer]:
                size = math.prod(self.shapes[i])
                write(*core_rows(windows[i], self.out_grid), buffer[offset : offset + size].view(self.shapes[i]))
                offset += size


def extent(windows: list[Window], ids: list[int]) -> tuple[int, int]:
    """The rows the windows `ids` read (empty for none)."""
    if not ids:
        return (0, 0)
    return min(windows[i].y0 for i in ids), max(windows[i].y0 + windows[i].height for i in ids)


def core_rows(w: Window, out_grid: float) -> tuple[slice, slice]:
    """Where a window's core goes in the output (rows, columns); out_grid: window units per output unit."""
    oy = slice(round((w.y0 + w.core[0]) / out_grid), round((w.y0 + w.core[2]) / out_grid))
    ox = slice(round((w.x0 + w.core[1]) / out_grid), round((w.x0 + w.core[3]) / out_grid))
    return oy, ox


def sample_batches(owned: list[list[Window]], take: int, total: int, per_batch: int) -> list[list[list[Window]]]:
    """The statistics pass's windows in batches: batches[i][rank] are the windows process `rank` runs of batch i.
    Each process takes `take` in `total` of the windows it owns (`owned[rank]`), spread evenly over them, and deals them
    into as many batches as the process with the most needs at `per_batch` a batch (some parts possibly empty),
    interleaved: every part spans its rows."""
    chosen = [[own[i] for i in spread(len(own), -(-take * len(own) // total))] for own in owned]
    count = max(math.ceil(len(part) / per_batch) for part in chosen)
    return [[part[i::count] for part in chosen] for i in range(count)]


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
