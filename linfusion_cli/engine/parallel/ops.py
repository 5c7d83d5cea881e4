"""The ops that mix rows, run on one band of an image so that the bands together equal the whole image.

- Convolutions: the rows a band's outputs read from other bands come by point-to-point messages (a halo); the
  conv then runs on the band as usual and only its first/last few output rows (those that read another band)
  are recomputed from small slabs: no copy of the whole band, and interior rows are computed exactly as
  unsplit. When the halo reaches past the band (dilated convs at deep levels), or the height padding is
  asymmetric, every output row comes from one slab built of the needed rows.
- GroupNorm: each band's per-group (count, mean, M2) in fp32, gathered and combined in fp64 (Chan et al.), so
  every band normalises with the whole image's statistics.
- LinFusion attention: K^T V and sum phi(k), scaled by the whole image's token count, summed over bands
  (`AttentionReduce`, the `reducer` seam of LinFusionAttention); queries stay local.
- Ordinary (softmax) self-attention: keys and values gathered from every band (`gather_tokens`): exact, but
  O(N C) memory per process and O(N^2) work; the VAE's mid-block is one.
- A refine method's filters (latent_ops: a Gaussian blur) are halo convs; statistics combine as GroupNorm's do.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...base.errors import UsageError
from ...linfusion.attention import LinFusionAttention
from ...models.tensors import resamples_in_half
from ..bands import ConvRows, Transfer, conv_rows, halo_transfers, row_transfers, width_padding
from .comm import Comm
from .stats import normalize_groups, whole_moments

RowReader = Callable[[int, int], torch.Tensor]  # band rows [lo, hi) -> (B, C, hi - lo, W)
BICUBIC_REACH = 2  # source rows a bicubic (also antialiased, when upscaling) output row reads on each side

# --- convolutions -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConvSpec:
    """What F.conv2d needs, with the height geometry split out (`rows`) and the width untouched."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    rows: ConvRows
    stride: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    width_pad: tuple[int, int]

    @classmethod
    def of(cls, conv: nn.Conv2d, extra_bottom: int = 0) -> ConvSpec:
        """The conv as it is now: refine.dilated may have changed its dilation and padding since install."""
        if conv.padding_mode != "zeros":
            raise UsageError(f"a {conv.padding_mode}-padded convolution cannot be split into bands (zeros only)")
        rows = conv_rows(conv)
        rows = ConvRows(rows.kernel, rows.stride, rows.dilation, rows.pad_top, rows.pad_bottom + extra_bottom)
        stride, dilation = conv.stride, conv.dilation
        pair = (stride[0], stride[1]), (dilation[0], dilation[1])
        return cls(conv.weight, conv.bias, rows, *pair, conv.groups, width_padding(conv))

    def run(self, x: torch.Tensor, pad_height: int) -> torch.Tensor:
        """F.conv2d with `pad_height` zero rows on both sides and the conv's own width padding."""
        left, right = self.width_pad
        if left != right:
            x, left = F.pad(x, (left, right)), 0
        return F.conv2d(x, self.weight, self.bias, self.stride, (pad_height, left), self.dilation, self.groups)


def band_conv2d(comm: Comm, spec: ConvSpec, x: torch.Tensor, kind: str = "conv") -> torch.Tensor:
    """This band's rows of the conv of the whole image. x: (B, C, h, W), this process's rows at its level."""
    bands = comm.geometry()
    edges = bands.at(bands.scale_of(comm.rank, x.shape[-2]))
    rows = spec.rows
    out = rows.out_edges(edges)
    transfers = halo_transfers(rows, edges)
    if not transfers:  # one process, or a 1x1 conv: nothing crosses a band edge
        if rows.pad_top == rows.pad_bottom:
            return spec.run(x, rows.pad_top)
        return _slab(spec, x, {}, edges, comm.rank, out[comm.rank], out[comm.rank + 1])
    halo = _exchange_halo(comm, x, transfers, edges, kind)
    o0, o1 = out[comm.rank], out[comm.rank + 1]
    top, bottom = rows.edge_rows(edges, comm.rank)
    if rows.pad_top != rows.pad_bottom or top + bottom >= o1 - o0:
        return _slab(spec, x, halo, edges, comm.rank, o0, o1)
    y = spec.run(x, rows.pad_top)  # (B, C', o1 - o0, W'): right except the rows that read another band
    if top:
        y[:, :, :top] = _slab(spec, x, halo, edges, comm.rank, o0, o0 + top)
    if bottom:
        y[:, :, y.shape[2] - bottom :] = _slab(spec, x, halo, edges, comm.rank, o1 - bottom, o1)
    return y


