"""Device memory: what is free, what a stage or a VAE tile will need, and what each stage actually peaked at."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from ..base.errors import UsageError
from ..base.precision import AUTO, PRECISIONS
from ..base.text import plural
from ..linfusion.attention import LinFusionAttention
from .meter import GIB, proc_bytes
from .refine import DEFAULT_REFINE, REFINE_METHODS

VAE_BUDGET_CAP = int(2.5 * GIB)  # a 16K decode should stay within a few GiB, whatever is free
VAE_SAFETY = 1.25  # allocator slack over the activation estimate
CPU_BUDGET_SHARE = 0.4  # of available RAM, for VAE tiles on the CPU
MIN_TILE = 256
TILE_STEP = 64


def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def resolve_device(name: str = "auto", local_rank: int | None = None) -> torch.device:
    """auto: cuda (cuda:LOCAL_RANK under torchrun: each process its own GPU; `local_rank` if given, else the
    LOCAL_RANK variable), then mps, then cpu. A device this machine does not have is a usage error, raised
    before anything loads."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torchrun_local_rank() if local_rank is None else local_rank)
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise UsageError(f"--device {name!r}: {exc}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(
                f"--device {name}: CUDA is not available here (no NVIDIA GPU, driver or CUDA build of torch "
                f"{torch.__version__}); use --device cpu or auto"
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            where = "only cuda:0" if count == 1 else f"cuda:0 to cuda:{count - 1}"
            raise UsageError(f"--device {name}: this machine has {plural(count, 'CUDA device')}, {where}")
    elif device.type == "mps" and not _mps_available():
        raise UsageError(f"--device {name}: Apple's MPS is not available here; use --device cpu or auto")
    return device


def device_warnings(device: torch.device, dtype: torch.dtype) -> list[str]:
    """Settings that work but that a user would not want without knowing."""
    if device.type == "cpu" and dtype == torch.float16:
        return ["--dtype fp16 on the CPU is many times slower than fp32 there (the CPU default); use --dtype fp32"]
    return []


def torchrun_local_rank(env: Mapping[str, str] | None = None) -> int:
    """This process's GPU on its node under torchrun (LOCAL_RANK), else 0."""
    text = (os.environ if env is None else env).get("LOCAL_RANK", "0")
    if not text.strip().isdigit():
        raise UsageError(f"LOCAL_RANK={text[:20]!r} is not a whole number")
    return int(text)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: fp16 on cuda/mps, fp32 on cpu."""
    if name == AUTO:
        return torch.float16 if device.type in ("cuda", "mps") else torch.float32
    return torch_dtype(name)


def torch_dtype(flag: str) -> torch.dtype:
    """torch's dtype for a precision as --dtype spells it (fp16, bf16, fp32)."""
    dtype: torch.dtype = getattr(torch, PRECISIONS[flag])
    return dtype


def available_bytes(device: torch.device) -> int | None:
    """Free memory on the device, measured; None where it cannot be (then the caller says it does not know).

    cuda: the driver's free memory; mps: Metal's recommended working set less what the driver holds; cpu:
    MemAvailable on Linux, else the free physical pages where the OS reports them.
    """
    if device.type == "cuda":
        if not torch.cuda.is_available():  # a plan for a GPU this machine does not have
            return None
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type == "mps":
        try:
            return max(0, int(torch.mps.recommended_max_memory()) - int(torch.mps.driver_allocated_memory()))
        except (AttributeError, RuntimeError):
            return None
    available = proc_bytes("/proc/meminfo", "MemAvailable")
    if available is not None:
        return available
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return None


def vae_bytes_per_pixel(vae_config: Mapping[str, Any], dtype: torch.dtype) -> float:
    """Peak activation bytes per output pixel of one VAE window.

    The peak is in the last up block: the upsampled input (second-to-last width, full resolution) with its
    normalised copy, plus about three tensors of the last width.
    """
    widths = list(vae_config.get("block_out_channels", [128, 256, 512, 512]))
    wide = widths[1] if len(widths) > 1 else widths[0]
    itemsize = torch.finfo(dtype).bits // 8
    return (2 * wide + 3 * widths[0]) * itemsize * VAE_SAFETY


def vae_budget(device: torch.device, budget: int | None) -> int:
    """Bytes the VAE may use: given, else a share of free RAM (CPU) or min(cap, half the free VRAM)."""
    if budget is not None:
        return budget
    free = available_bytes(device)
    if free is None:  # unknown: the cap, which a 16K decode is sized for
        return VAE_BUDGET_CAP
    if device.type == "cpu":
        return int(free * CPU_BUDGET_SHARE)
    return min(VAE_BUDGET_CAP, int(free * 0.5))


def auto_vae_tile(
    vae_config: Mapping[str, Any],
    dtype: torch.dtype,
    device: torch.device,
    height: int,
    width: int,
    budget: int | None,
    halo: int = 64,
) -> int | None:
    """Tile core side (px) that fits the budget, or None when the whole image fits untiled."""
    per_px = vae_bytes_per_pixel(vae_config, dtype)
    limit = vae_budget(device, budget)
    if height * width * per_px <= limit:
        return None
    side = int((limit / per_px) ** 0.5) - 2 * halo
    return max(MIN_TILE, side // TILE_STEP * TILE_STEP)


def tile_used(tile: int | None, height: int, width: int) -> int | None:
    """The VAE tile a stage of this size runs with, from the tile asked for (--vae-tile, else `auto_vae_tile`):
    None (untiled) where there is none or the image fits in one tile. The plan and the run both ask this."""
    return None if tile is None or (height <= tile and width <= tile) else tile


def vae_windows_per_batch(
    vae_config: Mapping[str, Any], dtype: torch.dtype, device: torch.device, window_px: int, budget: int | None
) -> int:
    return int(vae_budget(device, budget) // max(1.0, window_px * vae_bytes_per_pixel(vae_config, dtype)))


# --- memory settings per stage ----------------------------------------------------------------------------

FF_CHUNK_TOKENS = 16384  # feed-forward rows per chunk when chunking (remainders handled)
ATTN_CHUNK_TOKENS = 65536  # LinFusion query/key rows per chunk when chunking
FRUGAL_VAE_BUDGET = 1 * GIB
# Activation bytes per top-level latent token and batch element, fp16, SD-1.5 widths (320 channels at the
# top level), from this project's H200 runs (REFERENCE.md section 5): 4096^2 batch 2 unchunked peaked at
# 9.9 GiB, 8192^2 and 16384x8192 with the feed-forward chunked at ~10 KB per token and element.
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
        device: torch.device,
        top_width: int,
        dtype: torch.dtype,
        weights: int,
        refine: str = DEFAULT_REFINE,
        control_channels: float = 0.0,
    ) -> MemoryPlanner:
        return cls(
            settings_ladder(low_vram, max_vram),
            device_budget(device, max_vram),
            top_width,
            dtype_bytes(dtype),
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


def apply_settings(unet: nn.Module, settings: MemorySettings, *more: nn.Module) -> None:
    """Switch feed-forward and LinFusion chunking on the UNet (and `more` models that run beside it, such as
    ControlNets) to `settings` (undoable: None restores)."""
    for module in (m for model in (unet, *more) for m in model.modules()):
        if isinstance(module, LinFusionAttention):
            module.token_chunk = settings.attn_chunk
        elif type(module).__name__ == "FeedForward":
            set_ff_chunk(module, settings.ff_chunk)


def set_ff_chunk(ff: nn.Module, chunk: int | None) -> None:
    """Run a feed-forward module over token chunks of `chunk` rows (any remainder included)."""
    if "forward" in ff.__dict__:
        del ff.forward  # back to the class's forward
    if chunk is None:
        return
    plain = type(ff).forward

    def forward(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        tokens = hidden_states.shape[1]
        if tokens <= chunk:
            return plain(ff, hidden_states, *args, **kwargs)
        pieces = [plain(ff, part, *args, **kwargs) for part in hidden_states.split(chunk, dim=1)[:1]]
        out = hidden_states.new_empty(hidden_states.shape[:2] + pieces[0].shape[2:])
        out[:, :chunk] = pieces[0]
        del pieces
        for start in range(chunk, tokens, chunk):
            out[:, start : start + chunk] = plain(ff, hidden_states[:, start : start + chunk], *args, **kwargs)
        return out

    ff.forward = forward  # type: ignore[method-assign]


def device_budget(device: torch.device, max_vram: float | None) -> int | None:
    """Bytes a run may plan with: --max-vram, else what is free plus what this process already holds; None
    where free memory cannot be measured."""
    if max_vram is not None:
        return int(max_vram * GIB)
    free = available_bytes(device)
    if free is None:
        return None
    held = torch.cuda.memory_reserved(device) if device.type == "cuda" else 0
    return free + held


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8


def module_bytes(*modules: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters())


INJECT_OOM_ENV = "LINFUSION_INJECT_OOM"
"""Test hook: comma-separated stage indices (0-based) whose first attempt fails with an out-of-memory error;
a trailing '!' makes every attempt of that stage fail."""


def maybe_inject_oom(stage_index: int, first_attempt: bool) -> None:
    wanted = {s.strip() for s in os.environ.get(INJECT_OOM_ENV, "").split(",") if s.strip()}
    always = f"{stage_index}!" in wanted
    if always or (first_attempt and (str(stage_index) in wanted or "all" in wanted)):
        raise torch.OutOfMemoryError(f"injected out-of-memory in stage {stage_index} ({INJECT_OOM_ENV})")
