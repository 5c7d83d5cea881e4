"""What a stage holds on the device, phase by phase, in numbers alone: the planner's model of the memory simulator
(engine/simulate, docs/memory.md), with coefficients fitted to its traces (`linfusion bench planner --fit`).

A stage's peak is its weights plus the most any of its phases holds, times the CUDA allocator's factor:
- upscale: the previous image and the upscaled one;
- vae encode: both images and the VAE's windows (the statistics pass's batch of them, or the whole image);
- unet: the previous image, the latents around the sampler, and one UNet call's activations, with what adapters
  hold through it (a ControlNet's residuals and control image) or their own pass before it, whichever is more;
- vae decode: the previous image, the latents, the output image (unless it goes straight to CPU memory) and the
  windows.
No torch here: `plan` estimates without importing it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..base.plan import Plan, StagePlan

LATENT_PX = 8  # image px per latent row and column
LATENT_CHANNELS = 4
FP32 = 4
RGB = 3
# engine/simulate/cuda.py's: a traced live-tensor peak -> what the card needs (reserved segments, fragmentation,
# library workspaces), fitted to this project's H200 measurements (docs/memory.md).
ALLOCATOR_FACTOR = 1.07
# fp32 latent-sized tensors alive around a UNet call: the latents, the noise, the encoded image, the sampler's
# own (fitted: the simulator's "held" at a UNet call's start, less the images).
# The fitted terms miss a few % here and there (a ControlNet's residual sums at mid sizes, 3:2 shapes): the phases'
# estimate is raised this much, so that it stays above the simulation over docs/benchmarks.md's grid.
PHASE_MARGIN = 1.04
LATENT_COPIES = 5
VAE_LATENT_COPIES = 3  # latent-sized tensors around a VAE pass: the latents, scaled (fp32), cast to its dtype


@dataclass(frozen=True)
class PassCost:
    """One pass of a UNet (or a ControlNet: its encoder half), in bytes per top-level latent token and batch
    element, per byte of the dtype (fp16 holds twice these). Its peak is either outside the feed-forward layers
    (`other`, what a chunked feed-forward leaves at large sizes) or inside one: the tensors around it (`ff_rest`)
    and its own temporaries (`ff_inner`), which chunking bounds to a chunk's worth. `ff_scale`: top-level tokens
    per token at the first level with feed-forward layers (4 for SDXL, whose top level has none)."""

    other: float
    ff_rest: float
    ff_inner: float
    ff_scale: int = 1

    def activations(self, tokens: int, batch: int, ff_chunk: int | None, itemsize: int) -> float:
        """One pass of `batch` samples with `tokens` top-level latent tokens each."""
        inner = tokens if not ff_chunk else min(tokens, ff_chunk * self.ff_scale)
        per_sample = max(tokens * self.other, tokens * self.ff_rest + inner * self.ff_inner)
        return batch * per_sample * itemsize


@dataclass(frozen=True)
class BandedCost:
    """A UNet pass in row bands (engine/banded, frugal chunking) where its levels take several bands: what stays
    whole (the blocks' inputs and outputs, the skips unless parked), in bytes per top-level token and batch element
    per dtype byte, plus what the bands' temporaries hold whatever the size (bytes: a band is at most
    memory_plan.BAND_BYTES). `parked_*`: the same with skips parked in CPU memory, which then holds `host` per
    token and dtype byte. Where few levels band, a pass holds less than this line (memory_plan takes the smaller of
    it and the pass run whole)."""

    whole: float
    bands: float
    parked_whole: float
    parked_bands: float
    host: float

    def activations(self, tokens: int, batch: int, itemsize: int, park: bool) -> float:
        per_token, fixed = (self.parked_whole, self.parked_bands) if park else (self.whole, self.bands)
        return batch * tokens * per_token * itemsize + fixed

    def host_bytes(self, tokens: int, batch: int, itemsize: int) -> float:
        """CPU memory the parked skips of one pass take."""
        return batch * tokens * self.host * itemsize


@dataclass(frozen=True)
class ArchCost:
    """A UNet architecture's passes, fitted to the simulator: its own and a ControlNet's, and what a UNet call
    holds more with an adapter's inputs (bytes per top-level token and batch element per dtype byte, by the key an
    AdapterKind declares as `memory_key`): a ControlNet's residuals added to its skips ("residuals"), an
    IP-Adapter's image attention ("ip_adapter")."""

    unet: PassCost
    controlnet: PassCost
    extras: Mapping[str, float] = field(default_factory=dict)
    banded: BandedCost | None = None  # None: not fitted (the banded rungs are then planned as the pass run whole)

    def extra(self, key: str, cap: int, tokens: int, batch: int, itemsize: int) -> float:
        """What an adapter's inputs add to a UNet call (AdapterKind.memory_key); `cap`: query tokens per layer call
        beyond which it stops growing (0: it does not stop), at the first level with attention."""
        capped = min(tokens, cap * self.unet.ff_scale) if cap else tokens
        return batch * capped * self.extras.get(key, 0.0) * itemsize


