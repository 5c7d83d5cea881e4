"""ControlNets as adapters: loaded from a hub id, a diffusers folder, a single .safetensors file or built in
(`tiny`), their own self-attention made linear, and per stage a UNet extra that adds their residuals.

A ControlNet is a copy of the UNet's encoder (down and mid blocks), so its `attn1` layers are as quadratic in
pixels as the UNet's. Each is swapped for LinFusion attention taken from the UNet's LinFusion layer of the same
module name, with the ControlNet's own training carried over: its projections become
W_cn + (W_linfusion - W_unet), the change LinFusion made to the UNet's layer applied to the ControlNet's. A
ControlNet that is an untouched copy of the UNet's encoder (the built-in `tiny`) thus gets exactly the UNet's
LinFusion layers; with `--linfusion init` (W_linfusion = W_unet) it keeps its own projections (up to rounding).

Control images are per job: a file (resized to every stage's size), or `previous`, the stage's upscaled
previous image, which is what a tile ControlNet conditions on (base stages then run without it).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from ..base.errors import CheckpointError, ModelLoadError, ModelNotFoundError, UsageError
from ..base.text import plural
from ..core.config import AdapterRef, JobSpec
from ..linfusion.patching import LinFusionPatch, self_attention_layers
from .archs import ARCHS
from .families import FAMILIES, Family, family_or_none, safetensors_shapes
from .hub import looks_like_hub_id, resolve_local_or_hub

if TYPE_CHECKING:
    from ..base.plan import StagePlan
    from .loading import Components

log = logging.getLogger(__name__)

KIND = "controlnets"  # the EngineSpec field (adapters.ADAPTER_KINDS)
TINY = "tiny"  # the built-in random-weight ControlNet, made from the loaded UNet's encoder
TINY_SEED = 0
ASPECT_TOLERANCE = 0.01  # width/height difference under which a control image counts as the output's shape
PREVIOUS = "previous"  # control image source: the stage's upscaled previous image (what a tile ControlNet wants)
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
FP16_VARIANT = "fp16"
FP16_WEIGHTS_NAME = f"diffusion_pytorch_model.{FP16_VARIANT}.safetensors"
LDM_PREFIX = "control_model."  # A1111-style single files keep the ControlNet under this prefix (or none)
# What makes a ControlNet fit a UNet: the text width its cross-attention reads, SDXL's added embedding, the
# block widths. Compared before the model loads (config.json or a single file's header) and after.
FAMILY_KEYS = ("cross_attention_dim", "addition_embed_type", "block_out_channels")
SHAPE_KEYS = ("layers_per_block", "conditioning_channels")  # in a whole config: must match the UNet's exactly
IMAGE_CHANNELS = 3
PIXELS_PER_TOKEN = 64  # 8 x 8 px per latent token
# A ControlNet's weights against its family's (UNet + VAE + text encoders), for plans made before loading:
# SD-1.5's ControlNets hold 361M parameters (0.67 GiB of 2.1 in fp16), SDXL's full ones 1.25B (2.3 of 6.9).
WEIGHTS_SHARE = 0.33
# The projections LinFusion attention shares with diffusers' Attention, whose ControlNet deltas carry over.
PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")


# --- sources and pre-load checks (no weights read) -----------------------------------------------------------


def source_kind(source: str) -> str:
    """ "tiny", "folder", "file" or "hub"; a path that does not exist is a usage error naming what was meant."""
    if source == TINY:
        return TINY
    path = Path(source).expanduser()
    if path.is_dir():
        return "folder"
    if path.is_file():
        return "file"
    if looks_like_hub_id(source):
        return "hub"
    head, sep, tail = source.rpartition(":")
    if sep and head:
        raise UsageError(
            f"ControlNet '{source}': the scale '{tail}' is not a number (SRC:SCALE, e.g. {head}:0.8), and "
            f"'{source}' is no ControlNet folder, file or hub id"
        )
    raise ModelNotFoundError(
        f"ControlNet '{source}' does not exist: give a diffusers ControlNet folder, a .safetensors file, a hub id "
        f"(owner/name), or {TINY}"
    )


def _family_label(cross: Any, addition: Any, widths: tuple[int, ...]) -> str:
    """The family a ControlNet's signature matches (only the first block width may be known)."""
    for family in FAMILIES:
        if (family.cross_attention_dim, family.addition_embed_type) == (cross, addition) and (
            widths == family.block_out_channels[: len(widths)]
        ):
            return family.label
    return f"an unknown family (cross-attention width {cross}, block widths {list(widths)})"