def _exchange_halo(
    comm: Comm,
    x: torch.Tensor,
    transfers: Sequence[Transfer],
    edges: Sequence[int],
    kind: str,
    read: RowReader | None = None,
) -> dict[int, tuple[int, torch.Tensor]]:
    """Send the rows others need, receive ours: {source rank: (first row, rows (B, C, n, W))}. The rows sent are
    x's, or `read`'s (band rows [lo, hi)) where x only gives the received rows' batch, channels, width and dtype."""
    start = edges[comm.rank]
    sends: dict[int, torch.Tensor] = {}
    receives: dict[int, torch.Tensor] = {}
    firsts: dict[int, int] = {}
    for t in transfers:
        if t.src == comm.rank:
            lo, hi = t.start - start, t.end - start
            sends[t.dst] = x[:, :, lo:hi] if read is None else read(lo, hi)
        elif t.dst == comm.rank:
            receives[t.src] = x.new_empty((x.shape[0], x.shape[1], t.end - t.start, x.shape[3]))
            firsts[t.src] = t.start
    comm.exchange(sends, receives, kind)
    return {src: (firsts[src], rows) for src, rows in receives.items()}


def _slab(
    spec: ConvSpec,
    x: torch.Tensor,
    halo: dict[int, tuple[int, torch.Tensor]],
    edges: Sequence[int],
    rank: int,
    out0: int,
    out1: int,
) -> torch.Tensor:
    """Output rows [out0, out1) from the input rows they need, gathered from the band, the halo and zeros."""
    return spec.run(_rows(x, halo, edges, rank, *spec.rows.needs(out0, out1)), 0)


def _rows(
    x: torch.Tensor, halo: dict[int, tuple[int, torch.Tensor]], edges: Sequence[int], rank: int, lo: int, hi: int
) -> torch.Tensor:
    """Image rows [lo, hi) at this level, from this band, the received halo, and zeros beyond the image."""
    height = edges[-1]
    pieces = []
    if lo < 0:
        pieces.append(x.new_zeros((*x.shape[:2], -lo, *x.shape[3:])))
    for src in range(len(edges) - 1):
        start, end = max(lo, edges[src]), min(hi, edges[src + 1])
        if start >= end:
            continue
        if src == rank:
            pieces.append(x[:, :, start - edges[rank] : end - edges[rank]])
        else:
            first, rows = halo[src]
            pieces.append(rows[:, :, start - first : end - first])
    if hi > height:
        pieces.append(x.new_zeros((*x.shape[:2], hi - height, *x.shape[3:])))
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=2)


def halo_rows(comm: Comm, x: torch.Tensor, above: int, below: int, kind: str = "rows") -> tuple[torch.Tensor, int]:
    """This band x (B, C, h, W) with up to `above`/`below` more rows of the image from the bands around it (fewer
    at the image's top and bottom), and how many were added on top: context for resampling, VAE windows..."""
    top, bottom = halo_around(comm, x, x.shape[-2], above, below, kind)
    parts = [part for part in (top, x, bottom) if part is not None]
    return (torch.cat(parts, dim=2) if len(parts) > 1 else x), 0 if top is None else top.shape[-2]


