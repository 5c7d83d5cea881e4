"""Load the pipeline components: a hub id, a local diffusers folder, a single-file checkpoint, or a built-in
model built from the configs in `archs.py` (random weights, no files, no network)."""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..base.errors import ModelLoadError, UnknownArchitectureError, UnsafeFileError, UsageError
from ..base.precision import AUTO, dtype_flag
from .archs import ARCHS, BUILTIN_MODELS, ArchSpec
from .devices import vae_dtype
from .families import Family, detect_family, family_or_none, safetensors_shapes, single_file_family
from .hub import IN_MEMORY, PICKLE_SUFFIXES, fetch_snapshot, model_source, resolve_local_or_hub
from .modules import AttentionPatch
from .shipped import write_pipeline_folder

log = logging.getLogger(__name__)

BUILTIN_SEED = 0  # built-in models are the same on every run and every machine
# What a diffusers repo needs for our pipeline: configs, tokenizers and safetensors weights only, and of the
# weights only one precision (the fp16 variant files for an fp16 run, where the repo has them).
CONFIG_PATTERNS = ["model_index.json", "scheduler/*.json", "tokenizer*/*", "*/config.json"]
WEIGHT_NAMES = {
    "unet": "diffusion_pytorch_model",
    "vae": "diffusion_pytorch_model",
    "text_encoder": "model",
    "text_encoder_2": "model",
}
FP16_VARIANT = "fp16"


def weight_patterns(component: str, variant: str | None) -> list[str]:
    """A component's safetensors weights (single or sharded, with their index), in one precision."""
    name, v = WEIGHT_NAMES[component], f".{variant}" if variant else ""
    return [
        f"{component}/{name}{v}.safetensors",
        f"{component}/{name}{v}-*.safetensors",
        f"{component}/{name}.safetensors.index{v}.json",
    ]


def has_weights(folder: Path, component: str, variant: str | None) -> bool:
    name, v = WEIGHT_NAMES[component], f".{variant}" if variant else ""
    sub = folder / component
    return (sub / f"{name}{v}.safetensors").is_file() or any(sub.glob(f"{name}{v}-*.safetensors"))


def hub_patterns(variant: str | None, components: tuple[str, ...] = tuple(WEIGHT_NAMES)) -> list[str]:
    return CONFIG_PATTERNS + [p for c in components for p in weight_patterns(c, variant)]


@dataclass
class Components:
    """What a generate run needs, loaded once and reused by every stage and every job."""

    model_id: str
    unet: Any  # diffusers UNet2DConditionModel (typed loosely: torch's stubs make module attributes Tensor | Module)
    vae: Any  # diffusers AutoencoderKL
    text_encoders: list[Any]
    tokenizers: list[Any]
    scheduler_config: dict[str, Any]
    family: Family | None
    allow_pickle: bool = False  # loaded with --allow-pickle: adapters read pickled weights the same way
    # The LinFusion patch on `unet`, once applied: adapters that bring attention layers of their own (a
    # ControlNet's encoder copy) patch them from it.
    linfusion: AttentionPatch | None = None

    @property
    def is_sdxl(self) -> bool:
        return self.unet.config.get("addition_embed_type") == "text_time"

    @property
    def prediction_type(self) -> str:
        return str(self.scheduler_config.get("prediction_type", "epsilon"))

    def dtypes(self) -> dict[str, str]:
        """Each component's dtype as it runs, spelled as --dtype spells it."""

        def name(module: nn.Module) -> str:
            dtype = next(module.parameters()).dtype
            flag = dtype_flag(dtype)
            return flag if flag != AUTO else str(dtype).replace("torch.", "")

        return {"unet": name(self.unet), "vae": name(self.vae), "text_encoder": name(self.text_encoders[0])}

    @property
    def native_size(self) -> int:
        if self.family is not None:
            return self.family.native_size
        return int(self.unet.config.get("sample_size", 64)) * 8

    @property
    def family_label(self) -> str:
        return self.family.label if self.family else "unknown family"


