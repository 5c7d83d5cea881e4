"""Model layouts as users bring them, built in a tmp dir in seconds: tiny channel sizes, real everything else.

- `build_repo`: a diffusers repo folder file for file as the hub has it (model_index.json, component folders,
  the shipped real configs, including the keys they lack, CLIP's real BPE tokenizer, fp32 weights plus
  `.fp16.` variant files). The fp16 files hold *different* random weights, so a test can tell which were read.
- `into_hub_cache`: that folder as the Hugging Face cache holds a download (blobs, snapshots/<rev>, refs/main).
- `write_single_file`: one A1111/Civitai-style .safetensors with the original LDM key names, made with the
  mappings of diffusers' own scripts (convert_diffusers_to_original_stable_diffusion.py and
  convert_diffusers_to_original_sdxl.py, Apache-2.0), their fixed block loops driven by the config instead.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from linfusion_cli.models.families import FAMILIES
from linfusion_cli.models.shipped import write_pipeline_folder

FAMILY = {f.key: f for f in FAMILIES}
WEIGHTS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model"}
State = dict[str, torch.Tensor]


def _text_state(model: Any) -> State:
    """A CLIP text model's weights under the names the real files use (`text_model.` first: newer transformers
    flattens CLIPTextModel, the files on the hub predate that)."""
    state = model.state_dict()
    if hasattr(model, "text_model"):
        return dict(state)
    return {f"text_model.{k}": v for k, v in state.items()}


def build_components(folder: Path, seed: int) -> dict[str, State]:
    """Seeded random weights for every component whose config is in `folder`, as fp32 state dicts."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    index = json.loads((folder / "model_index.json").read_text())
    states: dict[str, State] = {}
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        states["unet"] = UNet2DConditionModel.from_config(
            json.loads((folder / "unet/config.json").read_text())
        ).state_dict()
        states["vae"] = AutoencoderKL.from_config(json.loads((folder / "vae/config.json").read_text())).state_dict()
        for name in ("text_encoder", "text_encoder_2"):
            if name in index:
                config = CLIPTextConfig(**json.loads((folder / name / "config.json").read_text()))
                cls = CLIPTextModelWithProjection if index[name][1] == "CLIPTextModelWithProjection" else CLIPTextModel
                states[name] = _text_state(cls(config))
    return {c: {k: v.detach().clone().contiguous() for k, v in s.items()} for c, s in states.items()}


def build_repo(
    family_key: str, dest: Path, *, prediction_type: str | None = None, variants: bool = True, seed: int = 0
) -> dict[str, State]:
    """A hub-shaped repo for a tiny family (its real family's configs with tiny shapes); returns the fp32 weights."""
    write_pipeline_folder(FAMILY[family_key], dest, prediction_type=prediction_type)
    states = build_components(dest, seed)
    half = build_components(dest, seed + 1) if variants else {}
    for component, state in states.items():
        name = WEIGHTS.get(component, "model")
        save_file(state, str(dest / component / f"{name}.safetensors"), metadata={"format": "pt"})
        if variants:
            fp16 = {k: v.half() for k, v in half[component].items()}
            save_file(fp16, str(dest / component / f"{name}.fp16.safetensors"), metadata={"format": "pt"})
    if variants:
        states.update({f"{c}.fp16": {k: v.half() for k, v in s.items()} for c, s in half.items()})
    return states


def into_hub_cache(folder: Path, cache: Path, repo_id: str, revision: str = "0" * 40) -> Path:
    """Lay `folder` out as huggingface_hub's cache has a downloaded repo; returns the snapshot folder."""
    root = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = root / "snapshots" / revision
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = path.read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / path.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path("../" * len(link.relative_to(root).parts[:-1])) / "blobs" / blob.name)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(revision)
    return snapshot


# --- diffusers -> original (LDM) key names ---------------------------------------------------------------------

