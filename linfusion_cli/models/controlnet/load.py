"""Loading a ControlNet: a diffusers folder or hub repo (its fp16 variant for fp16 runs), a single .safetensors
file (diffusers' or the original key names, with the config the loaded UNet implies: nothing fetched), or the
built-in `tiny` made from the loaded UNet's encoder; then its attention made linear (patch.py)."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ...base.errors import CheckpointError, ModelLoadError
from ...base.settings import AdapterRef
from ...base.text import plural
from ..families import family_or_none, safetensors_shapes
from ..hub import resolve_local_or_hub
from ..loading import quiet_libraries
from .adapter import ControlNetAdapter
from .kind import (
    CONFIG_NAME,
    FP16_VARIANT,
    FP16_WEIGHTS_NAME,
    LDM_PREFIX,
    TINY,
    TINY_SEED,
    WEIGHTS_NAME,
    check_fits,
    file_signature,
    source_kind,
)
from .patch import ControlNetPatch

if TYPE_CHECKING:
    from ..loading import Components


def load(comps: Components, ref: AdapterRef) -> ControlNetAdapter:
    """Load (or build) the ControlNet `ref` names onto the UNet's device and dtype, checked against the UNet,
    with its attn1 layers made linear from the UNet's LinFusion layers."""
    param = next(comps.unet.parameters())
    kind = source_kind(ref.source)
    with quiet_libraries():
        if kind == TINY:
            model = build_tiny(comps)
        elif kind == "file":
            model = _load_single_file(Path(ref.source).expanduser(), comps.unet, param.dtype)
        else:
            model = _load_folder(ref.source, param.dtype)
        check_fits(ref.source, model.config, comps.unet.config, comps.family_label)
        model.to(device=param.device, dtype=param.dtype).eval().requires_grad_(False)
    patch = ControlNetPatch.apply(model, comps.linfusion)
    name = Path(ref.source).expanduser().stem if kind in ("folder", "file") else ref.source.split("/")[-1]
    return ControlNetAdapter(ref, model, name, patch)


def build_meta(comps: Components, ref: AdapterRef) -> ControlNetAdapter:
    """The ControlNet `ref` names, of the shape a load would give, on the UNet's (meta) device (a simulation): its
    own config where it is local (a folder, or a hub repo in the cache), else the full ControlNet a UNet's encoder
    makes (`from_unet`: what SD-1.5's and SDXL's full ControlNets are); patched like a loaded one."""
    from diffusers import ControlNetModel

    config = _local_config(ref.source)
    patch = comps.linfusion
    own_attention = patch.original_attention() if patch is not None else contextlib.nullcontext()
    device = next(comps.unet.parameters()).device  # meta; a real device gives random weights (tests compare)
    with quiet_libraries(), device, own_attention:
        if config is not None:
            model = ControlNetModel.from_config(config)
        else:
            model = ControlNetModel.from_unet(comps.unet, load_weights_from_unet=False)
    model.to(dtype=next(comps.unet.parameters()).dtype).eval().requires_grad_(False)
    name = ref.source.split("/")[-1]
    return ControlNetAdapter(ref, model, name, ControlNetPatch.apply(model, comps.linfusion))


def _local_config(source: str) -> dict[str, Any] | None:
    """A ControlNet's config.json from its folder or the hub cache, without fetching anything."""
    import json

    path = Path(source).expanduser()
    if source_kind(source) == "hub":
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(source, CONFIG_NAME)
        path = Path(cached).parent if isinstance(cached, str) else path
    file = path / CONFIG_NAME
    if not file.is_file():
        return None
    return {k: v for k, v in json.loads(file.read_text()).items() if not k.startswith("_")}


def _load_folder(source: str, dtype: torch.dtype) -> Any:
    """A diffusers ControlNet folder or hub repo, in safetensors: for an fp16 run its `.fp16.` weights where it has
    them (half the download), else the plain ones."""
    from diffusers import ControlNetModel

    wanted = [FP16_WEIGHTS_NAME] if dtype == torch.float16 else []
    folder = resolve_local_or_hub(source, what="ControlNet", allow_patterns=[CONFIG_NAME, *wanted])
    if not (folder / FP16_WEIGHTS_NAME).is_file() or not wanted:
        folder = resolve_local_or_hub(source, what="ControlNet", allow_patterns=[CONFIG_NAME, WEIGHTS_NAME])
    if not (folder / CONFIG_NAME).is_file():
        raise ModelLoadError(f"ControlNet '{source}' has no {CONFIG_NAME} in {folder}: give a diffusers ControlNet")
    plain, half = (folder / WEIGHTS_NAME).is_file(), (folder / FP16_WEIGHTS_NAME).is_file()
    if not (plain or half):
        found = sorted(p.name for p in folder.iterdir())[:8]
        raise ModelLoadError(
            f"ControlNet '{source}' has no {WEIGHTS_NAME} in {folder} (found: {found}); only safetensors weights are "
            "read: convert .bin weights once with diffusers (from_pretrained, then save_pretrained)"
        )
    variant = FP16_VARIANT if half and (wanted or not plain) else None
    try:
        return ControlNetModel.from_pretrained(folder, torch_dtype=dtype, use_safetensors=True, variant=variant)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(
            f"could not load ControlNet '{source}' from {folder}: {exc}. It must be a diffusers ControlNetModel "
            "with safetensors weights"
        ) from exc


