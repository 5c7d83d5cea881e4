"""What users bring: a LinFusion checkpoint without feature MLPs (projection_mid_dim -1) loaded as the
official code computes it, local LinFusion paths checked before anything loads, ControlNets of another family
named by their shape, one IP-Adapter per image, --control-stages no longer than the plan, and the IP-Adapter's
reference image keyed by its content."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from linfusion_cli import apply_linfusion
from linfusion_cli.base.errors import CheckpointError
from linfusion_cli.cli.commands import app
from linfusion_cli.core.jobs import resolve_job
from linfusion_cli.core.prepare import RunOptions, plan_for
from linfusion_cli.models.controlnet.kind import check_fits
from linfusion_cli.models.loading import build_random
from linfusion_cli.models.modules import self_attention_layers


def write_identity_checkpoint(folder: Path, unet: torch.nn.Module, mid_dim: object = -1) -> dict:
    """An official-format checkpoint whose layers have no feature MLP: only to_q/to_k/to_v/to_out keys."""
    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(3)
    entries, tensors = [], {}
    for i, (name, attn) in enumerate(self_attention_layers(unet)):
        dim = attn.to_q.in_features
        entries.append({"module_name": name, "dim_n": dim, "heads": int(attn.heads), "projection_mid_dim": mid_dim})
        for key in ("to_q", "to_k", "to_v", "to_out.0"):
            tensors[f"{i}.{key}.weight"] = torch.randn(dim, dim, generator=generator) * dim**-0.5
        tensors[f"{i}.to_out.0.bias"] = torch.randn(dim, generator=generator) * 0.1
    (folder / "config.json").write_text(json.dumps({"_class_name": "LinFusion", "modules_list": entries}))
    save_file(tensors, str(folder / "diffusion_pytorch_model.safetensors"))
    return tensors


def official_identity_attention(x: torch.Tensor, weights: dict, i: int, heads: int) -> torch.Tensor:
    """The official GeneralizedLinearAttention with to_q_ = to_k_ = nn.Identity(), restated: q = W_q (x + x),
    k = W_k (x + x), v = W_v x, then elu + 1 features, k and v scaled by N^-1/2, and the normalised product."""
    batch, tokens, channels = x.shape
    q = (x + x) @ weights[f"{i}.to_q.weight"].T
    k = (x + x) @ weights[f"{i}.to_k.weight"].T
    v = x @ weights[f"{i}.to_v.weight"].T

    def heads_first(t: torch.Tensor) -> torch.Tensor:  # (B, N, C) -> (B h, N, d)
        return t.view(batch, tokens, heads, -1).transpose(1, 2).reshape(batch * heads, tokens, -1)

    q, k, v = (heads_first(t) for t in (q, k, v))
    q, k = F.elu(q) + 1.0, F.elu(k) + 1.0
    z = q @ k.mean(dim=-2, keepdim=True).transpose(-2, -1) + 1e-4
    kv = (k.transpose(-2, -1) * tokens**-0.5) @ (v * tokens**-0.5)
    out = (q @ kv / z).view(batch, heads, tokens, -1).transpose(1, 2).reshape(batch, tokens, channels)
    return out @ weights[f"{i}.to_out.0.weight"].T + weights[f"{i}.to_out.0.bias"]


def test_a_checkpoint_without_feature_mlps_computes_as_the_official_code(tmp_path: Path) -> None:
    unet = build_random("tiny").unet
    weights = write_identity_checkpoint(tmp_path / "ckpt", unet)
    patch = apply_linfusion(unet, str(tmp_path / "ckpt"))
    assert len(patch.layers) == 7
    module = unet.get_submodule(patch.layers[0])
    assert isinstance(module.to_q_, torch.nn.Identity) and not any(".to_q_." in k for k in unet.state_dict())
    x = torch.randn(2, 64, module.dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = module(x)
    torch.testing.assert_close(ours, official_identity_attention(x, weights, 0, module.heads), rtol=1e-4, atol=1e-5)
    patch.save(tmp_path / "again")  # and it saves back in the same format
    saved = json.loads((tmp_path / "again" / "config.json").read_text())["modules_list"]
    assert {entry["projection_mid_dim"] for entry in saved} == {-1}
    apply_linfusion(build_random("tiny").unet, str(tmp_path / "again"))


@pytest.mark.parametrize("mid_dim", [-2, 0, "wide", 1.5])
def test_an_impossible_projection_mid_dim_is_a_checkpoint_error(tmp_path: Path, mid_dim: object) -> None:
    unet = build_random("tiny").unet
    write_identity_checkpoint(tmp_path / "ckpt", unet, mid_dim)
    with pytest.raises(
        CheckpointError, match=r"projection_mid_dim .*null \(the layer's width\), -1 \(no feature MLP\)"
    ):
        apply_linfusion(unet, str(tmp_path / "ckpt"))


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("./no-such-folder", "LinFusion checkpoint './no-such-folder' does not exist"),
        (__file__, "is a file; give the checkpoint's folder"),
    ],
)
def test_a_local_linfusion_path_is_checked_before_the_model_loads(runner, no_model_loads, value, message) -> None:
    result = runner.invoke(app, ["generate", "x", "--model", "tiny", "--linfusion", value])
    assert result.exit_code == 2 and message in result.stderr


def test_an_sdxl_shaped_controlnet_of_other_widths_is_named_so() -> None:
    from linfusion_cli.models.archs import ARCHS

    signature = {"cross_attention_dim": 2048, "addition_embed_type": "text_time", "block_out_channels": (256,)}
    with pytest.raises(Exception, match=r"made for a model shaped like SDXL \(cross-attention width 2048") as caught:
        check_fits("odd-controlnet", signature, ARCHS["sd15"].unet, "SD-1.x")
    assert "unknown family" not in str(caught.value)


def test_a_repeated_ip_adapter_is_an_error(runner, no_model_loads, tmp_path: Path) -> None:
    image = tmp_path / "ref.png"
    Image.new("RGB", (64, 64)).save(image)
    args = [
        "plan",
        "x",
        "--model",
        "tiny",
        "--ip-adapter",
        "tiny",
        "--ip-adapter",
        "tiny:0.5",
        "--ip-image",
        str(image),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "--ip-adapter: takes one IP-Adapter per image; give it once" in result.stderr


def test_control_stages_longer_than_the_plan_are_an_error(runner, no_model_loads) -> None:
    args = ["plan", "x", "--model", "tiny", "--size", "256", "--controlnet", "tiny", "--control-image", "previous"]
    result = runner.invoke(app, [*args, "--control-stages", "0,1,1"])
    assert result.exit_code == 2 and "--control-stages gives 3 scales but the plan has 2 stages" in result.stderr
    assert runner.invoke(app, [*args, "--control-stages", "0,1"]).exit_code == 0


def test_the_ip_image_enters_the_key_by_its_content(tmp_path: Path) -> None:
    def key(image: Path) -> str:
        job = resolve_job(
            {"prompt": "x", "model": "tiny", "size": 256, "ip_adapter": ["tiny:1"], "ip_image": str(image)}
        )
        return plan_for(job, RunOptions(out=tmp_path / "out"), seed=1).key

    first, moved = tmp_path / "a.png", tmp_path / "elsewhere" / "b.png"
    Image.new("RGB", (64, 64), "red").save(first)
    moved.parent.mkdir()
    moved.write_bytes(first.read_bytes())
    assert key(first) == key(moved)  # the same image at another path: the same job
    Image.new("RGB", (64, 64), "blue").save(first)
    assert key(first) != key(moved)  # another image at the same path: another job