def halo_around(
    comm: Comm, like: torch.Tensor, height: int, above: int, below: int, kind: str, read: RowReader | None = None
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Up to `above` image rows just above this band and `below` just below it (fewer at the image's top and bottom:
    None where there are none), from the bands that hold them. The band is `height` rows at its level, read as
    `like` (B, C, height, W) or, for a source that is not one tensor (engine/banded.rows), by `read(lo, hi)`."""
    bands = comm.geometry()
    edges = bands.at(bands.scale_of(comm.rank, height))
    needs = [(max(0, a - above), min(edges[-1], b + below)) for a, b in itertools.pairwise(edges)]
    halo = _exchange_halo(comm, like, row_transfers(edges, needs), edges, kind, read)
    (lo, hi), start, end = needs[comm.rank], edges[comm.rank], edges[comm.rank + 1]
    top = _rows(like, halo, edges, comm.rank, lo, start) if lo < start else None
    bottom = _rows(like, halo, edges, comm.rank, end, hi) if hi > end else None
    return top, bottom


def band_upscale(comm: Comm, image: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """pipeline.upscale (bicubic, antialiased) of the whole image, on this band: `height` must be a whole multiple
    of the image's height; two rows of context each side (the kernel's reach) make it bit-exact."""
    bands = comm.geometry()
    factor = height / (bands.height * bands.scale_of(comm.rank, image.shape[-2]))
    if factor.denominator != 1:
        raise UsageError(f"a split image can only be upscaled by a whole factor in height, not {factor}")
    context, top = halo_rows(comm, image, BICUBIC_REACH, BICUBIC_REACH, "upscale")
    work = context if resamples_in_half(context.device) else context.float()
    rows = context.shape[-2] * int(factor)
    out = F.interpolate(work, size=(rows, width), mode="bicubic", align_corners=False, antialias=True)
    out = out[:, :, top * int(factor) : (top + image.shape[-2]) * int(factor)]
    return out.clamp_(-1, 1).to(image.dtype)


# --- statistics ---------------------------------------------------------------------------------------------------


def band_group_norm(comm: Comm, norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """nn.GroupNorm of the whole image, on this band: x (B, C, h, W) or (B, C, n) tokens."""
    count, mean, m2 = whole_moments(comm, x.reshape(*x.shape[:1], norm.num_groups, -1), "norm")  # (B, G) each
    return normalize_groups(norm, count, mean, m2, x)


# --- attention ------------------------------------------------------------------------------------------------------


class AttentionReduce:
    """LinFusionAttention's `reducer`: the whole image's token count, and K^T V / sum phi(k) summed over bands.

    The layer only uses K^T V's per-head diagonal blocks (h blocks of d x d), so only those travel: C^2 / h
    values instead of C^2 (20x less on SDXL's 1280-wide levels). The rest of kv stays this band's partial sum,
    which the layer's head mask zeroes."""

    def __init__(self, comm: Comm, heads: int) -> None:
        self.comm = comm
        self.heads = heads

    def whole_tokens(self, tokens: int) -> int:
        return sum(self.comm.geometry().token_counts(self.comm.rank, tokens))

    def summaries(self, layer: LinFusionAttention, x: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        return self.reduce(*layer.summaries(x, scale))

    def reduce(self, kv: torch.Tensor, k_sum: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This process's (B, C, C) K^T V and (B, C) sum of phi(k) -> the same summed over every process."""
        d = kv.shape[-1] // self.heads
        blocks = [kv[:, i * d : (i + 1) * d, i * d : (i + 1) * d] for i in range(self.heads)]  # h x (B, d, d)
        flat = torch.cat([*(b.flatten() for b in blocks), k_sum.flatten()])  # one message: (B C^2/h + B C,)
        self.comm.all_reduce_(flat, "attention")
        summed = flat[: -k_sum.numel()].view(self.heads, kv.shape[0], d, d)
        for block, total in zip(blocks, summed, strict=True):
            block.copy_(total)
        return kv, flat[-k_sum.numel() :].view_as(k_sum)


def gather_tokens(comm: Comm, tokens: torch.Tensor, kind: str = "attention_kv") -> torch.Tensor:
    """(B, n, C) tokens of this band -> (B, N, C) of the whole image, in image order (bands padded to the
    tallest for the all-gather, then trimmed)."""
    counts = comm.geometry().token_counts(comm.rank, tokens.shape[1])
    padded = tokens.new_zeros((tokens.shape[0], max(counts), tokens.shape[2]))
    padded[:, : tokens.shape[1]] = tokens
    parts = comm.all_gather(padded, kind)
    return torch.cat([part[:, :n] for part, n in zip(parts, counts, strict=True)], dim=1)


# --- filters ---------------------------------------------------------------------------------------------------


def band_filter2d(comm: Comm, x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """latent_ops.LatentOps.filter2d on a band: each channel of x (B, C, h, W) convolved with the (k, k) `kernel`
    (k odd), zero-padded, as a halo conv: this band's rows of the whole image's filter."""
    size = kernel.shape[-1]
    channels = x.shape[1]
    weight = kernel.to(x.device, x.dtype)[None, None].repeat(channels, 1, 1, 1)  # (C, 1, k, k)
    half = size // 2
    spec = ConvSpec(weight, None, ConvRows(size, 1, 1, half, half), (1, 1), (1, 1), channels, (half, half))
    return band_conv2d(comm, spec, x, "filter")
