"""What an image records about itself: the settings key that names it, and the AUTOMATIC1111
`parameters` text."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..io.names import KEY_LENGTH
from .config import A1111_SAMPLERS

# Settings that do not decide an image's pixels (the size is hashed as the resolved width x height, the seed
# apart). Every other setting does, including ones added later: a new setting can only split names, never
# merge two different images under one.
NOT_IMAGE_SETTINGS = frozenset(
    ("seed", "name", "format", "preset", "size", "aspect", "width", "height", "vae_tile", "low_vram", "max_vram")
)


DEMOFUSION_SETTINGS = frozenset(("cosine_scale_1", "cosine_scale_2", "cosine_scale_3", "gaussian_sigma"))


def settings_key(settings: Mapping[str, Any], width: int, height: int, seed: int | None) -> str:
    """A short hash of what decides the image: its settings, size and seed (None: a seed drawn at random, so
    that a rerun recognises the job whatever seed the last run drew). Names, resume and replay all use it."""
    chosen = {k: v for k, v in settings.items() if k not in NOT_IMAGE_SETTINGS and v is not None}
    if chosen.get("refine", "sdedit") != "demofusion":  # its parameters change nothing under another method
        chosen = {k: v for k, v in chosen.items() if k not in DEMOFUSION_SETTINGS}
    text = json.dumps({**chosen, "size": [width, height], "seed": seed}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:KEY_LENGTH]


def a1111_parameters(meta: dict[str, Any]) -> str:
    """The AUTOMATIC1111 `parameters` text: prompt line, `Negative prompt:` line, then key: value pairs."""
    s = meta["settings"]
    stages = ", ".join(
        st["size"] + ("" if st["strength"] is None else f"@{st['strength']:g}") for st in meta.get("stages", [])
    )
    fields = [
        ("Steps", s["steps"]),
        ("Sampler", A1111_SAMPLERS.get(s["scheduler"], s["scheduler"])),
        ("CFG scale", f"{s['guidance']:g}"),
        ("Seed", meta["seed"]),
        ("Size", f"{meta['width']}x{meta['height']}"),
        *([("Model hash", meta["model_hash"])] if meta.get("model_hash") else []),
        ("Model", meta["model"]),
        *_denoising_strength(meta.get("stages", [])),
        ("LinFusion", meta["linfusion"]),
        ("Stages", f'"{stages}"'),
        *_refine_fields(s),
        *_lora_fields(meta),
        *_ip_adapter_fields(meta.get("adapters", [])),
        *_controlnet_fields(meta),
        ("Version", f"linfusion {meta['versions']['linfusion']}"),
    ]
    loras = [a for a in meta.get("adapters", []) if a.get("kind") == "lora"]
    # A1111 keeps a LoRA as a <lora:name:weight> tag in the prompt; its readers find the LoRA there.
    lines = [" ".join([s["prompt"], *(f"<lora:{a['name']}:{a['scale']:g}>" for a in loras)])]
    if s.get("negative"):
        lines.append(f"Negative prompt: {s['negative']}")
    lines.append(", ".join(f"{k}: {v}" for k, v in fields))
    return "\n".join(lines)


def _denoising_strength(stages: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """A1111's img2img field: the first (strongest) refine stage's strength, if any stage refines."""
    strengths = [st["strength"] for st in stages if st.get("strength") is not None]
    return [("Denoising strength", f"{strengths[0]:g}")] if strengths else []


def _controlnet_fields(meta: dict[str, Any]) -> list[tuple[str, str]]:
    """A1111's ControlNet extension fields, one per unit: `ControlNet 0: "Module: none, Model: ..., Weight: ...,
    Guidance Start: ..., Guidance End: ..."` (no preprocessor module: control images are given ready-made)."""
    units = [a for a in meta.get("adapters", []) if a.get("kind") == "controlnet"]
    return [
        (
            f"ControlNet {i}",
            f'"Module: none, Model: {a["model"]}, Weight: {a["scale"]:g}, '
            f'Guidance Start: {a.get("guidance_start", 0.0):g}, Guidance End: {a.get("guidance_end", 1.0):g}"',
        )
        for i, a in enumerate(units)
    ]


def _lora_fields(meta: dict[str, Any]) -> list[tuple[str, str]]:
    """A1111's `Lora hashes: "name: hash, ..."` for the LoRAs read from files."""
    hashed = [
        f"{a['name']}: {a['hash']}" for a in meta.get("adapters", []) if a.get("kind") == "lora" and a.get("hash")
    ]
    return [("Lora hashes", f'"{", ".join(hashed)}"')] if hashed else []


def _refine_fields(settings: dict[str, Any]) -> list[tuple[str, str]]:
    """The refine method, named with its parameters where it has any (absent in sidecars before it existed)."""
    method = settings.get("refine", "sdedit")
    if method != "demofusion":
        return [("Refine", method)]
    params = (
        f"cosine scales {settings['cosine_scale_1']:g}/{settings['cosine_scale_2']:g}/{settings['cosine_scale_3']:g}"
        f", sigma {settings['gaussian_sigma']:g}"
    )
    return [("Refine", f'"demofusion ({params})"')]


def _ip_adapter_fields(adapters: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """`IP-Adapter: "ip-adapter_sd15, Weight: 0.6"` for the IP-Adapter that ran (named by its weight file)."""
    return [
        ("IP-Adapter", f'"{Path(str(a.get("weights") or a["source"])).stem}, Weight: {a["scale"]:g}"')
        for a in adapters
        if a.get("kind") == "ip_adapters"
    ]