_UNET_MAP = [  # (stable-diffusion, HF Diffusers), whole keys
    ("time_embed.0.weight", "time_embedding.linear_1.weight"),
    ("time_embed.0.bias", "time_embedding.linear_1.bias"),
    ("time_embed.2.weight", "time_embedding.linear_2.weight"),
    ("time_embed.2.bias", "time_embedding.linear_2.bias"),
    ("input_blocks.0.0.weight", "conv_in.weight"),
    ("input_blocks.0.0.bias", "conv_in.bias"),
    ("out.0.weight", "conv_norm_out.weight"),
    ("out.0.bias", "conv_norm_out.bias"),
    ("out.2.weight", "conv_out.weight"),
    ("out.2.bias", "conv_out.bias"),
    ("label_emb.0.0.weight", "add_embedding.linear_1.weight"),
    ("label_emb.0.0.bias", "add_embedding.linear_1.bias"),
    ("label_emb.0.2.weight", "add_embedding.linear_2.weight"),
    ("label_emb.0.2.bias", "add_embedding.linear_2.bias"),
]
_UNET_RESNET = [
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
    ("emb_layers.1", "time_emb_proj"),
    ("skip_connection", "conv_shortcut"),
]


def _unet_layers(config: dict[str, Any]) -> list[tuple[str, str]]:
    blocks, per = len(config["block_out_channels"]), config["layers_per_block"]
    down_attn = [t.startswith("CrossAttn") for t in config["down_block_types"]]
    up_attn = [t.startswith("CrossAttn") for t in config["up_block_types"]]
    layers = []
    for i in range(blocks):
        for j in range(per):
            layers.append((f"input_blocks.{(per + 1) * i + j + 1}.0.", f"down_blocks.{i}.resnets.{j}."))
            if down_attn[i]:
                layers.append((f"input_blocks.{(per + 1) * i + j + 1}.1.", f"down_blocks.{i}.attentions.{j}."))
        for j in range(per + 1):
            layers.append((f"output_blocks.{(per + 1) * i + j}.0.", f"up_blocks.{i}.resnets.{j}."))
            if up_attn[i]:
                layers.append((f"output_blocks.{(per + 1) * i + j}.1.", f"up_blocks.{i}.attentions.{j}."))
        if i < blocks - 1:
            layers.append((f"input_blocks.{(per + 1) * (i + 1)}.0.op.", f"down_blocks.{i}.downsamplers.0.conv."))
            up_index = f"output_blocks.{(per + 1) * i + per}.{2 if up_attn[i] else 1}."
            layers.append((up_index, f"up_blocks.{i}.upsamplers.0."))
    layers.append(("middle_block.1.", "mid_block.attentions.0."))
    layers += [(f"middle_block.{2 * j}.", f"mid_block.resnets.{j}.") for j in range(2)]
    return layers


def unet_to_ldm(state: State, config: dict[str, Any]) -> State:
    mapping = {k: k for k in state}
    for sd_name, hf_name in _UNET_MAP:
        if hf_name in mapping:
            mapping[hf_name] = sd_name
    for k, v in mapping.items():
        if "resnets" in k:
            for sd_part, hf_part in _UNET_RESNET:
                v = v.replace(hf_part, sd_part)
        for sd_part, hf_part in _unet_layers(config):
            v = v.replace(hf_part, sd_part)
        mapping[k] = v
    return {"model.diffusion_model." + v: state[k] for k, v in mapping.items()}


