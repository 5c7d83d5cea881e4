"""Memory planning in numbers alone: the memory settings a stage can run with, what a UNet step and a VAE tile
will need, and which settings fit a budget.

No torch here (nor below): `plan`, `--dry-run` and every check made before a model loads use these without
importing it, which takes seconds. What needs torch (free memory on a GPU, switching chunking on a loaded UNet)
is in memory.py, which hands these functions its measurements as plain numbers.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from .refine import DEFAULT_REFINE, REFINE_METHODS

GIB = 1024**3
PRECISION_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4}  # bytes per element, by --dtype's spelling

VAE_BUDGET_CAP = int(2.5 * GIB)  # a 16K decode should stay within a few GiB, whatever is free
VAE_SAFETY = 1.25  # allocator slack over the activation estimate
CPU_BUDGET_SHARE = 0.4  # of available RAM, for VAE tiles on the CPU
GPU_BUDGET_SHARE = 0.5  # of free VRAM, for VAE tiles on a GPU (at most VAE_BUDGET_CAP)
MIN_TILE = 256
TILE_STEP = 64
VAE_HALO = 64  # image px every VAE tile reads beyond its core on each side (vae.py)


def proc_bytes(path: str, key: str) -> int | None:
    """A "Key:   N kB" line of a Linux /proc file, in bytes; None where there is no such file or line."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def cpu_available_bytes() -> int | None:
    """Memory a CPU run can use: MemAvailable on Linux, else the free physical pages where the OS reports them;
    None where neither can be read."""
    available = proc_bytes("/proc/meminfo", "MemAvailable")
    if available is not None:
        return available
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return None


# --- the VAE -----------------------------------------------------------------------------------------------


def vae_bytes_per_pixel(vae_config: Mapping[str, Any], itemsize: int) -> float:
    """Peak activation bytes per output pixel of one VAE window, its elements `itemsize` bytes each.

    The peak is in the last up block: the upsampled input (second-to-last width, full resolution) with its
    normalised copy, plus about three tensors of the last width.
    """
    widths = list(vae_config.get("block_out_channels", [128, 256, 512, 512]))
    wide = widths[1] if len(widths) > 1 else widths[0]
    return (2 * wide + 3 * widths[0]) * itemsize * VAE_SAFETY


def vae_share(device_type: str, free: int | None) -> int:
    """Bytes the VAE may use when no budget is given: a share of free RAM on the CPU, min(cap, half the free
    VRAM) on a GPU, the cap where free memory is not known."""
    if free is None:  # unknown: the cap, which a 16K decode is sized for
        return VAE_BUDGET_CAP
    if device_type == "cpu":
        return int(free * CPU_BUDGET_SHARE)
    return min(VAE_BUDGET_CAP, int(free * GPU_BUDGET_SHARE))