def file_signature(shapes: Mapping[str, tuple[int, ...]], name: str) -> dict[str, Any]:
    """FAMILY_KEYS of a single-file ControlNet from its tensor names and shapes, in diffusers' or the original
    (LDM) key names; only the first block width is known (a signature, not a config)."""
    keys = {k.removeprefix(LDM_PREFIX): v for k, v in shapes.items()}
    if "conv_in.weight" in keys and "controlnet_cond_embedding.conv_in.weight" in keys:
        first, addition = keys["conv_in.weight"][0], "add_embedding.linear_1.weight" in keys
    elif "input_blocks.0.0.weight" in keys and "input_hint_block.0.weight" in keys:
        first, addition = keys["input_blocks.0.0.weight"][0], "label_emb.0.0.weight" in keys
    else:
        raise UsageError(
            f"'{name}' is not a ControlNet single file (no conv_in / controlnet_cond_embedding or input_blocks / "
            "input_hint_block tensors); give a ControlNet .safetensors file or a diffusers ControlNet folder"
        )
    cross = next((v[1] for k, v in keys.items() if k.endswith(".attn2.to_k.weight")), None)
    return {
        "cross_attention_dim": cross,
        "addition_embed_type": "text_time" if addition else None,
        "block_out_channels": (first,),
    }


def peek_signature(source: str) -> dict[str, Any] | None:
    """A ControlNet's FAMILY_KEYS without loading it: its config.json (folder, or hub cache), or a single file's
    header. None where nothing local says (a hub id not downloaded yet, the built-in tiny)."""
    kind = source_kind(source)
    path = Path(source).expanduser()
    config_path: Path | None = None
    if kind == "folder":
        config_path = path / CONFIG_NAME
        if not config_path.is_file():
            raise UsageError(f"ControlNet folder '{source}' has no {CONFIG_NAME}: give a diffusers ControlNet folder")
    elif kind == "file":
        if path.suffix.lower() != ".safetensors":
            raise UsageError(f"ControlNet '{path.name}': only .safetensors files are read")
        return file_signature(safetensors_shapes(path), path.name)
    elif kind == "hub":
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(source, CONFIG_NAME)
        config_path = Path(cached) if isinstance(cached, str) else None
    if config_path is None:
        return None
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"ControlNet '{source}': unreadable {CONFIG_NAME} ({exc})") from None
    return {key: config.get(key) for key in (*FAMILY_KEYS, *SHAPE_KEYS) if key in config}


