"""Rows of a whole image held across the processes of a split image, and the messages that move rows between them.

Between the UNet's bands and the VAE's rows of tiles a stage's tensors change hands: the decoder needs the latent
rows under its tiles (a few more than a UNet band: the tiles' halos), the next stage's upscale needs the decoded
rows its output rows read, the encoder its tiles' rows of the upscaled image, and the UNet its band of the encoded
latents. A `Banded` is one process's rows of such a tensor together with the rows every process holds (known to
all of them: they follow from the image's geometry), so any process can work out who sends what to whom, and
`fetch_rows` moves only the rows missing. One process (or a tensor every process holds whole) moves nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .bands import Transfer

Span = tuple[int, int]  # rows [start, end) of the whole image, at the tensor's own scale
Exchange = Callable[[Mapping[int, torch.Tensor], Mapping[int, torch.Tensor]], None]  # sends, receive buffers


@dataclass(frozen=True)
class Banded:
    """This process's rows [held[rank]) of a whole-image tensor `height` rows tall along `dim`, and the rows every
    process holds (in rank order; they may overlap, and a process may hold none: an empty span)."""

    tensor: torch.Tensor
    held: tuple[Span, ...]
    rank: int
    height: int
    dim: int = -2

    @classmethod
    def whole(cls, tensor: torch.Tensor, world: int = 1, rank: int = 0, dim: int = -2) -> Banded:
        """A tensor every process of `world` holds whole."""
        height = tensor.shape[dim]
        return cls(tensor, ((0, height),) * world, rank, height, dim)

    @property
    def span(self) -> Span:
        return self.held[self.rank]

    @property
    def is_whole(self) -> bool:
        return self.span == (0, self.height)

    def rows(self, start: int, end: int) -> torch.Tensor:
        """Rows [start, end) of the whole, from the ones held here (a view)."""
        first, last = self.span
        if start < first or end > last:
            raise ValueError(f"rows {start}-{end} are not among the rows {first}-{last} held here")
        return self.tensor.narrow(self.dim, start - first, end - start)


def transfers(held: Sequence[Span], needs: Sequence[Span]) -> list[Transfer]:
    """The messages that give each process the rows of needs[rank] it does not hold, each row from the first
    process (in rank order) that holds it. Every process computes the same list."""
    out = []
    for dst, (lo, hi) in enumerate(needs):
        own_lo, own_hi = held[dst]
        missing = [(lo, min(hi, own_lo)), (max(lo, own_hi), hi)] if own_hi > own_lo else [(lo, hi)]
        for start, end in missing:
            cursor = start
            while cursor < end:
                src = next((r for r, (a, b) in enumerate(held) if r != dst and a <= cursor < b), None)
                if src is None:
                    raise ValueError(f"no process holds row {cursor}, which process {dst} needs")
                stop = min(end, held[src][1])
                out.append(Transfer(src, dst, cursor, stop))
                cursor = stop
    return out


def fetch_rows(banded: Banded, needs: Sequence[Span], exchange: Exchange) -> torch.Tensor:
    """Rows needs[rank] of the whole on this process, from the rows it holds and the ones others send. Every
    process calls this at once with the same `needs` (one span per process, empty for none)."""
    rank, dim = banded.rank, banded.dim
    moves = transfers(banded.held, needs)
    sends: dict[int, list[torch.Tensor]] = {}
    receives: dict[int, list[tuple[int, torch.Tensor]]] = {}
    for t in moves:
        if t.src == rank:
            sends.setdefault(t.dst, []).append(banded.rows(t.start, t.end))
        elif t.dst == rank:
            shape = list(banded.tensor.shape)
            shape[dim] = t.end - t.start
            receives.setdefault(t.src, []).append((t.start, banded.tensor.new_empty(shape)))
    packed_sends = {peer: _pack(parts) for peer, parts in sends.items()}
    packed_receives = {peer: _pack([b for _, b in parts]) for peer, parts in receives.items()}
    if packed_sends or packed_receives:
        exchange(packed_sends, packed_receives)
    lo, hi = needs[rank]
    if hi <= lo:
        return banded.tensor.narrow(dim, 0, 0)
    if not receives:
        return banded.rows(lo, hi)
    pieces = {
        start: piece for peer, parts in receives.items() for start, piece in _unpack(packed_receives[peer], parts)
    }
    own_lo, own_hi = banded.span
    if max(lo, own_lo) < min(hi, own_hi):
        pieces[max(lo, own_lo)] = banded.rows(max(lo, own_lo), min(hi, own_hi))
    return torch.cat([pieces[start] for start in sorted(pieces)], dim=dim)


def _pack(parts: list[torch.Tensor]) -> torch.Tensor:
    """Several pieces for one peer as one message."""
    return parts[0].contiguous() if len(parts) == 1 else torch.cat([p.reshape(-1) for p in parts])


def _unpack(message: torch.Tensor, parts: list[tuple[int, torch.Tensor]]) -> list[tuple[int, torch.Tensor]]:
    if len(parts) == 1:
        return [(parts[0][0], message)]
    out, offset = [], 0
    for start, like in parts:
        out.append((start, message[offset : offset + like.numel()].view_as(like)))
        offset += like.numel()
    return out


STRIP_ROWS = 256  # rows of a split image's final image per message to the writer (16384 px wide: 12.6 MB)


class RowStream:
    """A split image's final uint8 rows (h, W, 3), each process holding some (`rows`, along dim 0), brought to the
    first process in row order, a strip at a time: it takes them with `strips()` (and writes them out as they
    come: io/pngfast.write_png_rows) while every other process sends its own with `deliver()`, both at once. No
    process holds a whole copy. `whole()` puts them together instead (an image kept in memory, or a format
    encoded whole). Every process works out the same strips from the rows each holds."""

    def __init__(self, rows: Banded, exchange: Exchange, root: int = 0) -> None:
        self.rows, self.exchange, self.root = rows, exchange, root
        self.height, self.width = rows.height, int(rows.tensor.shape[1])
        needs = [(0, rows.height) if r == root else (0, 0) for r in range(len(rows.held))]
        moves = transfers(rows.held, needs)  # the rows the first process lacks, each from the first holder
        own = [Transfer(root, root, a, b) for a, b in _gaps((0, rows.height), [(t.start, t.end) for t in moves])]
        segments = sorted([*moves, *own], key=lambda t: t.start)
        self.strips_left = [  # (source, first row, rows) in row order, a strip each
            (t.src, start, min(STRIP_ROWS, t.end - start))
            for t in segments
            for start in range(t.start, t.end, STRIP_ROWS)
        ]

    @property
    def takes(self) -> bool:
        """Whether this process is the one the rows go to."""
        return self.rows.rank == self.root

    def strips(self) -> Iterator[np.ndarray]:
        """The first process: the image's rows, top to bottom, a strip at a time (its own, or received)."""
        while self.strips_left:
            source, start, count = self.strips_left.pop(0)
            if source == self.root:
                yield self.rows.rows(start, start + count).numpy()
                continue
            strip = self.rows.tensor.new_empty((count, self.width, 3))
            self.exchange({}, {source: strip})
            yield strip.numpy()

    def deliver(self) -> None:
        """Another process: send its strips as the first one takes them."""
        for source, start, count in self.strips_left:
            if source == self.rows.rank:
                self.exchange({self.root: self.rows.rows(start, start + count)}, {})
        self.strips_left = []

    @contextlib.contextmanager
    def taking(self) -> Iterator[RowStream]:
        """The first process, around what takes the strips: one that fails half way still takes (and drops) the
        rest, so that the other processes finish sending and hear of the failure from the job, not a timeout."""
        try:
            yield self
        except BaseException:
            with contextlib.suppress(Exception):  # a group already broken: the first failure is the one to say
                for _ in self.strips():
                    pass
            raise

    def whole(self) -> np.ndarray:
        """The first process: the whole image, in CPU memory."""
        return np.concatenate(list(self.strips()))


def _gaps(span: Span, taken: Sequence[Span]) -> list[Span]:
    """The rows of `span` not in any of `taken`."""
    out, cursor = [], span[0]
    for start, end in sorted(taken):
        if start > cursor:
            out.append((cursor, start))
        cursor = max(cursor, end)
    if cursor < span[1]:
        out.append((cursor, span[1]))
    return out
