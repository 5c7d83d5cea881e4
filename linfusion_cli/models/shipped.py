"""Files shipped in the package so that a single-file checkpoint loads with no Hugging Face cache and no network.

`configs/<name>/` holds, per family, the component configs of its reference hub repo as they are there (without
weights; SD-1.5's VAE config lacks `scaling_factor` and `force_upcast` there, and so here):
`sd1` stable-diffusion-v1-5, `sd2` stable-diffusion-2-1 (v-prediction), `sdxl` stable-diffusion-xl-base-1.0.
`configs/clip-bpe/` is CLIP's BPE tokenizer (vocab.json, merges.txt), the same for CLIP-L, OpenCLIP-H and
OpenCLIP-bigG; the pad token, in each tokenizer's own config, differs (`!` for OpenCLIP).
No torch here.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from .archs import ARCHS, BUILTIN_MODELS
from .families import Family

CONFIG_ROOT = Path(__file__).parent / "configs"
BPE_DIR = CONFIG_ROOT / "clip-bpe"
BPE_FILES = ("vocab.json", "merges.txt")
# Keys of archs.py configs that are not shapes: the built-in families keep the real files' values for these.
_NOT_SHAPES = frozenset(
    {
        "scaling_factor",
        "force_upcast",
        "vocab_size",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "hidden_act",
        "max_position_embeddings",
    }
)


def _arch_shapes(family: Family, component: str) -> dict[str, Any]:
    """archs.py's shapes for a built-in (tiny) family's component; nothing for the real families."""
    if family.arch not in BUILTIN_MODELS:
        return {}
    arch = ARCHS[family.arch]
    configs: dict[str, Any] = {
        "unet": arch.unet,
        "vae": arch.vae,
        **{f"text_encoder{'' if i == 0 else f'_{i + 1}'}": cfg for i, cfg in enumerate(arch.text_encoders)},
    }
    return {k: v for k, v in configs.get(component, {}).items() if k not in _NOT_SHAPES}


def write_pipeline_folder(family: Family, dest: Path, *, prediction_type: str | None = None) -> Path:
    """A diffusers pipeline folder with every config and tokenizer file of `family` and no weights: what
    `from_single_file(config=...)` reads. The built-in tiny families take their shapes from archs.py."""
    template = CONFIG_ROOT / family.configs
    for src in sorted(template.rglob("*.json")):
        rel = src.relative_to(template)
        data = json.loads(src.read_text())
        if len(rel.parts) > 1:
            data.update(_arch_shapes(family, rel.parts[0]))
            if rel.parts[0] == "scheduler" and prediction_type is not None:
                data["prediction_type"] = prediction_type
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(data, indent=2) + "\n")
    for tokenizer in sorted(p for p in template.iterdir() if p.name.startswith("tokenizer")):
        for name in BPE_FILES:
            shutil.copyfile(BPE_DIR / name, dest / tokenizer.name / name)
    return dest