def check_fits(source: str, signature: Mapping[str, Any], unet_config: Mapping[str, Any], model_label: str) -> None:
    """Refuse a ControlNet made for another family than the model's, naming both."""
    wanted = {key: unet_config.get(key) for key in FAMILY_KEYS}
    widths = tuple(signature.get("block_out_channels") or ())
    same = (
        signature.get("cross_attention_dim") == wanted["cross_attention_dim"]
        and signature.get("addition_embed_type") == wanted["addition_embed_type"]
        and widths == tuple(wanted["block_out_channels"] or ())[: len(widths)]
    )
    if not same:
        theirs = _family_label(signature.get("cross_attention_dim"), signature.get("addition_embed_type"), widths)
        raise UsageError(
            f"ControlNet '{source}' is made for {theirs}, but the model is {model_label}: use a ControlNet made for "
            f"{model_label}"
        )
    # A whole config (not a single file's signature) also fixes how many residuals it hands the UNet.
    if "layers_per_block" in signature:
        theirs_shape = (list(widths), signature.get("layers_per_block"))
        ours = (list(wanted["block_out_channels"] or ()), unet_config.get("layers_per_block"))
        if theirs_shape != ours:
            raise UsageError(
                f"ControlNet '{source}' has blocks {theirs_shape[0]} with {theirs_shape[1]} layers each, the model's "
                f"UNet ({model_label}) {ours[0]} with {ours[1]}: it was made for another architecture"
            )
        channels = signature.get("conditioning_channels", IMAGE_CHANNELS)
        if channels != IMAGE_CHANNELS:
            raise UsageError(
                f"ControlNet '{source}' reads {channels}-channel control images; only RGB control images are supported"
            )


def job_refs(job: JobSpec) -> list[AdapterRef]:
    return [AdapterRef.parse(r) for r in job.controlnet or ()]


def preflight(job: JobSpec, family: Family | None, allow_pickle: bool = False) -> None:
    """Everything about a job's ControlNets that can fail before the model loads: sources that exist and fit the
    model's family (where their config is local), one readable control image each (or `previous`)."""
    from ..io.images import open_image

    refs = job_refs(job)
    images = list(job.control_image or ())
    if len(images) != len(refs):
        raise UsageError(
            f"{plural(len(refs), 'ControlNet')} but {plural(len(images), 'control image')}: give one --control-image "
            f"per --controlnet, in the same order (a file, or {PREVIOUS} for the stage's upscaled previous image)"
        )
    sources = [r.source for r in refs]
    twice = next((s for s in sources if sources.count(s) > 1), None)
    if twice is not None:
        raise UsageError(f"ControlNet '{twice}' is given twice; give it once (one control image per ControlNet)")
    if job.control_start >= job.control_end:
        raise UsageError(
            f"--control-start {job.control_start:g} must be below --control-end {job.control_end:g} (fractions of "
            "each stage's steps): the ControlNets would never act"
        )
    for ref, image in zip(refs, images, strict=True):
        signature = peek_signature(ref.source)
        if signature is not None and family is not None:
            check_fits(ref.source, signature, ARCHS[family.arch].unet, family.label)
        if image != PREVIOUS:
            with open_image(image):
                pass


def control_notes(job: JobSpec, target: tuple[int, int], stages: int) -> list[str]:
    """What a user should know about a job's control images: stretched to another shape, or never used."""
    from ..io.images import open_image

    if job.control_image and not job.controlnet:
        raise UsageError("--control-image needs a --controlnet to condition")
    notes: list[str] = []
    for ref, image in zip(job_refs(job), job.control_image or (), strict=False):
        if image == PREVIOUS:
            if stages < 2 and not job.image:
                notes.append(f"ControlNet {ref.source} conditions on the previous stage's image: one stage, never runs")
            continue
        with open_image(image) as opened:
            width, height = opened.width, opened.height
        if abs(width / height - target[0] / target[1]) > ASPECT_TOLERANCE:
            notes.append(
                f"control image {Path(image).name} is {width}x{height}, another shape than the {target[0]}x{target[1]} "
                "output: it is stretched to every stage's size"
            )
    return notes


# --- loading ------------------------------------------------------------------------------------------------


def load(comps: Components, ref: AdapterRef) -> ControlNetAdapter:
    """Load (or build) the ControlNet `ref` names onto the UNet's device and dtype, checked against the UNet,
    with its attn1 layers made linear from the UNet's LinFusion layers."""
    from .loading import quiet_libraries

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


# --- LinFusion on the ControlNet's own attention ------------------------------------------------------------


