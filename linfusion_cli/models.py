"""Load the pipeline components: a hub id, a local diffusers folder, a single-file checkpoint, or a built-in
model built from the configs in `archs.py` (random weights, no files, no network)."""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .archs import ARCHS, BUILTIN_MODELS, ArchSpec
from .errors import ModelLoadError, UnsafeFileError, UsageError
from .families import Family, detect_family, is_sdxl_checkpoint
from .hub import looks_like_hub_id, resolve_local_or_hub

log = logging.getLogger(__name__)

BUILTIN_SEED = 0  # built-in models are the same on every run and every machine
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
# What a diffusers repo needs for our pipeline: configs, tokenizers and safetensors weights only.
HUB_PATTERNS = [
    "model_index.json",
    "scheduler/*.json",
    "tokenizer*/*",
    "text_encoder*/config.json",
    "text_encoder*/model.safetensors",
    "text_encoder*/model.safetensors.index.json",
    "text_encoder*/model-*.safetensors",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "unet/diffusion_pytorch_model.safetensors.index.json",
    "unet/diffusion_pytorch_model-*.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
]


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

    @property
    def is_sdxl(self) -> bool:
        return self.unet.config.get("addition_embed_type") == "text_time"

    @property
    def prediction_type(self) -> str:
        return str(self.scheduler_config.get("prediction_type", "epsilon"))

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


def place(comps: Components, device: str | torch.device, dtype: torch.dtype) -> Components:
    """Move to the device; the VAE stays fp32 where its config asks (SDXL's overflows in fp16)."""
    comps.unet.to(device=device, dtype=dtype).eval().requires_grad_(False)
    from .memory import vae_dtype

    comps.vae.to(device=device, dtype=vae_dtype(comps.vae.config, dtype)).eval().requires_grad_(False)
    for enc in comps.text_encoders:
        enc.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return comps


def load_components(
    model: str, *, device: str | torch.device, dtype: torch.dtype, allow_pickle: bool = False, vae: str | None = None
) -> Components:
    """Load `model` (built-in name, local folder, single file or hub id) onto `device`."""
    if model in BUILTIN_MODELS:
        comps = build_random(model, device=device, dtype=dtype)
    else:
        path = Path(model).expanduser()
        if path.is_file() or (not path.exists() and not looks_like_hub_id(model)):
            comps = _load_single_file(model, path, dtype, allow_pickle)
        else:
            folder = resolve_local_or_hub(model, what="model", allow_patterns=HUB_PATTERNS)
            comps = _load_folder(model, folder, dtype)
    if vae:
        comps.vae = _load_vae(vae, dtype)
    return place(comps, device, dtype)


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
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            unet = UNet2DConditionModel.from_pretrained(
                folder, subfolder="unet", torch_dtype=dtype, use_safetensors=True
            )
            vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=dtype, use_safetensors=True)
            encoders: list[nn.Module] = [
                CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", dtype=dtype, use_safetensors=True)
            ]
            tokenizers = [CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")]
            if two_encoders:
                encoders.append(
                    CLIPTextModelWithProjection.from_pretrained(
                        folder, subfolder="text_encoder_2", dtype=dtype, use_safetensors=True
                    )
                )
                tokenizers.append(CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer_2"))
        scheduler_config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(
            f"could not load '{model}' from {folder}: {exc}. Weights must be safetensors (convert .bin/.ckpt first)"
        ) from exc
    return Components(model, unet, vae, encoders, tokenizers, scheduler_config, _family_or_none(unet.config))


def _family_or_none(config: Any) -> Family | None:
    try:
        return detect_family(config)
    except Exception:
        return None


def _load_single_file(model: str, path: Path, dtype: torch.dtype, allow_pickle: bool) -> Components:
    if not path.is_file():
        raise UsageError(f"model file '{model}' does not exist")
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
        _check_weights_only(path)
    try:
        is_xl = suffix == ".safetensors" and is_sdxl_checkpoint(path)
    except Exception as exc:
        raise ModelLoadError(f"'{path}' is not a readable safetensors file: {exc}") from exc
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from .hub import hub_offline

    pipe_cls = StableDiffusionXLPipeline if is_xl else StableDiffusionPipeline
    extra: dict[str, Any] = (
        {} if is_xl else {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pipe = pipe_cls.from_single_file(str(path), torch_dtype=dtype, local_files_only=hub_offline(), **extra)
    except Exception as exc:  # diffusers raises many kinds here; all mean the same to the user
        raise ModelLoadError(
            f"could not load single-file checkpoint '{path}': {exc}. Single files need their model's configs and "
            "tokenizer from the Hugging Face cache; offline, convert it to a diffusers folder once with network"
        ) from exc
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if is_xl else [])
    tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if is_xl else [])
    return Components(
        model, pipe.unet, pipe.vae, encoders, tokenizers, dict(pipe.scheduler.config), _family_or_none(pipe.unet.config)
    )


def _check_weights_only(path: Path) -> None:
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
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise refuse(exc) from None
    except RuntimeError:  # the old (non-zip) format cannot be memory-mapped: load it plainly, still weights-only
        try:
            torch.load(path, map_location="cpu", weights_only=True)
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
