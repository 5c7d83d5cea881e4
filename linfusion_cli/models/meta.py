"""A model built on the `meta` device from its real configs (shapes and dtypes, no weights): what the memory
simulator (engine/simulate) runs the real code on.

Where the configs come from, most specific first: a diffusers folder's own (`--model DIR`), a hub repo's when it is
in the local cache, the built-in tiny models' (archs.py), else the family's shipped configs (models/configs: the
reference repos' files, what single-file checkpoints are loaded with). Nothing is downloaded.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..base.errors import ModelLoadError
from .archs import ARCHS
from .devices import vae_dtype
from .families import FAMILIES, Family, family_or_none
from .hub import model_source
from .loading import Components, byte_level_tokenizer, quiet_libraries
from .shipped import write_pipeline_folder

META = torch.device("meta")
ENCODER_FOLDERS = ("text_encoder", "text_encoder_2")


def meta_components(model: str, family: Family | None, dtype: torch.dtype) -> tuple[Components, str]:
    """The model's components on the meta device, and where their configs came from (for the report)."""
    kind = model_source(model)
    with quiet_libraries():
        if kind == "builtin":
            arch = ARCHS[model]
            configs = {"unet": arch.unet, "vae": arch.vae}
            configs.update({folder: cfg for folder, cfg in zip(ENCODER_FOLDERS, arch.text_encoders, strict=False)})
            return _build(model, configs, dict(arch.scheduler), None, dtype), "built-in configs"
        folder = _config_folder(model, kind)
        if folder is not None:
            return _from_folder(model, folder, dtype), f"the model's own configs ({folder})"
        chosen = family or FAMILIES[0]
        with tempfile.TemporaryDirectory(prefix="linfusion-meta-") as tmp:
            shipped = write_pipeline_folder(chosen, Path(tmp))
            comps = _from_folder(model, shipped, dtype)
        return comps, f"the shipped {chosen.label} configs"


def _config_folder(model: str, kind: str) -> Path | None:
    """A local diffusers folder with the model's configs: the model itself, or its hub snapshot in the cache."""
    if kind == "folder":
        return Path(model).expanduser()
    if kind != "hub":
        return None
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(model, "unet/config.json")
    if not isinstance(cached, str):
        return None
    folder = Path(cached).parent.parent
    return folder if (folder / "vae" / "config.json").is_file() else None


def _read(path: Path) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read the config {path}: {exc}") from exc
    return data


def _from_folder(model: str, folder: Path, dtype: torch.dtype) -> Components:
    from transformers import CLIPTokenizer

    configs = {"unet": _read(folder / "unet" / "config.json"), "vae": _read(folder / "vae" / "config.json")}
    for name in ENCODER_FOLDERS:
        if (folder / name / "config.json").is_file():
            configs[name] = _read(folder / name / "config.json")
    scheduler = _read(folder / "scheduler" / "scheduler_config.json")
    tokenizers = []
    for name in ("tokenizer", "tokenizer_2"):
        if (folder / name).is_dir():
            try:
                tokenizers.append(CLIPTokenizer.from_pretrained(folder, subfolder=name))
            except (OSError, ValueError):
                tokenizers.append(byte_level_tokenizer())
    return _build(model, configs, scheduler, tokenizers, dtype)


def _build(
    model: str, configs: dict[str, Any], scheduler: dict[str, Any], tokenizers: list[Any] | None, dtype: torch.dtype
) -> Components:
    """Every component on the meta device in the run's precisions (the VAE's as a run chooses it)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    unet_config = {k: v for k, v in configs["unet"].items() if not k.startswith("_")}
    vae_config = {k: v for k, v in configs["vae"].items() if not k.startswith("_")}
    family = family_or_none(unet_config)
    two = "text_encoder_2" in configs
    with META:
        unet: Any = UNet2DConditionModel.from_config(unet_config)
        vae: Any = AutoencoderKL.from_config(vae_config)
        encoders: list[Any] = []
        for i, name in enumerate(n for n in ENCODER_FOLDERS if n in configs):
            text_config = CLIPTextConfig(**{k: v for k, v in configs[name].items() if not k.startswith("_")})
            cls = CLIPTextModelWithProjection if (two and i == 1) else CLIPTextModel
            encoders.append(cls(text_config))
    unet.to(dtype=dtype).eval().requires_grad_(False)
    vae.to(dtype=vae_dtype(vae.config, dtype, family)).eval().requires_grad_(False)
    for encoder in encoders:
        encoder.to(dtype=dtype).eval().requires_grad_(False)
    tokenizers = tokenizers or [byte_level_tokenizer() for _ in encoders]
    return Components(model, unet, vae, encoders, tokenizers, scheduler, family)