@dataclass
class ControlNetPatch:
    """LinFusion on one ControlNet: which attn1 layers, from which weights, and how to undo it."""

    model: nn.Module
    source: str | None  # the UNet's LinFusion weights; None: LinFusion is off
    layers: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)  # attn1 layers left quadratic (no matching UNet layer)
    _originals: dict[str, nn.Module] = field(default_factory=dict, repr=False)

    @classmethod
    def apply(cls, model: nn.Module, linfusion: LinFusionPatch | None) -> ControlNetPatch:
        attention = self_attention_layers(model)
        if linfusion is None:
            return cls(model, None, kept=[name for name, _ in attention])
        patch = cls(model, linfusion.source)
        unet_originals = dict(zip(linfusion.layers, linfusion.originals, strict=True))
        for name, attn in attention:
            base = unet_originals.get(name)
            if base is None or not _same_projections(attn, base):
                patch.kept.append(name)
                continue
            module = copy.deepcopy(linfusion.unet.get_submodule(name))
            _carry_delta(module, own=attn, base=base)
            patch._originals[name] = attn
            _set(model, name, module)
            patch.layers.append(name)
        if patch.kept:
            log.warning(
                "ControlNet: %s kept ordinary (quadratic) attention: no UNet LinFusion layer of the same name and shape",
                plural(len(patch.kept), "attn1 layer"),
            )
        return patch

    def remove(self) -> None:
        """Put the ControlNet's own attention back: its state_dict is then exactly what was loaded."""
        for name, original in self._originals.items():
            _set(self.model, name, original)
        self._originals.clear()


def _same_projections(attn: Any, base: Any) -> bool:
    return all(attn.get_submodule(p).weight.shape == base.get_submodule(p).weight.shape for p in PROJECTIONS)


@torch.no_grad()
def _carry_delta(module: nn.Module, own: nn.Module, base: nn.Module) -> None:
    """LinFusion projections + (the ControlNet's own - the UNet's original): W_cn + (W_linfusion - W_unet)."""
    for name in PROJECTIONS:
        target, mine, theirs = module.get_submodule(name), own.get_submodule(name), base.get_submodule(name)
        for param in ("weight", "bias"):
            value = getattr(target, param, None)
            if isinstance(value, torch.Tensor):
                delta = getattr(mine, param).float() - getattr(theirs, param).float()
                value.copy_((value.float() + delta.to(value.device)).to(value.dtype))


def _set(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


# --- the adapter ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobControl:
    """One job's settings for one ControlNet."""

    image: str  # a file, or PREVIOUS
    pixels: np.ndarray | None  # (H, W, 3) uint8 for a file
    start: float
    end: float
    stage_scales: tuple[float, ...]  # multiplier per stage, the last repeating

    def stage_scale(self, index: int) -> float:
        return self.stage_scales[min(index, len(self.stage_scales) - 1)] if self.stage_scales else 1.0


class ControlNetAdapter:
    """A loaded ControlNet (see the module docstring); `modules` are chunked by memory settings like the UNet."""

    kind = KIND

    def __init__(self, ref: AdapterRef, model: Any, name: str, patch: ControlNetPatch) -> None:
        self.ref = ref
        self.model = model
        self.name = name
        self.patch = patch
        self.job: JobControl | None = None

    @property
    def modules(self) -> tuple[nn.Module, ...]:
        return (self.model,)

    def begin_job(self, job: JobSpec, device: torch.device) -> None:
        from ..io.images import load_rgb

        refs, images = job_refs(job), list(job.control_image or ())
        sources = [r.source for r in refs]
        if self.ref.source not in sources or len(images) != len(refs):
            raise UsageError(f"ControlNet '{self.ref.source}' has no control image in this job")
        image = images[sources.index(self.ref.source)]
        pixels = None if image == PREVIOUS else load_rgb(image)
        self.job = JobControl(image, pixels, job.control_start, job.control_end, tuple(job.control_stages or ()))

    def stage_extra(self, stage: StagePlan, control: torch.Tensor | None) -> ControlExtra | None:
        job = self.job
        if job is None:
            raise RuntimeError("ControlNet used before begin_job")
        scale = self.ref.scale * job.stage_scale(stage.index)
        if scale == 0.0 or job.start >= job.end:
            return None
        param = next(self.model.parameters())
        if job.pixels is not None:
            from ..engine.pipeline import _to_device_image, upscale

            control = upscale(_to_device_image(job.pixels, param.device, param.dtype), stage.width, stage.height)
        elif control is None:
            return None  # `previous` in a base stage: nothing to condition on yet
        cond = ((control.to(param.device, param.dtype) + 1) / 2).clamp_(0, 1)  # (1, 3, H, W), [0, 1] as trained
        return ControlExtra(self.model, cond, scale, job.start, job.end, stage.steps)

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "kind": "controlnet",
            "source": self.ref.source,
            "scale": self.ref.scale,
            "model": self.name,
            "linfusion_layers": len(self.patch.layers),
            "linfusion_weights": self.patch.source or "none (LinFusion off)",
            "quadratic_layers": len(self.patch.kept),
        }
        if self.job is not None:
            info.update(
                image=self.job.image,
                guidance_start=self.job.start,
                guidance_end=self.job.end,
                stage_scales=list(self.job.stage_scales) or None,
            )
        return info

    def remove(self) -> None:
        self.patch.remove()
        self.model = None
        self.job = None