def vae_to_ldm(state: State, config: dict[str, Any]) -> State:
    blocks, per = len(config["block_out_channels"]), config["layers_per_block"]
    pairs = [
        ("nin_shortcut", "conv_shortcut"),
        ("norm_out", "conv_norm_out"),
        ("mid.attn_1.", "mid_block.attentions.0."),
    ]
    for i in range(blocks):
        pairs += [(f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}.") for j in range(per)]
        if i < blocks - 1:
            pairs.append((f"down.{i}.downsample.", f"down_blocks.{i}.downsamplers.0."))
            pairs.append((f"up.{blocks - 1 - i}.upsample.", f"up_blocks.{i}.upsamplers.0."))
        pairs += [
            (f"decoder.up.{blocks - 1 - i}.block.{j}.", f"decoder.up_blocks.{i}.resnets.{j}.") for j in range(per + 1)
        ]
    pairs += [(f"mid.block_{i + 1}.", f"mid_block.resnets.{i}.") for i in range(2)]
    attn = [("norm.", "group_norm."), ("q.", "to_q."), ("k.", "to_k."), ("v.", "to_v."), ("proj_out.", "to_out.0.")]
    out: State = {}
    for key, value in state.items():
        for sd_part, hf_part in pairs:
            key = key.replace(hf_part, sd_part)
        if "mid.attn_1." in key:
            for sd_part, hf_part in attn:
                key = key.replace(hf_part, sd_part)
            if value.ndim == 2:  # linear in diffusers, 1x1 conv in the original
                value = value.reshape(*value.shape, 1, 1)
        out["first_stage_model." + key] = value
    return out


_OPENCLIP = [  # (original, HF) name pieces, from diffusers' DIFFUSERS_TO_LDM_MAPPING["openclip"]
    ("transformer.resblocks.", "text_model.encoder.layers."),
    ("ln_1", "layer_norm1"),
    ("ln_2", "layer_norm2"),
    (".c_fc.", ".fc1."),
    (".c_proj.", ".fc2."),
    (".attn.out_proj", ".self_attn.out_proj"),
]
_OPENCLIP_WHOLE = {
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}


def openclip_to_ldm(state: State, prefix: str) -> State:
    """OpenCLIP names: q/k/v fused into in_proj, the projection stored transposed."""
    out: State = {}
    for key, value in state.items():
        if key in _OPENCLIP_WHOLE:
            out[prefix + _OPENCLIP_WHOLE[key]] = value
        elif key == "text_projection.weight":
            out[prefix + "text_projection"] = value.T.contiguous()
        elif ".self_attn.q_proj." in key:
            kind = key.rsplit(".", 1)[1]
            fused = torch.cat([state[key.replace("q_proj", p)] for p in ("q_proj", "k_proj", "v_proj")])
            base = key.split(".self_attn.")[0]
            for sd_part, hf_part in _OPENCLIP:
                base = base.replace(hf_part, sd_part)
            out[f"{prefix}{base}.attn.in_proj_{kind}"] = fused
        elif ".self_attn.k_proj." in key or ".self_attn.v_proj." in key or key.endswith("position_ids"):
            continue
        else:
            for sd_part, hf_part in _OPENCLIP:
                key = key.replace(hf_part, sd_part)
            out[prefix + key] = value
    return out


def write_single_file(repo: Path, states: dict[str, State], dest: Path, *, flat_clip: bool = False) -> Path:
    """The repo's fp32 weights as one original-format .safetensors (SD-1.x: CLIP-L under cond_stage_model.
    transformer; SD-2.x: OpenCLIP under cond_stage_model.model; SDXL: conditioner.embedders.0 and .1).
    flat_clip: CLIP-L under transformers 5's flattened names, as diffusers' script writes it from a folder that
    transformers 5 saved."""
    if flat_clip:
        states = {
            **states,
            "text_encoder": {k.removeprefix("text_model."): v for k, v in states["text_encoder"].items()},
        }
    unet_config = json.loads((repo / "unet/config.json").read_text())
    vae_config = json.loads((repo / "vae/config.json").read_text())
    tensors = {**unet_to_ldm(states["unet"], unet_config), **vae_to_ldm(states["vae"], vae_config)}
    text = json.loads((repo / "text_encoder/config.json").read_text())
    if "text_encoder_2" in states:
        tensors.update({f"conditioner.embedders.0.transformer.{k}": v for k, v in states["text_encoder"].items()})
        tensors.update(openclip_to_ldm(states["text_encoder_2"], "conditioner.embedders.1.model."))
    elif text["hidden_act"] == "gelu":  # OpenCLIP-H
        tensors.update(openclip_to_ldm(states["text_encoder"], "cond_stage_model.model."))
    else:
        tensors.update({f"cond_stage_model.transformer.{k}": v for k, v in states["text_encoder"].items()})
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(dest))
    return dest


def copy_repo(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest
