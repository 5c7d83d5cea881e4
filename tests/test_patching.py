"""apply_linfusion: patch counts, exact removal, the official checkpoint format in and out, strict loading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from linfusion_cli import apply_linfusion
from linfusion_cli.base.errors import CheckpointError, UnknownArchitectureError
from linfusion_cli.linfusion.attention import LinFusionAttention
from linfusion_cli.models.loading import build_random


def meta_unet(arch: str) -> torch.nn.Module:
    """An SD-shaped UNet from the real config, on the meta device (shapes only, instant)."""
    from diffusers import UNet2DConditionModel

    from linfusion_cli.models.archs import ARCHS

    with torch.device("meta"):
        return UNet2DConditionModel(**ARCHS[arch].unet)


@pytest.mark.parametrize(("arch", "count", "family"), [("sd15", 16, "sd1"), ("sd21", 16, "sd2"), ("sdxl", 70, "sdxl")])
def test_patch_counts_on_real_shapes(arch: str, count: int, family: str) -> None:
    unet = meta_unet(arch)
    patch = apply_linfusion(unet, "random")
    assert len(patch.layers) == count
    assert patch.family is not None and patch.family.key == family
    assert all(isinstance(unet.get_submodule(n), LinFusionAttention) for n in patch.layers)
    if arch == "sdxl":  # LinFusion-XL: projection mid dim = dim / 16
        first = unet.get_submodule(patch.layers[0])
        assert first.to_q_[0].out_features == first.dim // 16


def test_tiny_patch_and_exact_remove() -> None:
    unet = build_random("tiny").unet
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    patch = apply_linfusion(unet, "auto")  # tiny: auto = random LinFusion weights of the right shape
    assert len(patch.layers) == 7
    assert any(k.endswith("attn1.to_q_.0.weight") for k in unet.state_dict())
    patch.remove()
    after = unet.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_submodule_paths_are_kept_for_adapters() -> None:
    unet = build_random("tiny").unet
    patch = apply_linfusion(unet, "init")
    name = patch.layers[0]
    for sub in ("to_q", "to_k", "to_v", "to_out.0"):
        assert isinstance(unet.get_submodule(f"{name}.{sub}"), torch.nn.Linear)


def test_init_copies_attention_and_zeroes_projection_output() -> None:
    unet = build_random("tiny").unet
    original = unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1")
    wq = original.to_q.weight.clone()
    patch = apply_linfusion(unet, "init")
    layer = unet.get_submodule(patch.layers[0])
    assert torch.equal(layer.to_q.weight, wq)
    assert torch.count_nonzero(layer.to_q_[3].weight) == 0 and torch.count_nonzero(layer.to_k_[3].bias) == 0


def test_weights_follow_unet_dtype() -> None:
    unet = build_random("tiny").unet.to(torch.bfloat16)
    patch = apply_linfusion(unet, "random")
    assert all(p.dtype == torch.bfloat16 for m in patch.modules for p in m.parameters())


def write_official(folder: Path, unet: torch.nn.Module, *, reverse: bool = False, seed: int = 1) -> dict:
    """An official-format checkpoint written by hand, as docs/reference.md section 2 describes it."""
    torch.manual_seed(seed)
    names = [n for n, _ in unet.named_modules() if n.endswith(".attn1")]
    entries, tensors = [], {}
    order = list(reversed(names)) if reverse else names
    for i, name in enumerate(order):
        attn = unet.get_submodule(name)
        dim, heads = attn.to_q.in_features, attn.heads
        entries.append({"module_name": name, "dim_n": dim, "heads": heads, "projection_mid_dim": None})
        for proj in ("to_q", "to_k", "to_v"):
            tensors[f"{i}.{proj}.weight"] = torch.randn(dim, dim) * 0.1
        tensors[f"{i}.to_out.0.weight"] = torch.randn(dim, dim) * 0.1
        tensors[f"{i}.to_out.0.bias"] = torch.randn(dim) * 0.1
        for mlp in ("to_q_", "to_k_"):
            tensors[f"{i}.{mlp}.0.weight"] = torch.randn(dim, dim) * 0.1
            tensors[f"{i}.{mlp}.0.bias"] = torch.randn(dim) * 0.1
            tensors[f"{i}.{mlp}.1.weight"] = 1 + torch.randn(dim) * 0.1
            tensors[f"{i}.{mlp}.1.bias"] = torch.randn(dim) * 0.1
            tensors[f"{i}.{mlp}.3.weight"] = torch.randn(dim, dim) * 0.1
            tensors[f"{i}.{mlp}.3.bias"] = torch.randn(dim) * 0.1
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"_class_name": "LinFusion", "modules_list": entries}))
    save_file(tensors, str(folder / "diffusion_pytorch_model.safetensors"))
    return {"entries": entries, "tensors": tensors}


def test_loads_official_format_by_module_name(tmp_path: Path) -> None:
    unet = build_random("tiny").unet
    ckpt = write_official(tmp_path / "ckpt", unet, reverse=True)  # entries in reverse order
    patch = apply_linfusion(unet, str(tmp_path / "ckpt"))
    for i, entry in enumerate(ckpt["entries"]):
        layer = unet.get_submodule(entry["module_name"])
        assert torch.equal(layer.to_q.weight, ckpt["tensors"][f"{i}.to_q.weight"])
        assert torch.equal(layer.to_k_[1].bias, ckpt["tensors"][f"{i}.to_k_.1.bias"])
    assert len(patch.layers) == 7


def test_save_round_trip(tmp_path: Path) -> None:
    unet = build_random("tiny").unet
    patch = apply_linfusion(unet, "random")
    patch.save(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert config["_class_name"] == "LinFusion" and len(config["modules_list"]) == 7
    assert "0.to_q_.3.bias" in load_file(str(tmp_path / "saved" / "diffusion_pytorch_model.safetensors"))
    other = build_random("tiny").unet
    apply_linfusion(other, str(tmp_path / "saved"))
    a, b = unet.state_dict(), other.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("drop_key", "missing"),
        ("extra_key", "unexpected keys"),
        ("bad_shape", "has shape"),
        ("bad_module", "is not an attn1 of this UNet"),
        ("drop_entry", "covers 6 of the UNet's 7"),
        ("garbage_weights", "unreadable safetensors"),
    ],
)
def test_strict_loading_names_the_problem(tmp_path: Path, damage: str, message: str) -> None:
    unet = build_random("tiny").unet
    folder = tmp_path / "ckpt"
    ckpt = write_official(folder, unet)
    tensors, entries = ckpt["tensors"], ckpt["entries"]
    if damage == "drop_key":
        del tensors["3.to_k_.1.weight"]
    elif damage == "extra_key":
        tensors["0.to_q.bias"] = torch.zeros(32)
    elif damage == "bad_shape":
        tensors["2.to_v.weight"] = torch.zeros(5, 5)
    elif damage == "bad_module":
        entries[1]["module_name"] = "down_blocks.9.attentions.0.transformer_blocks.0.attn1"
    elif damage == "drop_entry":
        entries.pop()
        for key in [k for k in tensors if k.startswith("6.")]:
            del tensors[key]
    (folder / "config.json").write_text(json.dumps({"_class_name": "LinFusion", "modules_list": entries}))
    if damage == "garbage_weights":
        (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00" * 100)
    else:
        save_file(tensors, str(folder / "diffusion_pytorch_model.safetensors"))
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    with pytest.raises(CheckpointError, match=message):
        apply_linfusion(unet, str(folder))
    assert all(torch.equal(unet.state_dict()[k], v) for k, v in before.items())  # nothing half-applied


def test_sdxl_checkpoint_on_sd15_says_which_family(tmp_path: Path) -> None:
    sdxl = meta_unet("sdxl")
    patch = apply_linfusion(sdxl, "random")
    entries = [s.as_entry() for s in patch.specs]
    folder = tmp_path / "xl"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "LinFusion", "modules_list": entries}))
    save_file({"0.to_q.weight": torch.zeros(1)}, str(folder / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(CheckpointError, match="SDXL"):
        apply_linfusion(build_random("tiny").unet, str(folder))


def test_unknown_architecture_lists_families() -> None:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        odd = UNet2DConditionModel(
            block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=24,
            norm_num_groups=8,
            layers_per_block=1,
        )
    with pytest.raises(UnknownArchitectureError, match=r"SD-1\.x, SD-2\.x, SDXL.*--linfusion PATH"):
        apply_linfusion(odd, "auto")


def test_pickle_checkpoints_are_not_read(tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "LinFusion", "modules_list": []}))
    (folder / "diffusion_pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(CheckpointError, match="only the official safetensors format"):
        apply_linfusion(build_random("tiny").unet, str(folder))