# By archs.py's names (Family.arch). Fitted by `linfusion bench planner --fit` (tests/test_planner_model.py checks
# the tiny ones against a fresh fit).
ARCH_COSTS: dict[str, ArchCost] = {
    "sd15": ArchCost(
        PassCost(4484, 3951, 4377),
        PassCost(3660, 3947, 3733),
        {"residuals": 660.0, "ip_adapter": 316.0},
        banded=BandedCost(1337, 446165504, 664, 468559872, 1300.0),
    ),
    "sd21": ArchCost(
        PassCost(4484, 3951, 4378),
        PassCost(3660, 3947, 3733),
        {"residuals": 660.0, "ip_adapter": 316.0},
        banded=BandedCost(1337, 446204928, 664, 468599296, 1300.0),
    ),
    "sdxl": ArchCost(
        PassCost(4484, 4297, 749, 4),
        PassCost(3840, 3493, 1387, 4),
        {"residuals": 600.0},
        banded=BandedCost(1044, 302316032, 724, 428145152, 1240.0),
    ),
    "tiny": ArchCost(
        PassCost(420, 335, 470),
        PassCost(2080, 2080, 0),
        {"residuals": 32.0, "ip_adapter": 28.0},
        banded=BandedCost(67, 513818112, 67, 513818112, 48.0),
    ),
    "tiny-sd2": ArchCost(
        PassCost(420, 335, 470),
        PassCost(2080, 2080, 0),
        {"residuals": 32.0, "ip_adapter": 28.0},
        banded=BandedCost(67, 513820672, 67, 513820672, 48.0),
    ),
    "tiny-sdxl": ArchCost(
        PassCost(420, 412, 32, 4),
        PassCost(2080, 2080, 0, 4),
        {"residuals": 32.0},
        banded=BandedCost(49, 485243904, 35, 514604032, 48.0),
    ),
}
REFERENCE_ARCH = "sd15"  # an architecture outside the table scales SD-1.5's by its top-level width
REFERENCE_WIDTH = 320


def arch_cost(arch: str | None, top_width: int) -> ArchCost:
    if arch in ARCH_COSTS:
        return ARCH_COSTS[arch]
    ref, scale = ARCH_COSTS[REFERENCE_ARCH], top_width / REFERENCE_WIDTH

    def scaled(p: PassCost) -> PassCost:
        return PassCost(p.other * scale, p.ff_rest * scale, p.ff_inner * scale, p.ff_scale)

    return ArchCost(scaled(ref.unet), scaled(ref.controlnet))


# The tiled VAE's activations by its block widths (fitted like ARCH_COSTS): bytes per window pixel and dtype byte
# decoding, and what its statistics pass holds more per pixel in half precision (fp32 copies of GroupNorm inputs);
# then the same encoding. Another VAE takes memory_plan.vae_bytes_per_pixel's conservative rule.
VAE_COSTS: dict[tuple[int, ...], tuple[float, float, float, float]] = {
    (128, 256, 512, 512): (768.1, 204.7, 643.0, 102.4),
    (16, 16, 32, 32): (80.1, 12.7, 67.0, 12.8),
}


def vae_pixel_costs(vae_config: Mapping[str, Any], fallback: float) -> tuple[float, float, float, float]:
    """VAE_COSTS' entry for a VAE (`fallback` bytes per pixel and dtype byte where it has none)."""
    return VAE_COSTS.get(tuple(vae_config.get("block_out_channels", ())), (fallback, 0.0, fallback, 0.0))


@dataclass(frozen=True)
class StageShape:
    """What a stage's memory depends on besides its settings, in px."""

    width: int
    height: int
    rows: int | None = None  # this process's band of a split image (None: all of it)
    previous: tuple[int, int] | None = None  # the image the stage starts from, on the device (None: a base stage)
    last: bool = False  # decoded straight into CPU memory

    @property
    def tokens(self) -> int:
        """Top-level latent tokens of this process's part."""
        return (self.width // LATENT_PX) * ((self.rows or self.height) // LATENT_PX)

    @property
    def whole_tokens(self) -> int:
        return (self.width // LATENT_PX) * (self.height // LATENT_PX)


def stage_shape(
    plan: Plan, stage: StagePlan, rows: int | None = None, input_size: tuple[int, int] | None = None
) -> StageShape:
    """A planned stage's shape: the image it starts from is the previous stage's (or, upscaling, the input's)."""
    before = [s for s in plan.stages if s.index < stage.index]
    previous = (before[-1].width, before[-1].height) if before else (input_size if plan.from_image else None)
    return StageShape(stage.width, stage.height, rows, previous, stage is plan.stages[-1])


@dataclass(frozen=True)
class VaeWindows:
    """The VAE's activations at once, decoding and encoding a stage (bytes)."""

    decode: float
    encode: float


SAMPLE_MIN_PIXELS = 2**23  # the VAE's statistics pass covers at least ~8 Mpx of the image (all of a smaller one)
SAMPLE_FRACTION = 1 / 8  # ... and at least this share of a huge image
MAX_WINDOWS_PER_BATCH = 64


def stats_sample(windows: int, core_px: float, fit: int) -> tuple[int, int]:
    """The tiled VAE's statistics pass over `windows` tiles whose cores cover `core_px` pixels, `fit` windows
    fitting its memory at once: (how many windows it samples, how many it runs at most at once). The sample
    covers at least SAMPLE_MIN_PIXELS, or SAMPLE_FRACTION of a huge image (vae.TiledVAE._sample)."""
    want = max(SAMPLE_MIN_PIXELS, core_px * SAMPLE_FRACTION)
    take = min(windows, max(1, math.ceil(want / (core_px / windows))))
    return take, max(1, min(MAX_WINDOWS_PER_BATCH, fit))


def stats_batch(windows: int, core_px: float, fit: int) -> int:
    """How many windows the statistics pass runs at once: its largest batch (the sample in interleaved batches
    of near-equal size)."""
    take, per_batch = stats_sample(windows, core_px, fit)
    return math.ceil(take / math.ceil(take / per_batch))
