"""Samplers by name: the diffusers scheduler each name builds, and AUTOMATIC1111's spelling of it. Data, not an
if-chain; no torch at import (the names are checked before any model loads)."""

from __future__ import annotations

from typing import Any

# Sampler name -> (diffusers scheduler class, config overrides): what --scheduler and job files accept.
SCHEDULER_TABLE: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "dpm++2m": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False},
    ),
    "dpm++2m-karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "unipc": ("UniPCMultistepScheduler", {}),
}
SCHEDULERS = tuple(SCHEDULER_TABLE)
# Our sampler -> AUTOMATIC1111's name: written into image metadata, and accepted as input (any case).
A1111_SAMPLERS = {
    "ddim": "DDIM",
    "euler": "Euler",
    "euler-a": "Euler a",
    "dpm++2m": "DPM++ 2M",
    "dpm++2m-karras": "DPM++ 2M Karras",
    "unipc": "UniPC",
}


def scheduler_name(value: str) -> str:
    """Our name for a sampler as a person types it: ours or AUTOMATIC1111's, any case and spacing."""
    wanted = " ".join(value.lower().split())
    by_a1111 = {a1111.lower(): ours for ours, a1111 in A1111_SAMPLERS.items()}
    return by_a1111.get(wanted, wanted)


def make_scheduler(name: str, base_config: dict[str, Any]) -> Any:
    """A fresh scheduler (they hold per-run state) from the model's scheduler config."""
    import diffusers  # lazy: keeps diffusers (and torch) out of CLI start-up

    class_name, overrides = SCHEDULER_TABLE[name]
    config = {k: v for k, v in base_config.items() if not k.startswith("_")}
    return getattr(diffusers, class_name).from_config(config, **overrides)