def vae_tile_for(
    vae_config: Mapping[str, Any], itemsize: int, height: int, width: int, limit: int, halo: int = VAE_HALO
) -> int | None:
    """Tile core side (px) whose window fits `limit` bytes, or None when the whole image fits untiled."""
    per_px = vae_bytes_per_pixel(vae_config, itemsize)
    if height * width * per_px <= limit:
        return None
    side = int((limit / per_px) ** 0.5) - 2 * halo
    return max(MIN_TILE, side // TILE_STEP * TILE_STEP)


def tile_used(tile: int | None, height: int, width: int) -> int | None:
    """The VAE tile a stage of this size runs with, from the tile asked for (--vae-tile, else `vae_tile_for`):
    None (untiled) where there is none or the image fits in one tile. The plan and the run both ask this."""
    return None if tile is None or (height <= tile and width <= tile) else tile


def vae_windows_for(vae_config: Mapping[str, Any], itemsize: int, window_px: int, limit: int) -> int:
    """How many VAE windows of `window_px` pixels fit `limit` bytes at once."""
    return int(limit // max(1.0, window_px * vae_bytes_per_pixel(vae_config, itemsize)))


# --- memory settings per stage ----------------------------------------------------------------------------

FF_CHUNK_TOKENS = 16384  # feed-forward rows per chunk when chunking (remainders handled)
ATTN_CHUNK_TOKENS = 65536  # LinFusion query/key rows per chunk when chunking
FRUGAL_VAE_BUDGET = 1 * GIB
# Activation bytes per top-level latent token and batch element, fp16, SD-1.5 widths (320 channels at the
# top level), from the H200 runs of docs/reference.md section 5: 4096^2 batch 2 unchunked peaked at 9.9 GiB,
# 8192^2 and 16384x8192 with the feed-forward chunked at ~10 KB per token and element.
BYTES_PER_TOKEN_UNCHUNKED = 15_600
BYTES_PER_TOKEN_FF_CHUNKED = 10_000
ATTN_CHUNK_SAVING = 0.85
REFERENCE_WIDTH = 320


@dataclass(frozen=True)
class MemorySettings:
    """How one stage trades speed for memory; ordered from fastest to most frugal in `settings_ladder`."""

    name: str
    cfg_split: bool = False  # guidance as two batch-1 UNet calls
    ff_chunk: int | None = None  # feed-forward token rows per chunk
    attn_chunk: int | None = None  # LinFusion token rows per chunk
    vae_budget: int | None = None  # bytes the VAE may use (None: automatic)

    def describe(self) -> str:
        parts = ["guidance as 2 x batch 1" if self.cfg_split else "guidance as batch 2"]
        if self.ff_chunk:
            parts.append(f"feed-forward chunks of {self.ff_chunk}")
        if self.attn_chunk:
            parts.append(f"attention chunks of {self.attn_chunk}")
        if self.vae_budget:
            parts.append(f"VAE within {self.vae_budget / GIB:.1f} GiB")
        return f"{self.name} ({', '.join(parts)})"

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "cfg_split": self.cfg_split,
            "ff_chunk": self.ff_chunk,
            "attn_chunk": self.attn_chunk,
            "vae_budget_gib": None if self.vae_budget is None else round(self.vae_budget / GIB, 2),
        }


def settings_ladder(low_vram: bool = False, max_vram: float | None = None) -> list[MemorySettings]:
    """Memory settings from fastest to most frugal; --low-vram keeps only the most frugal."""
    vae_budget = None if max_vram is None else int(min(max_vram * GIB / 4, VAE_BUDGET_CAP))
    ladder = [
        MemorySettings("fast", vae_budget=vae_budget),
        MemorySettings("chunked", ff_chunk=FF_CHUNK_TOKENS, vae_budget=vae_budget),
        MemorySettings("split", cfg_split=True, ff_chunk=FF_CHUNK_TOKENS, vae_budget=vae_budget),
        MemorySettings(
            "frugal",
            cfg_split=True,
            ff_chunk=FF_CHUNK_TOKENS // 4,
            attn_chunk=ATTN_CHUNK_TOKENS,
            vae_budget=min(vae_budget or FRUGAL_VAE_BUDGET, FRUGAL_VAE_BUDGET),
        ),
    ]
    return ladder[-1:] if low_vram else ladder


def estimate_unet_peak(
    settings: MemorySettings,
    width: int,
    height: int,
    top_width: int,
    dtype_bytes: int,
    weights: int,
    guidance: bool = True,
) -> int:
    """Expected peak device bytes of one UNet step at (width, height) px under `settings`."""
    tokens = (width // 8) * (height // 8)
    per_token: float = BYTES_PER_TOKEN_FF_CHUNKED if settings.ff_chunk else BYTES_PER_TOKEN_UNCHUNKED
    if settings.attn_chunk:
        per_token *= ATTN_CHUNK_SAVING
    batch = 1 if (settings.cfg_split or not guidance) else 2
    scale = (top_width / REFERENCE_WIDTH) * (dtype_bytes / 2)
    return int(weights + tokens * per_token * batch * scale)


def budget_bytes(max_vram: float | None, free: int | None) -> int | None:
    """Bytes a run may plan with: --max-vram GB, else what is free; None where neither is known."""
    return int(max_vram * GIB) if max_vram is not None else free


@dataclass(frozen=True)
class MemoryChoice:
    """The settings picked for one stage: the fastest that fit, else the most frugal (`fits` then False)."""

    settings: MemorySettings
    level: int  # index in the ladder, for the out-of-memory fallback
    estimate: int  # expected peak bytes
    budget: int | None  # None: free memory cannot be measured here

    @property
    def fits(self) -> bool:
        return self.budget is None or self.estimate <= self.budget


@dataclass(frozen=True)
class MemoryPlanner:
    """Picks each stage's memory settings for one job; the engine and `plan` both ask it, so they agree."""

    ladder: list[MemorySettings]
    budget: int | None  # None: unknown, and the fastest settings are taken (the out-of-memory retry steps down)
    top_width: int  # channels at the UNet's top level
    dtype_bytes: int
    weights: int  # bytes of the model's weights on the device
    guidance: bool
    extra_per_token: int = 0  # bytes per latent token a refine method keeps besides the UNet's activations
    # ControlNets: channels per top-level latent token and batch element that the UNet call holds besides its
    # own activations (their residuals and control images); their own activations come and go before the
    # UNet's and are smaller (the encoder half), so they do not raise the peak.
    control_channels: float = 0.0

    @classmethod
    def for_job(
        cls,
        *,
        low_vram: bool,
        max_vram: float | None,
        guidance: float,
        budget: int | None,
        top_width: int,
        dtype_bytes: int,
        weights: int,
        refine: str = DEFAULT_REFINE,
        control_channels: float = 0.0,
    ) -> MemoryPlanner:
        """`budget`: the bytes the run may use (`budget_bytes`: --max-vram, else what is free)."""
        return cls(
            settings_ladder(low_vram, max_vram),
            budget,
            top_width,
            dtype_bytes,
            weights,
            guidance > 1.0,
            REFINE_METHODS.get(refine).extra_bytes_per_token,
            control_channels,
        )

    def measured(self, weights: int, top_width: int, control_channels: float, budget: int | None) -> MemoryPlanner:
        """This planner with what a loaded engine measured in place of the estimates made before loading."""
        return replace(self, weights=weights, top_width=top_width, control_channels=control_channels, budget=budget)

    def estimate(self, settings: MemorySettings, width: int, height: int) -> int:
        unet = estimate_unet_peak(
            settings, width, height, self.top_width, self.dtype_bytes, self.weights, guidance=self.guidance
        )
        batch = 1 if (settings.cfg_split or not self.guidance) else 2
        per_token = self.extra_per_token + self.control_channels * self.dtype_bytes * batch
        return int(unet + (width // 8) * (height // 8) * per_token)

    def choose(self, width: int, height: int) -> MemoryChoice:
        """The fastest settings whose estimate fits the budget, else the most frugal."""
        for level, settings in enumerate(self.ladder):
            need = self.estimate(settings, width, height)
            if self.budget is None or need <= self.budget:
                return MemoryChoice(settings, level, need, self.budget)
        last = len(self.ladder) - 1
        return MemoryChoice(self.ladder[last], last, self.estimate(self.ladder[last], width, height), self.budget)

    def largest_fitting_pixels(self, settings: MemorySettings) -> int:
        """The most output pixels whose estimate under `settings` fits the budget (0: not even the weights)."""
        if self.budget is None:
            return 0
        probe = 1024 * 1024
        per_px = (self.estimate(settings, 1024, 1024) - self.estimate(settings, 0, 0)) / probe
        return max(0, int((self.budget - self.estimate(settings, 0, 0)) / per_px)) if per_px > 0 else 0
