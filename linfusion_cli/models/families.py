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

from ..base.errors import ModelLoadError, UnknownArchitectureError, UnusableModelError
from .archs import ARCHS
from .hub import IN_MEMORY, model_source


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
    weights_gib_fp16: float = 2.1  # UNet (LinFusion's layers in) + VAE + text encoders, as the allocator holds them
    # of which the text encoders (CPU memory while the stages run with --low-vram), as `plan --simulate` holds them:
    # CLIP ViT-L 0.23, OpenCLIP ViT-H 0.63, SDXL's two 1.52
    text_gib_fp16: float = 0.23
    arch: str = "sd15"  # the archs.py shapes this family has (benchmarks, estimates)
    configs: str = "sd1"  # shipped component configs (models/configs/NAME) a single file is loaded with
    # SDXL's VAE overflows in fp16 and runs in fp32 (unless its config says force_upcast: false, as the fp16-fix
    # VAE's does); diffusers' own SD-1.x/2.x pipelines never upcast, whatever their (older) VAE configs imply.
    vae_upcast: bool = False

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
        weights_gib_fp16=2.6,
        text_gib_fp16=0.63,
        arch="sd21",
        configs="sd2",
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
        text_gib_fp16=1.52,
        arch="sdxl",
        configs="sdxl",
        vae_upcast=True,
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
        weights_gib_fp16=0.0037,
        text_gib_fp16=0.0,
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
        weights_gib_fp16=0.0038,
        text_gib_fp16=0.0,
        arch="tiny-sd2",
        configs="sd2",
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
        weights_gib_fp16=0.0053,
        text_gib_fp16=0.0,
        arch="tiny-sdxl",
        configs="sdxl",
        vae_upcast=True,
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


def vae_precision(vae_config: Mapping[str, Any], precision: str, family: Family | None) -> str:
    """The VAE's precision (as --dtype spells it) for a run in `precision`.

    Only fp16 is ever upcast, and only where the family needs it: SDXL's VAE overflows in fp16 and runs in fp32
    unless its config says `force_upcast: false` (the fp16-fix VAE). SD-1.x/2.x VAEs run in fp16, as in
    diffusers' own pipelines: their configs predate `force_upcast`, whose default (True) would double the VAE's
    memory and time. A tile that overflows anyway is redone in fp32 (engine/vae.py). An unknown family follows its
    config.
    """
    if precision != "fp16":
        return precision
    wants = family.vae_upcast if family is not None else True
    return "fp32" if wants and vae_config.get("force_upcast", True) else precision


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


def family_or_none(unet_config: Mapping[str, Any]) -> Family | None:
    """The family of a UNet config, or None for an architecture outside the table (fine when the user brings
    LinFusion weights made for it, or runs with --linfusion none)."""
    try:
        return detect_family(unet_config)
    except UnknownArchitectureError:
        return None


# Original (LDM) key names of a single-file checkpoint, as A1111/Civitai files and diffusers' converters use them.
LDM_UNET = "model.diffusion_model."
LDM_CONV_IN = LDM_UNET + "input_blocks.0.0.weight"  # (block_out_channels[0], 4, 3, 3)
LDM_SDXL_ADD_EMBED = LDM_UNET + "label_emb.0.0.weight"  # SDXL's size/crop + pooled-text embedding
LDM_CROSS_ATTN_K = ".attn2.to_k.weight"  # (inner dim, cross_attention_dim)


def single_file_family(shapes: Mapping[str, tuple[int, ...]], name: str) -> Family:
    """The family of a single-file checkpoint from its tensor names and shapes (nothing loaded): the width of
    conv_in, the text width its cross-attention reads, and whether it has SDXL's added embedding."""
    if LDM_CONV_IN not in shapes:
        raise UnknownArchitectureError(
            f"'{name}' is not a Stable Diffusion single-file checkpoint (no {LDM_CONV_IN}); give a diffusers "
            "folder, a hub id, or an A1111/Civitai-style .safetensors file"
        )
    first_width = shapes[LDM_CONV_IN][0]
    cross = next(
        (shape[1] for key, shape in shapes.items() if key.startswith(LDM_UNET) and key.endswith(LDM_CROSS_ATTN_K)),
        None,
    )
    addition = "text_time" if LDM_SDXL_ADD_EMBED in shapes else None
    for family in FAMILIES:
        if (family.cross_attention_dim, family.addition_embed_type, family.block_out_channels[0]) == (
            cross,
            addition,
            first_width,
        ):
            return family
    raise UnknownArchitectureError(
        f"'{name}': unknown single-file architecture (first UNet width {first_width}, cross-attention width "
        f"{cross}, addition embedding {addition}); known families: {known_families_text()}. Convert it to a "
        "diffusers folder and pass the folder"
    )


def family_of_width(width: int | None) -> str:
    """The family a cross-attention width belongs to, for messages: 'SDXL (cross-attention width 2048)'."""
    label = next((f.label for f in FAMILIES if f.cross_attention_dim == width), "an unknown model")
    return f"{label} (cross-attention width {width})"


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a .safetensors file, read from its header (no weights loaded)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError) as exc:
        raise ModelLoadError(f"'{path}' is not a readable safetensors file: {exc}") from exc


def peek_family(model: str) -> tuple[Family | None, str | None]:
    """The model's family from its config (or a single file's header) alone, for planning before loading.

    Returns (family, note); the family is None, with a note, when the config is not available locally.
    Raises ModelNotFoundError for a local path that does not exist.
    """
    kind = model_source(model)
    if kind == "builtin":
        return detect_family(ARCHS[model].unet), None
    if kind == "memory":
        return IN_MEMORY[model].family, None
    path = Path(model).expanduser()
    config_path: Path | None = None
    if kind == "folder":
        config_path = path / "unet" / "config.json"
    elif kind == "file":
        if path.suffix.lower() != ".safetensors":
            return None, f"'{path.name}' is a pickle checkpoint: its family is known once it is loaded"
        try:
            return single_file_family(safetensors_shapes(path), path.name), None
        except (UnknownArchitectureError, ModelLoadError) as exc:  # refused now, not once loading starts
            raise UnusableModelError(str(exc)) from None
    else:  # a hub id
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model, "unet/config.json")
        config_path = Path(cached) if isinstance(cached, str) else None
    if config_path is not None and config_path.is_file():
        try:
            return detect_family(json.loads(config_path.read_text())), None
        except (ValueError, UnknownArchitectureError):
            return None, None
    hint = PLANNING_HINTS.get(model)
    if hint is not None:
        return next(f for f in FAMILIES if f.key == hint), None
    return None, f"'{model}' is not downloaded yet; planning with SD-1.x's native 512 px until it is loaded"
