"""The model-family table: which official LinFusion weights, native size and projection width go with a UNet.

A family is recognised from the UNet's config (cross-attention width, addition embedding, block layout),
never from the model's name: a fine-tune called "my-model" is still SD-1.x underneath.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ModelNotFoundError, UnknownArchitectureError


@dataclass(frozen=True)
class Family:
    key: str
    label: str
    cross_attention_dim: int
    addition_embed_type: str | None
    block_out_channels: tuple[int, ...]
    native_size: int  # long side, px, of the base stage
    linfusion_repo: str | None  # official weights; None: built-in model, "auto" means random weights
    mid_dim_divisor: int | None  # projection_mid_dim = dim // divisor; None: = dim (the official `null`)
    attn1_layers: int
    first_attn: tuple[int, int]  # (dim, heads) of the first attn1: tells checkpoints of look-alike families apart
    prediction_type: str = "epsilon"  # the usual one; a model's scheduler config has the final word
    weights_gib_fp16: float = 2.1  # UNet + VAE + text encoders, for memory estimates before loading
    arch: str = "sd15"  # the archs.py shapes this family has (benchmarks, estimates)

    def mid_dim(self, dim: int) -> int | None:
        return None if self.mid_dim_divisor is None else dim // self.mid_dim_divisor

    def matches(self, config: Mapping[str, Any]) -> bool:
        return (
            config.get("cross_attention_dim") == self.cross_attention_dim
            and config.get("addition_embed_type") == self.addition_embed_type
            and tuple(config.get("block_out_channels", ())) == self.block_out_channels
        )


FAMILIES: tuple[Family, ...] = (
    Family(
        "sd1",
        "SD-1.x",
        768,
        None,
        (320, 640, 1280, 1280),
        native_size=512,
        linfusion_repo="Yuanshi/LinFusion-1-5",
        mid_dim_divisor=None,
        attn1_layers=16,
        first_attn=(320, 8),
    ),
    Family(
        "sd2",
        "SD-2.x",
        1024,
        None,
        (320, 640, 1280, 1280),
        native_size=768,
        linfusion_repo="Yuanshi/LinFusion-2-1",
        mid_dim_divisor=None,
        attn1_layers=16,
        first_attn=(320, 5),
        prediction_type="v_prediction",
        weights_gib_fp16=2.6,
        arch="sd21",
    ),
    Family(
        "sdxl",
        "SDXL",
        2048,
        "text_time",
        (320, 640, 1280),
        native_size=1024,
        linfusion_repo="Yuanshi/LinFusion-XL",
        mid_dim_divisor=16,
        attn1_layers=70,
        first_attn=(640, 10),
        weights_gib_fp16=6.9,
        arch="sdxl",
    ),
    Family(
        "tiny",
        "tiny SD-1.x-shaped",
        32,
        None,
        (32, 64, 64),
        native_size=128,
        linfusion_repo=None,
        mid_dim_divisor=None,
        attn1_layers=7,
        first_attn=(32, 4),
        weights_gib_fp16=0.01,
        arch="tiny",
    ),
    Family(
        "tiny-sd2",
        "tiny SD-2.x-shaped",
        48,
        None,
        (32, 64, 64),
        native_size=128,
        linfusion_repo=None,
        mid_dim_divisor=None,
        attn1_layers=7,
        first_attn=(32, 2),
        prediction_type="v_prediction",
        weights_gib_fp16=0.01,
        arch="tiny-sd2",
    ),
    Family(
        "tiny-sdxl",
        "tiny SDXL-shaped",
        64,
        "text_time",
        (32, 64, 64),
        native_size=128,
        linfusion_repo=None,
        mid_dim_divisor=16,
        attn1_layers=11,
        first_attn=(64, 4),
        weights_gib_fp16=0.01,
        arch="tiny-sdxl",
    ),
)


# Well-known hub ids, used only to plan before a model is downloaded; once loaded, the architecture decides
# (and the plan is redone if this hint was wrong).
PLANNING_HINTS: dict[str, str] = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "sd1",
    "runwayml/stable-diffusion-v1-5": "sd1",
    "CompVis/stable-diffusion-v1-4": "sd1",
    "Lykon/dreamshaper-8": "sd1",
    "stabilityai/stable-diffusion-2-1": "sd2",
    "stabilityai/stable-diffusion-2-1-base": "sd2",
    "stabilityai/stable-diffusion-xl-base-1.0": "sdxl",
}


def known_families_text() -> str:
    return ", ".join(f.label for f in FAMILIES if f.linfusion_repo)


def detect_family(unet_config: Mapping[str, Any]) -> Family:
    """The family whose signature matches the UNet config, or a clear error listing what is known."""
    for family in FAMILIES:
        if family.matches(unet_config):
            return family
    raise UnknownArchitectureError(
        "unknown UNet architecture (cross_attention_dim="
        f"{unet_config.get('cross_attention_dim')}, addition_embed_type={unet_config.get('addition_embed_type')}, "
        f"block_out_channels={list(unet_config.get('block_out_channels', ()))}); known families: "
        f"{known_families_text()}. Pass a LinFusion checkpoint made for this model with --linfusion PATH, "
        "or --linfusion none to keep ordinary attention"
    )


def guess_family_of_checkpoint(entries: list[Mapping[str, Any]]) -> str:
    """A best guess, for error messages, of which family a LinFusion checkpoint was made for."""
    if not entries:
        return "an empty checkpoint"
    first = (entries[0].get("dim_n"), entries[0].get("heads"))
    shape = f"{len(entries)} layers, first dim {first[0]}, {first[1]} heads"
    for family in FAMILIES:
        if family.attn1_layers == len(entries) and family.first_attn == first:
            return f"{family.label} ({shape})"
    return f"an unknown model ({shape})"


def is_sdxl_checkpoint(path: Path) -> bool:
    """Whether a single-file checkpoint holds SDXL's second text encoder (keys only, nothing loaded)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        return any(k.startswith("conditioner.embedders.1.") for k in f.keys())  # noqa: SIM118 (not a dict)


def peek_family(model: str) -> tuple[Family | None, str | None]:
    """The model's family from its config alone (no weights, no torch), for planning before loading.

    Returns (family, note); the family is None, with a note, when the config is not available locally.
    Raises ModelNotFoundError for a local path that does not exist.
    """
    from .archs import ARCHS, BUILTIN_MODELS
    from .hub import looks_like_hub_id

    if model in BUILTIN_MODELS:
        return detect_family(ARCHS[model].unet), None
    path = Path(model).expanduser()
    config_path: Path | None = None
    if path.is_dir():
        config_path = path / "unet" / "config.json"
    elif path.is_file():
        try:
            key = "sdxl" if path.suffix.lower() == ".safetensors" and is_sdxl_checkpoint(path) else "sd1"
        except Exception:
            key = "sd1"
        return next(f for f in FAMILIES if f.key == key), None
    elif looks_like_hub_id(model):
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model, "unet/config.json")
        config_path = Path(cached) if isinstance(cached, str) else None
    else:
        raise ModelNotFoundError(
            f"model '{model}' does not exist: give an existing diffusers folder or .safetensors file, a hub id "
            "(owner/name), or tiny / tiny-sd2 / tiny-sdxl"
        )
    if config_path is not None and config_path.is_file():
        try:
            return detect_family(json.loads(config_path.read_text())), None
        except (ValueError, UnknownArchitectureError):
            return None, None
    hint = PLANNING_HINTS.get(model)
    if hint is not None:
        return next(f for f in FAMILIES if f.key == hint), None
    return None, f"'{model}' is not downloaded yet; planning with SD-1.x's native 512 px until it is loaded"
