"""Statistics of the whole image from its bands: (count, mean, M2) per band, combined exactly.

Why not all-reduced sums of x and x^2: var = E[x^2] - E[x]^2 cancels catastrophically in fp32 when |mean| >> std,
and a 16K UNet level has 4M elements per group. Each band's (mean, M2) is measured in fp32 around its own mean,
and the parts are combined by Chan et al.'s formula in fp64, in rank order, so every process gets the same bits
(tests/test_parallel_ops.py: 4M elements, mean 300, std 0.5: 1e-7 vs fp32 sums' >1e-2).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .comm import Comm

STATS_CHUNK_BYTES = 1 << 28  # fp32 working copy of a half-precision input, at most this per chunk


def local_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(count, mean, M2) over the last dim of x (..., n), in fp32, without an fp32 copy of all of a half-precision
    x at once. Returns count (scalar tensor) and mean, M2 of shape x.shape[:-1]."""
    n = x.shape[-1]
    if x.dtype == torch.float32:
        var, mean = torch.var_mean(x, dim=-1, correction=0)
        return torch.tensor(float(n)), mean, var * n
    flat = x.reshape(-1, n)  # (R, n)
    per_chunk = max(1, STATS_CHUNK_BYTES // (4 * n))
    means, m2s = [], []
    for part in flat.split(per_chunk):
        var, mean = torch.var_mean(part.float(), dim=-1, correction=0)
        means.append(mean)
        m2s.append(var * n)
    shape = x.shape[:-1]
    return torch.tensor(float(n)), torch.cat(means).view(shape), torch.cat(m2s).view(shape)


def combine_moments(
    counts: Sequence[torch.Tensor], means: Sequence[torch.Tensor], m2s: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chan et al.'s pairwise combination of (count, mean, M2) parts, in fp64, in the given order (so every
    process combining the same parts gets the same bits). Returns (count, mean, M2) in fp64."""
    count, mean, m2 = counts[0].double(), means[0].double(), m2s[0].double()
    for n_b, mean_b, m2_b in zip(counts[1:], means[1:], m2s[1:], strict=True):
        n_b, mean_b, m2_b = n_b.double(), mean_b.double(), m2_b.double()
        total = count + n_b
        delta = mean_b - mean
        mean = mean + delta * (n_b / total)
        m2 = m2 + m2_b + delta.square() * (count * n_b / total)
        count = total
    return count, mean, m2


def whole_moments(comm: Comm, x: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(count, mean, M2) over the last dim of x, pooled over every process's band (fp64)."""
    return pooled_moments(comm, *local_moments(x), kind)


def pooled_moments(
    comm: Comm, count: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor, kind: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This process's (count, mean, M2) (count a scalar tensor) pooled over every process's (fp64), in rank order:
    the same bits on every process."""
    packed = torch.stack([count.expand_as(mean).to(mean.device), mean, m2]).double()  # (3, ...)
    parts = comm.all_gather(packed, kind)
    return combine_moments([p[0] for p in parts], [p[1] for p in parts], [p[2] for p in parts])


def pooled_groups(
    comm: Comm, counts: list[float], mean: torch.Tensor, m2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The tiled VAE's GroupNorm statistics over a split image's processes (vae_stats.NormControl.pool): this
    process's mean and M2 per group (G,), every process's element count (known from the tiles' geometry, so only
    2 G numbers travel); the combined mean and M2 in fp64, the same bits on every process."""
    parts = comm.all_gather(torch.stack([mean, m2]).double(), "vae stats")
    sizes = [torch.tensor(count, dtype=torch.float64) for count in counts]
    _, mean, m2 = combine_moments(sizes, [p[0] for p in parts], [p[1] for p in parts])
    return mean, m2


def normalize_groups(
    norm: nn.GroupNorm, count: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor, x: torch.Tensor
) -> torch.Tensor:
    """nn.GroupNorm of x (B, C, ...) with the given per-(B, G) statistics (count, mean, M2: the whole image's, of
    which x may be a band), its affine applied; half-precision outputs rounded once, from fp32."""
    batch, channels = x.shape[:2]
    groups = norm.num_groups
    rstd = torch.rsqrt(m2 / count + norm.eps).float()  # (B, G)
    per = channels // groups
    scale = rstd.repeat_interleave(per, dim=1)  # (B, C)
    if norm.weight is not None:
        scale = scale * norm.weight.float()
    shift = -mean.float().repeat_interleave(per, dim=1) * scale
    if norm.bias is not None:
        shift = shift + norm.bias.float()
    shape = (batch, channels) + (1,) * (x.ndim - 2)
    if x.dtype == torch.float32:
        return torch.addcmul(shift.view(shape), x, scale.view(shape))
    out = torch.empty_like(x)  # half precision: a chunk of channels at a time in fp32
    per_chunk = max(1, STATS_CHUNK_BYTES // (4 * x[0, 0].numel() * batch))
    for c in range(0, channels, per_chunk):
        sl = slice(c, c + per_chunk)
        view = (batch, -1) + (1,) * (x.ndim - 2)
        out[:, sl] = torch.addcmul(shift[:, sl].reshape(view), x[:, sl].float(), scale[:, sl].reshape(view))
    return out


def band_channel_stats(comm: Comm, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """latent_ops.LatentOps.channel_stats of the whole image: per-channel mean and std (unbiased, as Tensor.std), (B, C, 1, 1)
    fp32, from this band x (B, C, h, W)."""
    count, mean, m2 = whole_moments(comm, x.flatten(2), "stats")  # (B, C)
    std = (m2 / (count - 1)).sqrt()
    return mean.float()[..., None, None], std.float()[..., None, None]
