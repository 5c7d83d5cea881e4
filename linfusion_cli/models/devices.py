"""Where weights sit and in what precision: the VAE's dtype for a run, text and image encoders moved off the
device while the UNet works, and cached memory returned to the driver."""

from __future__ import annotations

import gc
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..base.precision import dtype_flag
from .families import Family, vae_precision


def free_cached(device: torch.device) -> None:
    """Return cached blocks to the driver (between jobs, after an OOM).

    Tensors held only by reference cycles stay in the allocator's cache until a full collection finds them, so
    an accelerator's cache is emptied after one. The CPU has no such cache, and a full collection costs ~0.2 s
    in a process holding torch, diffusers and transformers: there Python's own collector is left to find them.
    """
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
    elif device.type == "mps":
        gc.collect()
        torch.mps.empty_cache()


PARKED = "linfusion_parked"  # attribute of a meta-device module that a real run would have moved to CPU memory


def place_text_encoders(encoders: list[nn.Module], device: torch.device, on_device: bool) -> None:
    """Move the text encoders to the device (to encode a prompt) or off it (while the UNet runs).

    On the meta device (a memory simulation: engine/simulate) weights cannot move to CPU memory: an encoder is
    marked as parked instead, and the simulation leaves it out of the device's weights."""
    if device.type == "cpu":
        return
    if device.type == "meta":
        for encoder in encoders:
            setattr(encoder, PARKED, not on_device)
        return
    target = device if on_device else torch.device("cpu")
    for encoder in encoders:
        if next(encoder.parameters()).device != target:
            encoder.to(target)
    if not on_device:
        free_cached(device)


def vae_dtype(vae_config: Mapping[str, Any], dtype: torch.dtype, family: Family | None) -> torch.dtype:
    """The VAE's dtype for a run in `dtype` (families.vae_precision: fp16 upcast where the family needs it)."""
    upcast = dtype == torch.float16 and vae_precision(vae_config, dtype_flag(dtype), family) == "fp32"
    return torch.float32 if upcast else dtype
