"""One image split exactly across processes by horizontal bands of its latent.

Every process runs the whole UNet on its band; the few ops that mix rows exchange what they need (see ops.py),
so a seed gives the same image as one process, to fp32 reduction-order error. Imports only torch, the standard
library, the LinFusion layer and the error classes.
"""

from __future__ import annotations

from ..bands import Bands, ConvRows, Transfer, downsampling, halo_transfers, row_transfers
from .comm import DEFAULT_TIMEOUT_S, Comm, CommStats, LaunchEnv, ParallelError, gather_bands, joined
from .install import SplitRun, split_forward, split_image
from .ops import (
    AttentionReduce,
    ConvSpec,
    band_conv2d,
    band_filter2d,
    band_group_norm,
    band_upscale,
    gather_tokens,
    halo_around,
    halo_rows,
)
from .plan import CommPlan, unet_comm_plan, unet_ops
from .stats import band_channel_stats, combine_moments, local_moments, pooled_groups, pooled_moments

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "AttentionReduce",
    "Bands",
    "Comm",
    "CommPlan",
    "CommStats",
    "ConvRows",
    "ConvSpec",
    "LaunchEnv",
    "ParallelError",
    "SplitRun",
    "Transfer",
    "band_channel_stats",
    "band_conv2d",
    "band_filter2d",
    "band_group_norm",
    "band_upscale",
    "combine_moments",
    "downsampling",
    "gather_bands",
    "gather_tokens",
    "halo_around",
    "halo_rows",
    "halo_transfers",
    "joined",
    "local_moments",
    "pooled_groups",
    "pooled_moments",
    "row_transfers",
    "split_forward",
    "split_image",
    "unet_comm_plan",
    "unet_ops",
]
