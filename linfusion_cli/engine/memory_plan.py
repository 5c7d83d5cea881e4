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

from .memory_model import (
    ALLOCATOR_FACTOR,
    FP32,
    LATENT_CHANNELS,
    LATENT_COPIES,
    LATENT_PX,
    PHASE_MARGIN,
    RGB,
    VAE_LATENT_COPIES,
    ArchCost,
    StageShape,
    VaeWindows,
    arch_cost,
    stats_batch,
    vae_pixel_costs,
)
from .refine import DEFAULT_REFINE, REFINE_METHODS
from .vae_tiles import tile_windows

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
# engine/banded: a UNet level taller than one band of this many bytes (its widest input: an up block's
# concatenation) runs band by band; 64 MiB keeps a band's temporaries well under a GiB at every level of SD-1.5
# and SDXL at 16K and its bands hundreds of kilobytes wide or more, where GPU kernels still run at full speed.
BAND_BYTES = 1 << 26
RUNGS = ("fast", "chunked", "split", "frugal", "banded", "banded+host")  # settings_ladder's names, fastest first
LOWEST = "lowest"  # --memory lowest: the most frugal rung
LOW_VRAM_FIRST = "frugal"  # --low-vram: the first rung from this one down whose estimate fits


def memory_rung_names() -> tuple[str, ...]:
    """What --memory takes: a rung's name, or `lowest`."""
    return (*RUNGS, LOWEST)


@dataclass(frozen=True)
class MemorySettings:
    """How one stage trades speed for memory; ordered from fastest to most frugal in `settings_ladder`."""

    name: str
    cfg_split: bool = False  # guidance as two batch-1 UNet calls
    ff_chunk: int | None = None  # feed-forward token rows per chunk
    attn_chunk: int | None = None  # LinFusion token rows per chunk
    vae_budget: int | None = None  # bytes the VAE may use (None: automatic)
    band_bytes: int | None = None  # the UNet in row bands of at most this (engine/banded; None: whole)
    park: bool = False  # banded levels' skip tensors in CPU memory between the down and up paths

    def describe(self) -> str:
        parts = ["guidance as 2 x batch 1" if self.cfg_split else "guidance as batch 2"]
        if self.ff_chunk:
            parts.append(f"feed-forward chunks of {self.ff_chunk}")
        if self.attn_chunk:
            parts.append(f"attention chunks of {self.attn_chunk}")
        if self.band_bytes:
            parts.append(f"UNet in row bands of {self.band_bytes // 2**20} MiB")
        if self.park:
            parts.append("skips in CPU memory")
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
            "band_mib": None if self.band_bytes is None else self.band_bytes // 2**20,
            "park_skips": self.park,
        }