def _load_single_file(path: Path, unet: Any, dtype: torch.dtype) -> Any:
    """A single .safetensors ControlNet (diffusers' key names, or the original `control_model.*` ones converted
    by diffusers' own converter), with the config the loaded UNet implies: nothing fetched. Strict: a missing or
    unexpected tensor is an error, not a silently random layer."""
    from diffusers import ControlNetModel
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    family = family_or_none(unet.config)
    signature = file_signature(safetensors_shapes(path), path.name)
    check_fits(str(path), signature, unet.config, family.label if family else "of an unknown family")
    try:
        state = {k.removeprefix(LDM_PREFIX): v for k, v in load_file(str(path)).items()}
    except (SafetensorError, OSError) as exc:
        raise ModelLoadError(f"'{path}' is not a readable safetensors file: {exc}") from exc
    config = _config_from_unet(unet)
    if "time_embedding.linear_1.weight" not in state:  # original key names
        state = {k: v for k, v in convert_controlnet_checkpoint(state, config).items() if v is not None}
    hint = state.get("controlnet_cond_embedding.conv_in.weight")
    if hint is not None:
        config["conditioning_channels"] = int(hint.shape[1])
    config["transformer_layers_per_block"] = _transformer_depths(state, config)
    with torch.device("meta"):
        model = ControlNetModel.from_config(config)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"ControlNet file '{path.name}' does not fit a ControlNet for this model ({_count(missing, 'missing')}, "
            f"{_count(unexpected, 'unexpected')}): is it made for another model family, or damaged?"
        )
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:  # same names, other shapes
        raise CheckpointError(
            f"ControlNet file '{path.name}' does not fit a ControlNet for this model: {str(exc).splitlines()[-1]}"
        ) from None
    return model.to(dtype)


def _count(keys: list[str], what: str) -> str:
    return f"{plural(len(keys), 'tensor')} {what}" + (f", first {keys[0]}" if keys else "")


def _config_from_unet(unet: Any) -> dict[str, Any]:
    """The config of a ControlNet copied from `unet`'s encoder (what diffusers' `from_unet` builds)."""
    from diffusers import ControlNetModel

    with torch.device("meta"):
        skeleton = ControlNetModel.from_unet(unet, load_weights_from_unet=False)
    return {k: v for k, v in dict(skeleton.config).items() if not k.startswith("_")}


def _transformer_depths(state: Mapping[str, Any], config: Mapping[str, Any]) -> list[int]:
    """Transformer blocks per down block as the weights have them (SDXL's small/mid ControlNets have fewer than
    the UNet); blocks without attention keep the config's value."""
    given = config.get("transformer_layers_per_block", 1)
    blocks = len(config["down_block_types"])
    depths = list(given) if isinstance(given, (list, tuple)) else [given] * blocks
    for i in range(blocks):
        prefix = f"down_blocks.{i}.attentions.0.transformer_blocks."
        found = {k[len(prefix) :].split(".")[0] for k in state if k.startswith(prefix)}
        if found:
            depths[i] = len(found)
    return depths


def build_tiny(comps: Components) -> Any:
    """The built-in ControlNet: diffusers' `from_unet` copy of the loaded UNet's encoder (its own attention, not
    LinFusion's), with seeded non-zero output convolutions (a trained ControlNet's start at zero, which would
    change nothing), so it visibly steers the image. The same on every run."""
    from diffusers import ControlNetModel

    patch = comps.linfusion
    own_attention = patch.original_attention() if patch is not None else contextlib.nullcontext()
    with torch.random.fork_rng(devices=[]), own_attention:
        torch.manual_seed(TINY_SEED)
        model = ControlNetModel.from_unet(comps.unet)
    generator = torch.Generator().manual_seed(TINY_SEED)
    outputs = [model.controlnet_cond_embedding.conv_out, *model.controlnet_down_blocks, model.controlnet_mid_block]
    with torch.no_grad():
        for conv in outputs:
            fan_in = conv.weight.shape[1] * conv.weight.shape[2] * conv.weight.shape[3]
            noise = torch.randn(conv.weight.shape, generator=generator) * fan_in**-0.5
            conv.weight.copy_(noise.to(conv.weight.dtype))
            conv.bias.zero_()
    return model
