"""Device memory, where torch is needed: the device a run uses and what is free on it, and the memory settings
switched on a loaded UNet. The planning arithmetic itself (settings, estimates, VAE tiles) is memory_plan.py,
which needs no torch; the functions here hand it what they measure."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from ..base.errors import UsageError
from ..base.precision import AUTO, PRECISIONS, dtype_flag
from ..base.text import plural
from ..linfusion.attention import LinFusionAttention, every_chunk
from .memory_plan import GIB, MemorySettings, cpu_available_bytes, vae_share, vae_tile_for, vae_windows_for
from .placement import Placement, missing_device

ChunkLoop = Callable[..., Any]  # engine/host.Host.each: how a loop over chunks of one shape runs


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
            raise UsageError(missing_device(name, torch.__version__))
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            where = "only cuda:0" if count == 1 else f"cuda:0 to cuda:{count - 1}"
            raise UsageError(f"--device {name}: this machine has {plural(count, 'CUDA device')}, {where}")
    elif device.type == "mps" and not _mps_available():
        raise UsageError(missing_device(name))
    return device


def device_warnings(device: torch.device, dtype: torch.dtype) -> list[str]:
    """Settings that work but that a user would not want without knowing (Placement.warnings)."""
    return Placement(str(device), dtype_flag(dtype)).warnings()


def placed(device: torch.device, dtype: torch.dtype) -> Placement:
    """A device of this machine and a precision, with the memory free there now, for the planner."""
    return Placement(str(device), dtype_flag(dtype), available_bytes(device))


def placement_for(device: str, dtype: str, *, here_only: bool) -> Placement:
    """`--device`/`--dtype` resolved by torch (placement.without_gpu could not): a device this machine has, with
    its free memory, or (unless `here_only`) one it does not have, planned for without its memory."""
    try:
        found = resolve_device(device)
        return placed(found, resolve_dtype(dtype, found))
    except UsageError:
        if here_only or device in (AUTO, "cpu"):
            raise
    try:
        elsewhere = torch.device(device)
    except RuntimeError as exc:
        raise UsageError(f"--device {device!r}: {exc}") from None
    return Placement(str(elsewhere), dtype_flag(resolve_dtype(dtype, elsewhere)), None, here=False)


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
    return cpu_available_bytes()


def vae_budget(device: torch.device, budget: int | None) -> int:
    """Bytes the VAE may use: given, else its share of what is free on the device now."""
    return budget if budget is not None else vae_share(device.type, available_bytes(device))


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
    return vae_tile_for(vae_config, dtype_bytes(dtype), height, width, vae_budget(device, budget), halo)


def vae_windows_per_batch(
    vae_config: Mapping[str, Any], dtype: torch.dtype, device: torch.device, window_px: int, budget: int | None
) -> int:
    return vae_windows_for(vae_config, dtype_bytes(dtype), window_px, vae_budget(device, budget))


def apply_settings(unet: nn.Module, settings: MemorySettings, *more: nn.Module, each: ChunkLoop | None = None) -> None:
    """Switch feed-forward and LinFusion chunking on the UNet (and `more` models that run beside it, such as
    ControlNets) to `settings` (undoable: None restores). `each` is how their chunk loops run (engine/host.Host.each;
    every chunk by default)."""
    for module in (m for model in (unet, *more) for m in model.modules()):
        if isinstance(module, LinFusionAttention):
            module.token_chunk = settings.attn_chunk
            if each is None:
                module.__dict__.pop("each", None)
            else:
                module.each = each
        elif type(module).__name__ == "FeedForward":
            set_ff_chunk(module, settings.ff_chunk, each or every_chunk)


def set_ff_chunk(ff: nn.Module, chunk: int | None, each: ChunkLoop = every_chunk) -> None:
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
        starts = range(chunk, tokens, chunk)
        for start in each(starts, [min(chunk, tokens - s) for s in starts]):
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
a trailing '!' makes every attempt of that stage fail; `@R` (`1@1`, `1!@0`) only in the process of RANK R of a
split image."""


def maybe_inject_oom(stage_index: int, first_attempt: bool) -> None:
    rank = os.environ.get("RANK", "0")
    entries = [entry.strip().partition("@") for entry in os.environ.get(INJECT_OOM_ENV, "").split(",")]
    wanted = {stage for stage, _, only in entries if stage and (not only or only == rank)}
    always = f"{stage_index}!" in wanted
    if always or (first_attempt and (str(stage_index) in wanted or "all" in wanted)):
        raise torch.OutOfMemoryError(f"injected out-of-memory in stage {stage_index} ({INJECT_OOM_ENV})")