def byte_level_tokenizer() -> Any:
    """A real CLIPTokenizer over single bytes (no merges): the built-in models' tokenizer, with no files."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": i + len(chars) for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def build_random(
    arch: str | ArchSpec,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = BUILTIN_SEED,
) -> Components:
    """Build an architecture from its configs with seeded random weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    spec = ARCHS[arch] if isinstance(arch, str) else arch
    # Built-in models are built on the CPU so their weights are identical everywhere; big shapes (bench) are
    # built directly on the device, where random init is fast.
    build_device = torch.device("cpu") if spec.name in BUILTIN_MODELS else torch.device(device)
    with torch.random.fork_rng(devices=[build_device] if build_device.type == "cuda" else []), build_device:
        torch.manual_seed(seed)
        unet: Any = UNet2DConditionModel(**spec.unet)
        vae = AutoencoderKL(**spec.vae)
        encoders: list[nn.Module] = []
        for i, cfg in enumerate(spec.text_encoders):
            model_cls = CLIPTextModelWithProjection if (spec.pooled_text and i == 1) else CLIPTextModel
            encoders.append(model_cls(CLIPTextConfig(**cfg)))
    tokenizers = [byte_level_tokenizer() for _ in encoders]
    comps = Components(
        spec.name,
        unet,
        vae,
        encoders,
        tokenizers,
        dict(spec.scheduler),
        detect_family(unet.config),
    )
    return place(comps, device, dtype)


def components_of_pipe(pipe: Any, model_id: str) -> Components:
    """A loaded diffusers Stable Diffusion pipeline's own components (SD-1.x, SD-2.x or SDXL), used as they are:
    its UNet, VAE, text encoders, tokenizers and its scheduler's config."""
    parts = {name: getattr(pipe, name, None) for name in ("unet", "vae", "text_encoder", "tokenizer")}
    missing = [name for name, part in parts.items() if part is None]
    if missing:
        raise UsageError(
            f"from_pipe needs a Stable Diffusion pipeline (unet, vae, text_encoder, tokenizer); "
            f"{type(pipe).__name__} has no {', '.join(missing)}"
        )
    encoders = [parts["text_encoder"], *[e for e in [getattr(pipe, "text_encoder_2", None)] if e is not None]]
    tokenizers = [parts["tokenizer"], *[t for t in [getattr(pipe, "tokenizer_2", None)] if t is not None]]
    config = dict(pipe.scheduler.config) if getattr(pipe, "scheduler", None) is not None else {}
    unet: Any = parts["unet"]
    return Components(model_id, unet, parts["vae"], encoders, tokenizers, config, detect_family(unet.config))


