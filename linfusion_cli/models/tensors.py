"""Images as device tensors: uint8 arrays in, bicubic resizes on the device. Shared by the engine's stage
hand-off (an image upscaled for the next stage) and ControlNets (a control image at every stage's size)."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

BICUBIC_TAPS = 2  # source rows a bicubic output row reads on each side of its centre (antialiased: times the
# downscale factor); one more row of margin keeps rounding of the centre from reaching past a slab


def resamples_in_half(device: torch.device) -> bool:
    """Whether bicubic resampling runs in the image's own (half) precision: on CUDA, and on the meta device a
    memory simulation stands in for it with; elsewhere half-precision resampling is slow or missing (fp32)."""
    return device.type in ("cuda", "meta")


def upscale(image: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Bicubic resize on the device (antialiased, so it also works downwards), clamped to [-1, 1]."""
    if image.shape[-1] == width and image.shape[-2] == height:
        return image
    work = image if resamples_in_half(image.device) else image.float()
    out = F.interpolate(work, size=(height, width), mode="bicubic", align_corners=False, antialias=True)
    return out.clamp_(-1, 1).to(image.dtype)


def upscale_source_rows(rows: tuple[int, int], height: int, new_height: int) -> tuple[int, int]:
    """The rows of an image `height` rows tall that `upscale_rows` needs for rows [start, end) of its resize to
    `new_height`: every row they read, widened to whole periods of the resize (`_period`) so that a slab maps
    its rows exactly as the whole image does. Empty rows need none."""
    start, end = rows
    if end <= start:
        return (0, 0)
    period_in = _period(height, new_height)[0]
    reach = math.ceil(BICUBIC_TAPS * max(height / new_height, 1)) + 1
    lo = max(0, start * height // new_height - reach)
    hi = min(height, -(-end * height // new_height) + reach)
    return lo // period_in * period_in, min(height, -(-hi // period_in) * period_in)


def upscale_rows(
    slab: torch.Tensor, first: int, height: int, width: int, new_height: int, rows: tuple[int, int]
) -> torch.Tensor:
    """Rows [start, end) of `upscale(image, width, new_height)` for an image `height` rows tall, from `slab`: its
    rows [first, first + slab rows), as `upscale_source_rows` asks. The same as the whole image's resize to
    rounding: bicubic maps each output row to source rows at a fixed ratio, so a slab starting on a period of
    that ratio maps its rows as the whole does, and the rows it reads lie inside the slab."""
    period_in, period_out = _period(height, new_height)
    last = first + slab.shape[-2]
    if first % period_in or (last % period_in and last != height):
        raise ValueError(f"source rows {first}-{last} are not whole periods of {period_in} rows")
    top = first // period_in * period_out
    bottom = new_height if last == height else last // period_in * period_out
    out = upscale(slab, width, bottom - top)
    return out[:, :, rows[0] - top : rows[1] - top]


def _period(height: int, new_height: int) -> tuple[int, int]:
    """The smallest whole numbers of source and output rows in the ratio height : new_height."""
    common = math.gcd(height, new_height)
    return height // common, new_height // common


def to_device_image(array: np.ndarray, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, H, W) in [-1, 1] on the device."""
    tensor = torch.from_numpy(np.ascontiguousarray(array)).to(device)
    return (tensor.permute(2, 0, 1)[None].to(dtype) / 127.5 - 1.0).to(dtype)
