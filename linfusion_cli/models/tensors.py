"""Images as device tensors: uint8 arrays in, bicubic resizes on the device. Shared by the engine's stage
hand-off (an image upscaled for the next stage) and ControlNets (a control image at every stage's size)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


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


def to_device_image(array: np.ndarray, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, H, W) in [-1, 1] on the device."""
    tensor = torch.from_numpy(np.ascontiguousarray(array)).to(device)
    return (tensor.permute(2, 0, 1)[None].to(dtype) / 127.5 - 1.0).to(dtype)
