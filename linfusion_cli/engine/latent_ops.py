"""The ops on latents that read across rows, as the engine hands them to a refine method: a filter (a small
depthwise convolution, e.g. a Gaussian blur), the image's per-channel statistics and a re-match to given ones.

A method asks for these instead of calling torch on the latents it is given, because during a split image's stage
those latents are one band of the image: `LatentOps` here works on the whole image, and `splitting.BandOps`
does the same on a band (the filter a halo convolution, the statistics combined over every band), so a method
written against these ops gives the same image however the work is split.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

STATS_EPS = 1e-6  # keeps a constant channel (std 0) from dividing by zero when statistics are re-matched


class LatentOps:
    """The ops on the whole image (one process, or a stage every process runs whole). Every op is in fp32."""

    def filter2d(self, x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
        """Each channel of x (B, C, h, w) convolved with the (k, k) `kernel`, k odd, zero-padded: same size."""
        channels = x.shape[1]
        weight = kernel.to(x.device, x.dtype)[None, None].repeat(channels, 1, 1, 1)  # (C, 1, k, k)
        return F.conv2d(x, weight, padding=kernel.shape[-1] // 2, groups=channels)

    def channel_stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel mean and std (unbiased, as Tensor.std) of x (B, C, h, w), each (B, C, 1, 1) fp32."""
        x = x.float()
        return x.mean(dim=(2, 3), keepdim=True), x.std(dim=(2, 3), keepdim=True)

    def match_stats(self, x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        """x with each channel's mean and std set to `mean` and `std` (fp32)."""
        x = x.float()
        own_mean, own_std = self.channel_stats(x)
        return (x - own_mean) / (own_std + STATS_EPS) * std + mean


WHOLE_IMAGE = LatentOps()
