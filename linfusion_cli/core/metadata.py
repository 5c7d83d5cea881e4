"""What an image records about itself: the settings key that names it, and the AUTOMATIC1111 `parameters`
text. The refine method and each adapter kind give their own fields (`a1111_fields`); this module only puts them
in A1111's order."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from ..base.settings import key_values
from ..engine.refine import DEFAULT_REFINE, REFINE_METHODS
from ..engine.schedulers import a1111_name
from ..io.names import KEY_LENGTH
from ..models.adapters import ADAPTER_KINDS
from .settings import table


def settings_key(settings: Mapping[str, Any], width: int, height: int, seed: int | None) -> str:
    """A short hash of what decides the image: the settings that do (declared `in_key`, see
    base.settings.key_values), its size and seed (None: a seed drawn at random, so that a rerun recognises the job
    whatever seed the last run drew). Names, resume and replay all use it."""
    chosen = key_values(settings, table())
    text = json.dumps({**chosen, "size": [width, height], "seed": seed}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:KEY_LENGTH]


def a1111_parameters(meta: dict[str, Any]) -> str:
    """The AUTOMATIC1111 `parameters` text: prompt line, `Negative prompt:` line, then key: value pairs."""
    s = meta["settings"]
    stages = ", ".join(
        st["size"] + ("" if st["strength"] is None else f"@{st['strength']:g}") for st in meta.get("stages", [])
    )
    adapters = meta.get("adapters", [])
    kinds = sorted(ADAPTER_KINDS, key=lambda kind: kind.fields_rank)
    by_kind = {kind.name: [a for a in adapters if a.get("kind") == kind.described_as] for kind in kinds}
    fields = [
        ("Steps", s["steps"]),
        ("Sampler", a1111_name(s["scheduler"])),
        ("CFG scale", f"{s['guidance']:g}"),
        ("Seed", meta["seed"]),
        ("Size", f"{meta['width']}x{meta['height']}"),
        *([("Model hash", meta["model_hash"])] if meta.get("model_hash") else []),
        ("Model", meta["model"]),
        *_denoising_strength(meta.get("stages", [])),
        *([("Clip skip", s["clip_skip"])] if s.get("clip_skip", 1) > 1 else []),
        ("LinFusion", meta["linfusion"]),
        ("Stages", f'"{stages}"'),
        *_refine_fields(s),
        *([("Size conditioning", s["size_cond"])] if s.get("size_cond", "stage") != "stage" else []),
        *(field for kind in kinds for field in kind.a1111_fields(by_kind[kind.name])),
        *([("TI hashes", f'"{", ".join(s["ti_hashes"])}"')] if s.get("ti_hashes") else []),
        ("Version", f"linfusion {meta['versions']['linfusion']}"),
    ]
    tags = [tag for kind in kinds for tag in kind.prompt_tags(by_kind[kind.name])]
    lines = [" ".join([s["prompt"], *tags])]
    if s.get("negative"):
        lines.append(f"Negative prompt: {s['negative']}")
    lines.append(", ".join(f"{k}: {v}" for k, v in fields))
    return "\n".join(lines)


def _denoising_strength(stages: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """A1111's img2img field: the first (strongest) refine stage's strength, if any stage refines."""
    strengths = [st["strength"] for st in stages if st.get("strength") is not None]
    return [("Denoising strength", f"{strengths[0]:g}")] if strengths else []


def _refine_fields(settings: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The refine method's fields (sidecars from before methods existed name none: the default)."""
    name = settings.get("refine", DEFAULT_REFINE)
    if name not in REFINE_METHODS:
        return [("Refine", str(name))]
    return REFINE_METHODS.get(name).a1111_fields(settings)