@dataclass
class ControlExtra:
    """One stage's ControlNet call for every UNet call; active for the steps whose fraction of the stage lies in
    [start, end] (diffusers' control_guidance_start/end rule). Steps are counted by distinct timesteps: guidance
    halves and a refine method's extra passes of one step share its timestep."""

    model: Any
    cond: torch.Tensor  # (1, 3, H, W) in [0, 1]
    scale: float
    start: float
    end: float
    steps: int
    _step: int = -1
    _last_t: float | None = None

    def active(self, t: torch.Tensor) -> bool:
        value = float(t)
        if value != self._last_t:
            self._step, self._last_t = self._step + 1, value
        n = max(1, self.steps)
        return not (self._step / n < self.start or (self._step + 1) / n > self.end + 1e-9)

    def __call__(
        self,
        sample: torch.Tensor,
        t: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        added_cond_kwargs: dict[str, Any] | None,
        rows: slice,
    ) -> dict[str, Any]:
        if not self.active(t):
            return {}
        down, mid = self.model(
            sample,
            t,
            encoder_hidden_states=encoder_hidden_states,
            controlnet_cond=self.cond,  # batch 1, broadcast over the guidance halves inside the ControlNet
            conditioning_scale=self.scale,
            added_cond_kwargs=added_cond_kwargs,
            return_dict=False,
        )
        return {"down_block_additional_residuals": tuple(down), "mid_block_additional_residual": mid}


def residual_channels(unet_config: Mapping[str, Any]) -> float:
    """Channels of one ControlNet's residuals per top-level latent token (a level deeper counts 1/4): conv_in,
    every resnet/attention layer and downsampler of the down blocks, and the mid block."""
    widths = list(unet_config.get("block_out_channels", (320, 640, 1280, 1280)))
    layers = int(unet_config.get("layers_per_block", 2))
    total = float(widths[0])  # conv_in
    for level, width in enumerate(widths):
        total += layers * width / 4**level
        if level + 1 < len(widths):
            total += width / 4 ** (level + 1)  # the downsampler's output
    return total + widths[-1] / 4 ** (len(widths) - 1)  # mid block


def activation_channels(unet_config: Mapping[str, Any], count: int) -> float:
    """What `count` ControlNets add to a UNet call, in channels per top-level latent token and batch element
    (memory.MemoryPlanner.control_channels): each one's residuals, their running sum when there are several,
    and each control image at the stage's pixel size."""
    if count == 0:
        return 0.0
    sets = count + (1 if count > 1 else 0)
    return sets * residual_channels(unet_config) + count * IMAGE_CHANNELS * PIXELS_PER_TOKEN
