"""ControlNets as an adapter kind: `--controlnet SRC[:SCALE]` (repeatable) with one `--control-image` each (a
file, resized to every stage's size, or `previous`: each refine stage's upscaled previous image, what a tile
ControlNet wants), `--control-start/--control-end` (a fraction of each stage's steps) and `--control-stages` (a
scale per stage). What can be checked before the model loads is here (sources, family, images), and what a
ControlNet costs (its weights, the residuals it hands the UNet); loading, patching and the per-stage call are in
load.py, patch.py and adapter.py."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...base.errors import ModelNotFoundError, UsageError
from ...base.events import Note
from ...base.job import Job
from ...base.settings import CONTROL_PANEL, WITH_BENCH, AdapterRef, Setting, in_range
from ...base.text import plural
from ...io.images import open_image
from ..adapter_kind import AdapterKind
from ..archs import ARCHS
from ..families import FAMILIES, Family, safetensors_shapes
from ..hub import looks_like_hub_id

if TYPE_CHECKING:
    from ..adapter_kind import Adapter
    from ..loading import Components


KIND = "controlnets"  # its name in EngineSpec.adapters, reports and plans


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
    """The family a ControlNet's signature matches (only the first block width may be known); failing that, the
    family whose text width and added embeddings it has (an SDXL-shaped one of other widths is still SDXL's)."""
    shaped = [f for f in FAMILIES if (f.cross_attention_dim, f.addition_embed_type) == (cross, addition)]
    for family in shaped:
        if widths == family.block_out_channels[: len(widths)]:
            return family.label
    if shaped:
        embeds = f", {addition} embeddings" if addition else ""
        return f"a model shaped like {shaped[0].label} (cross-attention width {cross}{embeds}, block widths {list(widths)})"
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
    (memory_plan.MemoryPlanner.control_channels): each one's residuals, their running sum when there are several,
    and each control image at the stage's pixel size."""
    if count == 0:
        return 0.0
    sets = count + (1 if count > 1 else 0)
    return sets * residual_channels(unet_config) + count * IMAGE_CHANNELS * PIXELS_PER_TOKEN


def _preflight(refs: list[AdapterRef], job: Job, family: Family | None) -> None:
    """Everything about a job's ControlNets that can fail before the model loads: sources that exist and fit the
    model's family (where their config is local), one readable control image each (or `previous`)."""
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


def _notes(refs: list[AdapterRef], job: Job, target: tuple[int, int], stages: int) -> list[Note]:
    """What a user should know about a job's control images: stretched to another shape, or never used."""
    if job.control_image and not job.controlnet:
        raise UsageError("--control-image needs a --controlnet to condition")
    if job.control_stages and len(job.control_stages) > stages:
        raise UsageError(
            f"--control-stages gives {plural(len(job.control_stages), 'scale')} but the plan has "
            f"{plural(stages, 'stage')}: give at most {stages} (the last one repeats)"
        )
    notes: list[Note] = []
    for ref, image in zip(refs, job.control_image or (), strict=False):
        if image == PREVIOUS:
            if stages < 2 and not job.image:
                notes.append(
                    Note(
                        "info",
                        f"ControlNet {ref.source} conditions on the previous stage's image: one stage, never runs",
                    )
                )
            continue
        with open_image(image) as opened:
            width, height = opened.width, opened.height
        if abs(width / height - target[0] / target[1]) > ASPECT_TOLERANCE:
            notes.append(
                Note(
                    "warning",
                    f"control image {Path(image).name} is {width}x{height}, another shape than the "
                    f"{target[0]}x{target[1]} output: it is stretched to every stage's size",
                )
            )
    return notes


def _fraction(name: str, default: float, help: str) -> Setting:
    return Setting(
        name, "float", default, help, CONTROL_PANEL, WITH_BENCH, check=in_range(0.0, 1.0), metavar="FRACTION"
    )


def _stage_scales_ok(values: list[float]) -> str | None:
    if not values:
        return "needs at least one value"
    return None if all(0.0 <= v <= 10.0 for v in values) else "values must be between 0 and 10"


class ControlNetKind(AdapterKind):
    name = KIND
    label = "ControlNet"
    described_as = "controlnet"
    ref_setting = "controlnet"
    settings = (
        Setting(
            "controlnet",
            "refs",
            help="A ControlNet (repeatable): diffusers folder, .safetensors file, hub id, or tiny (built-in, random); "
            ":SCALE weights it \\[default scale: 1]. Its own self-attention runs linear too (LinFusion).",
            panel=CONTROL_PANEL,
            commands=WITH_BENCH,
            metavar="SRC[:SCALE]",
        ),
        Setting(
            "control_image",
            "texts",
            help="One per --controlnet, in order: the image it follows (resized to every stage), or previous: each "
            "refine stage's upscaled previous image, what a tile ControlNet wants (base stages run without it).",
            panel=CONTROL_PANEL,
            commands=WITH_BENCH,
            metavar="FILE|previous",
            path=True,
        ),
        _fraction("control_start", 0.0, "ControlNets act from this fraction of each stage's steps \\[default: 0]."),
        _fraction("control_end", 1.0, "ControlNets act up to this fraction of each stage's steps \\[default: 1]."),
        Setting(
            "control_stages",
            "floats",
            help="ControlNet scale per stage, first to last, the last repeating; 0,1 turns them off in the base "
            "stage \\[default: 1 everywhere].",
            panel=CONTROL_PANEL,
            commands=WITH_BENCH,
            check=_stage_scales_ok,
            metavar="SCALES",
        ),
    )
    fields_rank = 2

    def preflight(self, job: Job, family: Family | None, allow_pickle: bool) -> None:
        _preflight(self.refs(job), job, family)

    def notes(self, job: Job, target: tuple[int, int], stages: int) -> list[Note]:
        return _notes(self.refs(job), job, target, stages)

    def hub_files(self, job: Job, family: Family | None) -> list[tuple[str, str, str]]:
        return [("ControlNet", ref.source, CONFIG_NAME) for ref in self.refs(job)]

    own_pass = True
    memory_key = "residuals"  # added to the UNet's skips

    def planned_gib_fp16(self, job: Job, family: Family | None, family_gib: float) -> float:
        return family_gib * WEIGHTS_SHARE * len(self.refs(job))

    def activation_channels(self, unet_config: Mapping[str, Any], count: int) -> float:
        return activation_channels(unet_config, count)

    def plan_entries(self, job: Job) -> list[dict[str, Any]]:
        return [
            {"source": ref.source, "scale": ref.scale, "image": image}
            for ref, image in zip(self.refs(job), job.control_image or (), strict=False)
        ]

    def plan_line(self, entry: Mapping[str, Any]) -> str:
        return f"ControlNet {entry['source']} at scale {entry['scale']:g} on {entry['image']}"

    def a1111_fields(self, described: list[dict[str, Any]]) -> list[tuple[str, str]]:
        """A1111's ControlNet extension fields, one per unit: `ControlNet 0: "Module: none, Model: ..., Weight: ...,
        Guidance Start: ..., Guidance End: ..."` (no preprocessor module: control images are given ready-made)."""
        return [
            (
                f"ControlNet {i}",
                f'"Module: none, Model: {a["model"]}, Weight: {a["scale"]:g}, '
                f'Guidance Start: {a.get("guidance_start", 0.0):g}, Guidance End: {a.get("guidance_end", 1.0):g}"',
            )
            for i, a in enumerate(described)
        ]

    def load(self, comps: Components, ref: AdapterRef) -> Adapter:
        from .load import load  # lazy: torch stays out of CLI start-up

        return load(comps, ref)

    simulates = True

    def simulated(self, comps: Components, ref: AdapterRef) -> Adapter:
        from .load import build_meta  # lazy: torch stays out of CLI start-up

        return build_meta(comps, ref)


CONTROLNET = ControlNetKind()
