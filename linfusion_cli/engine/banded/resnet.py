"""diffusers' ResnetBlock2D run in row bands: only its input and output exist whole (and, with `keep_hidden`, its
first conv's output), every other tensor of it a band at a time.

    h = conv1(act(norm1(x))) + temb        norm1: the whole input's statistics, streamed over bands first
    out = (shortcut(x) + conv2(act(norm2(h)))) / output_scale_factor

Pass A computes h band by band (each band reads one more input row above and below per conv reach) into the
output's memory, accumulating norm2's statistics; pass B, from the top, turns each band of h into the output's
rows, keeping aside the few rows of h above the next band that its conv2 still reads. So the block holds its
input and its output whole, no more. On a split image's process the rows each conv reads past its share (of the
input before pass A, of h before pass B) come from the processes around it (share.py). Same ops on the same values
as the whole block: results equal it up to fp32 reduction order (the statistics' and the convolution algorithms').
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..parallel.install import split_forward
from ..parallel.ops import ConvSpec
from ..parallel.stats import local_moments, normalize_groups
from .banding import Banding, Block, group_moments, moments_of
from .rows import Haloed, Rows, Whole, clip, padded
from .share import Moments

TIME_NORMS = ("default", "scale_shift")


def bandable_resnet(resnet: Block) -> bool:
    """Whether this block is a plain ResnetBlock2D the banded forward reproduces (no up/down sampling inside,
    zero-padded convolutions with diffusers' own forward)."""
    convs = [resnet.conv1, resnet.conv2, *([resnet.conv_shortcut] if resnet.conv_shortcut is not None else [])]
    return (
        type(resnet).__name__ == "ResnetBlock2D"
        and resnet.upsample is None
        and resnet.downsample is None
        and resnet.time_embedding_norm in TIME_NORMS
        and all(plain_conv(c) for c in convs)
        and (resnet.conv_shortcut is None or tuple(resnet.conv_shortcut.kernel_size) == (1, 1))
    )


def plain_conv(conv: object) -> bool:
    """A zero-padded nn.Conv2d with its stock forward (or a split image's, which computes the same on a share)."""
    return (
        isinstance(conv, nn.Conv2d)
        and type(conv).forward is nn.Conv2d.forward
        and ("forward" not in vars(conv) or split_forward(conv))
        and conv.padding_mode == "zeros"
    )


def resnet_forward(resnet: Block, x: Rows, temb: torch.Tensor | None, banding: Banding) -> torch.Tensor:
    """resnet(x, temb) for a banded level (see the module docstring); x may be a concatenation, an upsampling."""
    batch, channels, height, width = x.shape
    out_channels = int(resnet.conv2.out_channels)
    bands = banding.bands(x.shape, max(channels, out_channels), resnet.conv1.weight.element_size())
    stats1 = group_moments(banding, x, resnet.norm1.num_groups, bands)
    time = _time(resnet, temb)
    conv1 = ConvSpec.of(resnet.conv1)
    source = banding.share.halo(x, conv1.rows)
    out = None  # h, then the output over it
    parts = []
    for a, b in banding.each(bands):  # pass A: h = conv1(act(norm1(x))) + temb, and norm2's statistics
        first, end, top, bottom = clip(*conv1.rows.needs(a, b), source.extent)
        xs = source.rows(first, end)
        h = conv1.run(padded(_act(resnet, normalize_groups(resnet.norm1, *stats1, xs)), top, bottom), 0)
        del xs
        if time is not None and resnet.time_embedding_norm == "default":
            h = h + time
        if out is None:
            out = h.new_empty((batch, h.shape[1], height, width))
        parts.append(local_moments(h.reshape(batch, resnet.norm2.num_groups, -1)))
        out[:, :, a:b] = h
        del h
    assert out is not None
    _second_pass(resnet, x, out, moments_of(banding, parts), time, bands, banding)
    return out


def _second_pass(
    resnet: Block,
    x: Rows,
    out: torch.Tensor,
    stats: Moments,
    time: torch.Tensor | None,
    bands: list[tuple[int, int]],
    banding: Banding,
) -> None:
    """out = (shortcut(x) + conv2(act(norm2(h)))) / output_scale_factor over h in `out`, band by band from the
    top: the rows of h above a band that its conv2 reads, which the bands before overwrote, are kept aside (at
    first, those above a split image's share, received)."""
    conv2 = ConvSpec.of(resnet.conv2)
    height = out.shape[-2]
    around = banding.share.halo(Whole(out), conv2.rows)
    above = around.above  # h rows [first, a) as they were before the output overwrote them
    for a, b in banding.each(bands):
        _, end, top, bottom = clip(*conv2.rows.needs(a, b), around.extent)
        h = _joined(above, out[:, :, a : min(end, height)], _below(around, end))
        h = normalize_groups(resnet.norm2, *stats, h)
        if time is not None and resnet.time_embedding_norm == "scale_shift":
            scale, shift = torch.chunk(time, 2, dim=1)
            h = h * (1 + scale) + shift
        h = conv2.run(padded(resnet.dropout(_act(resnet, h)), top, bottom), 0)
        above = _kept_above(above, out[:, :, a:b], b - max(around.extent[0], conv2.rows.needs(b, b + 1)[0]))
        out[:, :, a:b] = (_shortcut(resnet, x.rows(a, b)) + h) / resnet.output_scale_factor
        del h


def _joined(*parts: torch.Tensor | None) -> torch.Tensor:
    """Rows one after another (a band alone as it is)."""
    present = [p for p in parts if p is not None]
    return present[0] if len(present) == 1 else torch.cat(present, dim=2)


def _below(around: Haloed, end: int) -> torch.Tensor | None:
    """The received rows below a split image's share up to row `end` (None: `end` is within the share)."""
    height = around.shape[2]
    return None if end <= height or around.below is None else around.below[:, :, : end - height]


def _kept_above(above: torch.Tensor | None, band: torch.Tensor, rows: int) -> torch.Tensor | None:
    """The last `rows` rows of h up to this band's end (those above the next band that its conv reads), before
    the band is overwritten: from the rows kept so far and the band's own."""
    if rows <= 0:
        return None
    joined = _joined(above, band)
    return joined[:, :, joined.shape[2] - rows :].clone()


def _time(resnet: Block, temb: torch.Tensor | None) -> torch.Tensor | None:
    """The time embedding's projection, as the block makes it: (B, C', 1, 1)."""
    if resnet.time_emb_proj is None or temb is None:
        return None
    if not resnet.skip_time_act:
        temb = resnet.nonlinearity(temb)
    projected: torch.Tensor = resnet.time_emb_proj(temb)[:, :, None, None]
    return projected


def _act(resnet: Block, x: torch.Tensor) -> torch.Tensor:
    """The block's nonlinearity on a band it owns (SiLU in place: the same values, no second band)."""
    if isinstance(resnet.nonlinearity, nn.SiLU):
        return F.silu(x, inplace=True)
    activated: torch.Tensor = resnet.nonlinearity(x)
    return activated


def _shortcut(resnet: Block, x: torch.Tensor) -> torch.Tensor:
    """The block's input on the output's channels: itself, or its 1x1 conv (per row: no halo)."""
    return x if resnet.conv_shortcut is None else ConvSpec.of(resnet.conv_shortcut).run(x, 0)