def place(comps: Components, device: str | torch.device, dtype: torch.dtype) -> Components:
    """Move to the device; the VAE runs in fp32 where its family needs it (SDXL's overflows in fp16)."""
    comps.unet.to(device=device, dtype=dtype).eval().requires_grad_(False)
    comps.vae.to(device=device, dtype=vae_dtype(comps.vae.config, dtype, comps.family)).eval().requires_grad_(False)
    for enc in comps.text_encoders:
        enc.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return comps


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """diffusers' and transformers' own progress bars, info logs and warnings off while we load: the caller's
    progress (our events) is the only one shown. Restored afterwards, for library users."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    libraries = (diffusers_logging, transformers_logging)
    saved = [(lib.is_progress_bar_enabled(), lib.get_verbosity()) for lib in libraries]
    for lib in libraries:
        lib.disable_progress_bar()
        lib.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lib, (bars, level) in zip(libraries, saved, strict=True):
            if bars:
                lib.enable_progress_bar()
            lib.set_verbosity(level)


def load_components(
    model: str, *, device: str | torch.device, dtype: torch.dtype, allow_pickle: bool = False, vae: str | None = None
) -> Components:
    """Load `model` (built-in name, local folder, single file or hub id) onto `device`."""
    with quiet_libraries():
        kind = model_source(model)
        if kind == "builtin":
            comps = build_random(model, device=device, dtype=dtype)
        elif kind == "memory":
            comps = IN_MEMORY[model]
        elif kind == "file":
            comps = _load_single_file(model, Path(model).expanduser(), dtype, allow_pickle)
        else:
            folder = Path(model).expanduser() if kind == "folder" else _fetch_repo(model, dtype)
            comps = _load_folder(model, folder, dtype)
        if vae:
            comps.vae = _load_vae(vae, dtype)
        comps.allow_pickle = allow_pickle
        return place(comps, device, dtype)


def _fetch_repo(repo_id: str, dtype: torch.dtype) -> Path:
    """A hub repo's snapshot with the weights in one precision: the fp16 variant files for an fp16 run (half the
    download), the plain files for the components that have no variant (or for any other dtype)."""
    variant = FP16_VARIANT if dtype == torch.float16 else None
    folder = fetch_snapshot(repo_id, what="model", allow_patterns=hub_patterns(variant))
    if variant is None:
        return folder
    lacking = tuple(
        c for c in WEIGHT_NAMES if (folder / c / "config.json").is_file() and not has_weights(folder, c, variant)
    )
    if lacking:
        folder = fetch_snapshot(repo_id, what="model", allow_patterns=hub_patterns(None, lacking))
    return folder


def _load_vae(source: str, dtype: torch.dtype) -> nn.Module:
    from diffusers import AutoencoderKL

    folder = resolve_local_or_hub(source, what="VAE", allow_patterns=["config.json", "*.safetensors", "vae/*"])
    sub = "vae" if (folder / "vae" / "config.json").is_file() else None
    try:
        return AutoencoderKL.from_pretrained(folder, subfolder=sub, torch_dtype=dtype, use_safetensors=True)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"could not load the VAE '{source}' ({exc}); it must be a diffusers AutoencoderKL "
            "folder with safetensors weights"
        ) from exc


def _load_folder(model: str, folder: Path, dtype: torch.dtype) -> Components:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    if not (folder / "unet" / "config.json").is_file():
        raise ModelLoadError(
            f"'{model}' is not a diffusers Stable Diffusion folder (no unet/config.json in {folder}); give a "
            "diffusers folder, a hub id, or a single .safetensors checkpoint file"
        )
    two_encoders = (folder / "text_encoder_2").is_dir()

    def variant(component: str) -> str | None:
        """fp16 files for an fp16 run where the folder has them; otherwise the plain files, converted."""
        return FP16_VARIANT if dtype == torch.float16 and has_weights(folder, component, FP16_VARIANT) else None

    try:
        unet = UNet2DConditionModel.from_pretrained(
            folder, subfolder="unet", torch_dtype=dtype, use_safetensors=True, variant=variant("unet")
        )
        vae = AutoencoderKL.from_pretrained(
            folder, subfolder="vae", torch_dtype=dtype, use_safetensors=True, variant=variant("vae")
        )
        encoders: list[nn.Module] = [
            CLIPTextModel.from_pretrained(
                folder, subfolder="text_encoder", dtype=dtype, use_safetensors=True, variant=variant("text_encoder")
            )
        ]
        tokenizers = [CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")]
        if two_encoders:
            encoders.append(
                CLIPTextModelWithProjection.from_pretrained(
                    folder,
                    subfolder="text_encoder_2",
                    dtype=dtype,
                    use_safetensors=True,
                    variant=variant("text_encoder_2"),
                )
            )
            tokenizers.append(CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer_2"))
        scheduler_config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(
            f"could not load '{model}' from {folder}: {exc}. Weights must be safetensors (convert .bin/.ckpt first)"
        ) from exc
    return Components(model, unet, vae, encoders, tokenizers, scheduler_config, family_or_none(unet.config))


def _load_single_file(model: str, path: Path, dtype: torch.dtype, allow_pickle: bool) -> Components:
    """An A1111/Civitai-style checkpoint (original LDM key names) with the configs and tokenizer shipped in the
    package for its family, told from its tensor names and shapes: no Hugging Face cache, no network."""
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES and not allow_pickle:
        raise UnsafeFileError(
            f"'{path.name}' is a pickle checkpoint, which can run arbitrary code when loaded; we only read "
            "safetensors. Convert it once on a trusted machine (diffusers' convert_original_stable_diffusion_to_"
            "diffusers.py, or safetensors' convert tool) or pass --allow-pickle to load it with torch's "
            "weights-only loader"
        )
    if suffix not in (".safetensors", *PICKLE_SUFFIXES):
        raise UsageError(f"'{path.name}': unknown model file type; give a .safetensors file or a diffusers folder")
    if suffix in PICKLE_SUFFIXES:
        log.warning("loading pickle checkpoint %s with torch's weights-only loader (--allow-pickle)", path.name)
        shapes = _pickle_shapes(path)
    else:
        shapes = safetensors_shapes(path)
    try:
        family = single_file_family(shapes, path.name)
    except UnknownArchitectureError as exc:
        raise ModelLoadError(str(exc)) from None
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    is_xl = family.addition_embed_type == "text_time"
    pipe_cls = StableDiffusionXLPipeline if is_xl else StableDiffusionPipeline
    extra: dict[str, Any] = (
        {} if is_xl else {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    )
    with tempfile.TemporaryDirectory(prefix="linfusion-configs-") as tmp:
        configs = write_pipeline_folder(family, Path(tmp), prediction_type=single_file_prediction(path, shapes, family))
        try:
            extra.update(_flattened_clip(path, shapes, configs, dtype))
            pipe = pipe_cls.from_single_file(
                str(path), config=str(configs), torch_dtype=dtype, local_files_only=True, **extra
            )
        except (OSError, ValueError, KeyError, RuntimeError) as exc:  # diffusers' ways of saying "does not fit"
            raise ModelLoadError(
                f"could not load single-file checkpoint '{path}' as {family.label}: {exc}. If it is not a plain "
                f"{family.label} checkpoint, convert it to a diffusers folder and pass the folder"
            ) from exc
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if is_xl else [])
    tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if is_xl else [])
    return Components(model, pipe.unet, pipe.vae, encoders, tokenizers, dict(pipe.scheduler.config), family)


# Where single files keep CLIP-L (SD-1.x; SDXL's first encoder), in transformers' names under a prefix.
CLIP_L_PREFIXES = ("cond_stage_model.transformer.", "conditioner.embedders.0.transformer.")


def _flattened_clip(path: Path, shapes: Mapping[str, Any], configs: Path, dtype: torch.dtype) -> dict[str, Any]:
    """CLIP-L saved by transformers 5, which flattened CLIPTextModel (`embeddings.*`, not `text_model.
    embeddings.*`), is not recognised by diffusers' single-file loader: load that encoder here, and give it to
    diffusers ready. Files with the usual names: nothing to do."""
    prefix = next((p for p in CLIP_L_PREFIXES if f"{p}embeddings.position_embedding.weight" in shapes), None)
    if prefix is None or path.suffix.lower() != ".safetensors":
        return {}
    from safetensors import safe_open
    from transformers import CLIPTextConfig, CLIPTextModel

    with safe_open(str(path), framework="pt") as f:
        state = {k[len(prefix) :]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}  # noqa: SIM118
    encoder: nn.Module = CLIPTextModel(CLIPTextConfig.from_pretrained(configs / "text_encoder"))
    wrapper = "text_model." if hasattr(encoder, "text_model") else ""  # transformers before the flattening
    encoder.load_state_dict({wrapper + k: v for k, v in state.items() if not k.endswith("position_ids")})
    encoder.to(dtype)
    return {"text_encoder": encoder}


V_PRED_KEY = "v_pred"  # an empty tensor some tools write into v-prediction single files


def single_file_prediction(path: Path, shapes: Mapping[str, Any], family: Family) -> str | None:
    """SD-2.x single files of both kinds have the same keys: 2.x-base predicts the noise, 2.x-768 predicts v.
    A `v_pred` key, or the A1111-style config beside the file (NAME.yaml, `parameterization: "v"` or not) says
    which; without either, v-prediction (the 768 px model, diffusers' own guess). None: the family's own."""
    if family.configs != "sd2":
        return None
    if V_PRED_KEY in shapes:
        return "v_prediction"
    beside = path.with_suffix(".yaml")
    if beside.is_file():
        import yaml

        try:
            params = (yaml.safe_load(beside.read_text()) or {}).get("model", {}).get("params", {})
        except (yaml.YAMLError, AttributeError) as exc:
            raise ModelLoadError(f"{beside}: not a readable Stable Diffusion config ({exc})") from exc
        return "v_prediction" if params.get("parameterization") == "v" else "epsilon"
    return "v_prediction"


def _pickle_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a pickle checkpoint, loaded weights-only (refused if it holds anything else)."""
    state = check_weights_only(path)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelLoadError(f"'{path.name}' does not hold a state dict")
    return {str(k): tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}


def check_weights_only(path: Path) -> Any:
    """Unpickle with torch's weights-only loader first: anything but tensors and plain containers is refused
    before diffusers ever reads the file."""
    import pickle

    def refuse(exc: Exception) -> UnsafeFileError:
        detail = next((line.strip() for line in str(exc).splitlines() if "Unsupported global" in line), "")
        return UnsafeFileError(
            f"'{path.name}' holds objects other than tensors (or is damaged), which could run code when loaded; "
            f"refused even with --allow-pickle. {detail}".strip()
        )

    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise refuse(exc) from None
    except RuntimeError:  # the old (non-zip) format cannot be memory-mapped: load it plainly, still weights-only
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
            raise refuse(exc) from None


def save_components(comps: Components, folder: str | Path) -> Path:
    """Write components as a diffusers folder (what `load_components` reads back)."""
    from diffusers import DDIMScheduler

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    comps.unet.save_pretrained(out / "unet")
    comps.vae.save_pretrained(out / "vae")
    suffixes = ["", "_2"][: len(comps.text_encoders)]
    for suffix, enc, tok in zip(suffixes, comps.text_encoders, comps.tokenizers, strict=True):
        enc.save_pretrained(out / f"text_encoder{suffix}")
        tok.save_pretrained(out / f"tokenizer{suffix}")
    DDIMScheduler.from_config(comps.scheduler_config).save_pretrained(out / "scheduler")
    pipeline = "StableDiffusionXLPipeline" if comps.is_sdxl else "StableDiffusionPipeline"
    (out / "model_index.json").write_text(json.dumps({"_class_name": pipeline}, indent=2) + "\n")
    return out