def settings_ladder(
    low_vram: bool = False, max_vram: float | None = None, memory: str | None = None
) -> list[MemorySettings]:
    """Memory settings from fastest to most frugal; --low-vram starts the ladder at `frugal` (the planner takes the
    first rung from there whose estimate fits); --memory NAME starts it at that rung (an out-of-memory error still
    steps down from it)."""
    vae_budget = None if max_vram is None else int(min(max_vram * GIB / 4, VAE_BUDGET_CAP))
    frugal = MemorySettings(
        "frugal",
        cfg_split=True,
        ff_chunk=FF_CHUNK_TOKENS // 4,
        attn_chunk=ATTN_CHUNK_TOKENS,
        vae_budget=min(vae_budget or FRUGAL_VAE_BUDGET, FRUGAL_VAE_BUDGET),
    )
    banded = replace(frugal, name="banded", band_bytes=BAND_BYTES)
    ladder = [
        MemorySettings("fast", vae_budget=vae_budget),
        MemorySettings("chunked", ff_chunk=FF_CHUNK_TOKENS, vae_budget=vae_budget),
        MemorySettings("split", cfg_split=True, ff_chunk=FF_CHUNK_TOKENS, vae_budget=vae_budget),
        frugal,
        banded,
        replace(banded, name="banded+host", park=True),
    ]
    names = [s.name for s in ladder]
    if memory is not None:
        return ladder[-1:] if memory == LOWEST else ladder[names.index(memory) :]
    return ladder[names.index(LOW_VRAM_FIRST) :] if low_vram else ladder


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
class VaeModel:
    """The VAE as the planner sees it: its config, the bytes of its dtype, a --vae-tile, and the free memory its
    automatic tiles are sized from."""

    config: Mapping[str, Any]
    itemsize: int
    device_type: str = "cuda"
    free: int | None = None
    tile: int | None = None

    def windows(self, settings: MemorySettings, height: int, width: int) -> VaeWindows:
        """The activations of the windows the tiled VAE runs at once on an image of this size: the statistics
        pass's batch of windows (vae.TiledVAE._sample), or the whole image untiled."""
        limit = settings.vae_budget or vae_share(self.device_type, self.free)
        asked = self.tile or vae_tile_for(self.config, self.itemsize, height, width, limit)
        decode, decode_more, encode, encode_more = vae_pixel_costs(self.config, vae_bytes_per_pixel(self.config, 1))
        tile = tile_used(asked, height, width)
        window, stats = float(height * width), 0.0  # untiled: the whole image in one plain pass
        if tile is not None:
            latent = LATENT_PX
            windows = tile_windows(height // latent, width // latent, tile // latent, VAE_HALO // latent)
            window = windows[0].height * windows[0].width * latent * latent
            fit = vae_windows_for(self.config, self.itemsize, int(window), limit)
            stats = stats_batch(len(windows), height * width, fit) * window
        item = self.itemsize
        half = item < FP32  # the statistics pass's fp32 copies
        return VaeWindows(
            max(window * decode * item, stats * (decode * item + decode_more * half)),
            max(window * encode * item, stats * (encode * item + encode_more * half)),
        )


@dataclass(frozen=True)
class MemoryPlanner:
    """Picks each stage's memory settings for one job from its estimate of every phase of the stage
    (memory_model.py); the engine and `plan` both ask it, so they agree."""

    ladder: list[MemorySettings]
    budget: int | None  # None: unknown, and the fastest settings are taken (the out-of-memory retry steps down)
    weights: int  # bytes of the model's weights on the device
    guidance: bool
    itemsize: int  # bytes of the UNet's dtype
    cost: ArchCost
    vae: VaeModel
    extra_per_token: int = 0  # bytes per latent token a refine method keeps besides the UNet's activations
    kept_per_token: int = 0  # of those, what a stage that parks keeps in CPU memory (RefineMethod)
    # What adapters hold through a UNet call, in channels per top-level latent token and batch element (a
    # ControlNet's residuals and control image), and how many ControlNets run their own pass before it.
    control_channels: float = 0.0
    controlnets: int = 0
    adapter_extras: tuple[tuple[str, int], ...] = ()  # (AdapterKind.memory_key, memory_cap) per adapter
    pinned: bool = False  # --memory NAME: its first rung whatever the budget

    @classmethod
    def for_job(
        cls,
        *,
        low_vram: bool,
        max_vram: float | None,
        guidance: float,
        budget: int | None,
        arch: str | None,
        top_width: int,
        dtype_bytes: int,
        weights: int,
        vae: VaeModel,
        refine: str = DEFAULT_REFINE,
        control_channels: float = 0.0,
        controlnets: int = 0,
        adapter_extras: tuple[tuple[str, int], ...] = (),
        memory: str | None = None,
    ) -> MemoryPlanner:
        """`budget`: the bytes the run may use (`budget_bytes`: --max-vram, else what is free); `arch`: archs.py's
        name of the UNet's architecture (None: not one of them: scaled from SD-1.5's by `top_width`)."""
        return cls(
            settings_ladder(low_vram, max_vram, memory),
            budget,
            weights,
            guidance > 1.0,
            dtype_bytes,
            arch_cost(arch, top_width),
            vae,
            REFINE_METHODS.get(refine).extra_bytes_per_token,
            REFINE_METHODS.get(refine).kept_bytes_per_token,
            control_channels,
            controlnets,
            adapter_extras,
            memory is not None,
        )

    def measured(self, weights: int, control_channels: float, budget: int | None) -> MemoryPlanner:
        """This planner with what a loaded engine measured in place of the estimates made before loading."""
        return replace(self, weights=weights, control_channels=control_channels, budget=budget)

    def phases(self, settings: MemorySettings, shape: StageShape) -> dict[str, float]:
        """Bytes each phase of the stage holds besides the weights (memory_model.py's docstring)."""
        vae_item, tokens = self.vae.itemsize, shape.tokens
        batch = self.batch(settings)
        previous = self._previous(shape)
        resident = 0.0 if settings.park else previous  # parked, the previous image waits in CPU memory (Handoff)
        image = float(RGB * shape.width * shape.height * vae_item)
        whole_latents = float(LATENT_CHANNELS * shape.whole_tokens * FP32)
        windows = self.vae.windows(settings, shape.height, shape.width)
        held = tokens * batch * self.control_channels * self.itemsize
        # while one ControlNet runs its own pass, its residuals are part of that pass, not yet held beside it
        one_set = self._residual_set(held, tokens * batch * self.itemsize)
        unet = self.cost.unet.activations(tokens, batch, settings.ff_chunk, self.itemsize)
        if settings.band_bytes and self.cost.banded is not None:  # at most what it holds whole
            unet = min(unet, self.cost.banded.activations(tokens, batch, self.itemsize, settings.park))
        unet += sum(self.cost.extra(key, cap, tokens, batch, self.itemsize) for key, cap in self.adapter_extras)
        # the ControlNets run one after another: one's own pass at a time, besides the residuals already held
        own = (
            self.cost.controlnet.activations(tokens, batch, settings.ff_chunk, self.itemsize)
            if self.controlnets
            else 0.0
        )
        kept = tokens * self.kept_per_token if settings.park else 0.0
        around = LATENT_COPIES * LATENT_CHANNELS * tokens * FP32 + tokens * self.extra_per_token - kept
        latents = VAE_LATENT_COPIES * whole_latents  # in and out of the VAE: scaled, cast, its own dtype
        out = {
            "unet": resident + around + max(held + unet, held - one_set + own),
            "vae decode": resident + latents + (0.0 if shape.last else image) + windows.decode,
        }
        if shape.previous:
            out["upscale"] = previous + image
            out["vae encode"] = previous + image + latents + windows.encode
        return out

    def host_estimate(self, settings: MemorySettings, shape: StageShape) -> int:
        """CPU memory what the stage parks takes (pinned on CUDA), besides the process's own: the skips, the
        previous stage's image and what the refine method keeps."""
        if not settings.park or self.cost.banded is None:
            return 0
        skips = self.cost.banded.host_bytes(shape.tokens, self.batch(settings), self.itemsize)
        return int(skips + self._previous(shape) + shape.tokens * self.kept_per_token)

    def _residual_set(self, held: float, per_channel: float) -> float:
        """Of `held` (the ControlNets' inputs and outputs during a UNet call), one ControlNet's residuals: what
        is left after the control images, shared over the residual sets (each one's, and their running sum when
        there are several)."""
        if not self.controlnets:
            return 0.0
        images = self.controlnets * RGB * LATENT_PX * LATENT_PX * per_channel
        return max(0.0, held - images) / (self.controlnets + (1 if self.controlnets > 1 else 0))

    def _previous(self, shape: StageShape) -> float:
        """Bytes of the previous stage's image on the device (this process's rows)."""
        return RGB * shape.previous[0] * shape.previous[1] * self.vae.itemsize if shape.previous else 0.0

    def batch(self, settings: MemorySettings) -> int:
        """Samples in one UNet call: 2 with guidance as one batch, else 1."""
        return 1 if (settings.cfg_split or not self.guidance) else 2

    def estimate(self, settings: MemorySettings, shape: StageShape) -> int:
        """Expected peak device bytes of the stage under `settings`, as the simulator would report it."""
        return int(ALLOCATOR_FACTOR * (self.weights + PHASE_MARGIN * max(self.phases(settings, shape).values())))

    def choose(self, shape: StageShape) -> MemoryChoice:
        """The fastest settings whose estimate fits the budget, else the most frugal (--memory: its rung); the
        level is an index in the ladder. On a split image `shape` is one process's share, and a banded rung bands
        that share."""
        ladder = self.ladder
        for level, settings in enumerate(ladder):
            need = self.estimate(settings, shape)
            if self.pinned or self.budget is None or need <= self.budget:
                return MemoryChoice(settings, level, need, self.budget)
        last = len(ladder) - 1
        return MemoryChoice(ladder[last], last, self.estimate(ladder[last], shape), self.budget)
