"""LyCORIS files (LoHa, LoKr, LoCon with Tucker convs, full diffs, DoRA) in the kohya/A1111 layout LyCORIS writes:
each module's merged weight equals the LyCORIS formula computed here on its own (loops and plain matrix products,
not the code under test), at a multiplier; removing the adapter restores every weight bit for bit; SDXL files name
the SGM UNet's blocks and both text encoders; a network kind this tool cannot merge is a named error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from linfusion_cli.base.errors import UsageError
from linfusion_cli.base.settings import AdapterRef
from linfusion_cli.models.lora.fuse import load

SCALE = 0.7  # the :SCALE of --lora (LyCORIS' multiplier)
G = torch.Generator().manual_seed(7)


def rand(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=G) * 0.1


def kron(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The Kronecker product by blocks: block (i, p) of the result is a[i, p] * b."""
    rows, cols = a.shape[0] * b.shape[0], a.shape[1] * b.shape[1]
    out = torch.zeros(rows, cols, *b.shape[2:])
    for i in range(a.shape[0]):
        for p in range(a.shape[1]):
            out[i * b.shape[0] : (i + 1) * b.shape[0], p * b.shape[1] : (p + 1) * b.shape[1]] = a[i, p] * b
    return out


def tucker(core: torch.Tensor, out_factor: torch.Tensor, in_factor: torch.Tensor) -> torch.Tensor:
    """W[o, i, k, l] = sum over m, n of out_factor[m, o] core[m, n, k, l] in_factor[n, i]."""
    r1, r2, kh, kw = core.shape
    flat = core.permute(2, 3, 0, 1).reshape(kh * kw, r1, r2)  # (k, m, n)
    per_tap = out_factor.T @ flat @ in_factor  # (k, out, in)
    return per_tap.reshape(kh, kw, out_factor.shape[1], in_factor.shape[1]).permute(2, 3, 0, 1)


def dora(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, m: float) -> torch.Tensor:
    """LyCORIS' apply_dora_scale: W + m (magnitude (W + dW) / |W + dW| - W), the norm per input channel."""
    changed = weight + delta
    norms = torch.stack([changed[:, i].norm() for i in range(changed.shape[1])])
    shape = (1, -1) + (1,) * (weight.dim() - 2)
    return weight + m * (magnitude.reshape(shape) * changed / norms.reshape(shape) - weight)


UNET = "down_blocks.0.attentions.0.transformer_blocks.0"


def _cases(
    unet: torch.nn.Module,
) -> tuple[dict[str, torch.Tensor], dict[str, tuple[torch.Tensor, torch.Tensor | None]]]:
    """A file's tensors (kohya/LyCORIS keys) and, per UNet module, the weight (and bias) LyCORIS merges to."""
    w = {name: m.weight.detach().clone() for name, m in unet.named_modules() if hasattr(m, "weight")}
    b = {name: m.bias.detach().clone() for name, m in unet.named_modules() if getattr(m, "bias", None) is not None}
    file: dict[str, torch.Tensor] = {}
    want: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def key(module: str) -> str:
        return "lora_unet_" + module.replace(".", "_")

    # LoHa on a Linear (32 x 32), rank 4, alpha 2
    m = f"{UNET}.attn2.to_k"
    w1a, w1b, w2a, w2b = rand(32, 4), rand(4, 32), rand(32, 4), rand(4, 32)
    file |= {f"{key(m)}.hada_w1_a": w1a, f"{key(m)}.hada_w1_b": w1b, f"{key(m)}.hada_w2_a": w2a}
    file |= {f"{key(m)}.hada_w2_b": w2b, f"{key(m)}.alpha": torch.tensor(2.0)}
    want[m] = (w[m] + SCALE * (2.0 / 4) * (w1a @ w1b) * (w2a @ w2b), None)
    # LoHa on a 3x3 conv, flat (not Tucker): w*_b (r, in*9); no alpha: scale 1
    m = "down_blocks.0.resnets.0.conv1"
    w1a, w1b, w2a, w2b = rand(32, 2), rand(2, 32 * 9), rand(32, 2), rand(2, 32 * 9)
    file |= {
        f"{key(m)}.hada_w1_a": w1a,
        f"{key(m)}.hada_w1_b": w1b,
        f"{key(m)}.hada_w2_a": w2a,
        f"{key(m)}.hada_w2_b": w2b,
    }
    want[m] = (w[m] + SCALE * ((w1a @ w1b) * (w2a @ w2b)).reshape(32, 32, 3, 3), None)
    # LoHa Tucker on a 3x3 conv: t (r, r, 3, 3), w*_a (r, out), w*_b (r, in)
    m = "down_blocks.0.resnets.0.conv2"
    t1, t2, w1a, w1b, w2a, w2b = rand(3, 3, 3, 3), rand(3, 3, 3, 3), rand(3, 32), rand(3, 32), rand(3, 32), rand(3, 32)
    file |= {f"{key(m)}.hada_t1": t1, f"{key(m)}.hada_t2": t2, f"{key(m)}.hada_w1_a": w1a, f"{key(m)}.hada_w1_b": w1b}
    file |= {f"{key(m)}.hada_w2_a": w2a, f"{key(m)}.hada_w2_b": w2b, f"{key(m)}.alpha": torch.tensor(6.0)}
    want[m] = (w[m] + SCALE * 2.0 * tucker(t1, w1a, w1b) * tucker(t2, w2a, w2b), None)
    # LoKr on a Linear (256 x 32): w1 whole (4 x 4), w2 = w2a (64 x 2) @ w2b (2 x 8), alpha 1: scale 1/2
    m = f"{UNET}.ff.net.0.proj"
    w1, w2a, w2b = rand(4, 4), rand(64, 2), rand(2, 8)
    file |= {
        f"{key(m)}.lokr_w1": w1,
        f"{key(m)}.lokr_w2_a": w2a,
        f"{key(m)}.lokr_w2_b": w2b,
        f"{key(m)}.alpha": torch.tensor(1.0),
    }
    want[m] = (w[m] + SCALE * 0.5 * kron(w1, w2a @ w2b), None)
    # LoKr on a 3x3 conv with both factors whole and an alpha: the scale is 1 whatever alpha says
    m = "down_blocks.0.downsamplers.0.conv"
    w1, w2 = rand(4, 8), rand(8, 4, 3, 3)
    file |= {f"{key(m)}.lokr_w1": w1, f"{key(m)}.lokr_w2": w2, f"{key(m)}.alpha": torch.tensor(9.0)}
    want[m] = (w[m] + SCALE * kron(w1, w2), None)
    # LoKr on a 3x3 conv, w1 = w1a @ w1b, w2 flat (b, d*9) from w2a @ w2b; rank 2 from w1's halves, alpha 4
    m = "mid_block.resnets.0.conv1"
    w1a, w1b, w2a, w2b = rand(8, 2), rand(2, 8), rand(8, 2), rand(2, 8 * 9)
    file |= {f"{key(m)}.lokr_w1_a": w1a, f"{key(m)}.lokr_w1_b": w1b, f"{key(m)}.lokr_w2_a": w2a}
    file |= {f"{key(m)}.lokr_w2_b": w2b, f"{key(m)}.alpha": torch.tensor(4.0)}
    want[m] = (w[m] + SCALE * 2.0 * kron(w1a @ w1b, (w2a @ w2b).reshape(8, 8, 3, 3)), None)
    # LoKr Tucker on a 3x3 conv: w2 from t2 (r, r, 3, 3), w2_a (r, b), w2_b (r, d); rank from w2_b's rows
    m = "mid_block.resnets.0.conv2"
    w1, t2, w2a, w2b = rand(8, 8), rand(2, 2, 3, 3), rand(2, 8), rand(2, 8)
    file |= {f"{key(m)}.lokr_w1": w1, f"{key(m)}.lokr_t2": t2, f"{key(m)}.lokr_w2_a": w2a, f"{key(m)}.lokr_w2_b": w2b}
    file |= {f"{key(m)}.alpha": torch.tensor(1.0)}
    want[m] = (w[m] + SCALE * 0.5 * kron(w1, tucker(t2, w2a, w2b)), None)
    # LoCon on a 3x3 conv: down (r, in, 3, 3), up (out, r, 1, 1)
    m = "up_blocks.0.resnets.0.conv1"
    down, up = rand(4, w[m].shape[1], 3, 3), rand(w[m].shape[0], 4, 1, 1)
    file |= {f"{key(m)}.lora_down.weight": down, f"{key(m)}.lora_up.weight": up, f"{key(m)}.alpha": torch.tensor(8.0)}
    want[m] = (w[m] + SCALE * 2.0 * (up.flatten(1) @ down.flatten(1)).reshape(w[m].shape), None)
    # LoCon Tucker: lora_mid (r, r, 3, 3) between down (r, in, 1, 1) and up (out, r, 1, 1)
    m = "up_blocks.0.resnets.0.conv2"
    out_ch, in_ch = w[m].shape[:2]
    down, mid, up = rand(4, in_ch, 1, 1), rand(4, 4, 3, 3), rand(out_ch, 4, 1, 1)
    file |= {f"{key(m)}.lora_down.weight": down, f"{key(m)}.lora_mid.weight": mid, f"{key(m)}.lora_up.weight": up}
    want[m] = (w[m] + SCALE * tucker(mid, up.flatten(1).T, down.flatten(1)), None)
    # full diff, with its bias
    m = f"{UNET}.attn2.to_out.0"
    diff, diff_b = rand(32, 32), rand(32)
    file |= {f"{key(m)}.diff": diff, f"{key(m)}.diff_b": diff_b}
    want[m] = (w[m] + SCALE * diff, b[m] + SCALE * diff_b)
    # DoRA on a LoRA (Linear) and on a LoHa (conv)
    m = f"{UNET}.attn1.to_v"
    down, up, mag = rand(4, 32), rand(32, 4), rand(1, 32).abs() + 1
    file |= {f"{key(m)}.lora_down.weight": down, f"{key(m)}.lora_up.weight": up, f"{key(m)}.alpha": torch.tensor(2.0)}
    file |= {f"{key(m)}.dora_scale": mag}
    want[m] = (dora(w[m], 0.5 * up @ down, mag, SCALE), None)
    m = "down_blocks.0.attentions.0.proj_in"
    w1a, w1b, w2a, w2b, mag = rand(32, 2), rand(2, 32), rand(32, 2), rand(2, 32), rand(1, 32, 1, 1).abs() + 1
    file |= {
        f"{key(m)}.hada_w1_a": w1a,
        f"{key(m)}.hada_w1_b": w1b,
        f"{key(m)}.hada_w2_a": w2a,
        f"{key(m)}.hada_w2_b": w2b,
    }
    file |= {f"{key(m)}.dora_scale": mag}
    want[m] = (dora(w[m], ((w1a @ w1b) * (w2a @ w2b)).reshape(32, 32, 1, 1), mag, SCALE), None)
    return file, want


@pytest.fixture(scope="module")
def tiny():
    from linfusion_cli.models.loading import build_random

    return build_random("tiny")


def test_each_lycoris_kind_merges_to_the_librarys_formula_and_comes_off_exactly(tiny, tmp_path: Path) -> None:
    unet = tiny.unet
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    file, want = _cases(unet)
    path = tmp_path / "lyco.safetensors"
    save_file(file, str(path))
    adapter = load(tiny, AdapterRef(str(path), SCALE))
    try:
        kinds = adapter.describe()["networks"]
        assert kinds == {"LoHa": 3, "LoKr": 4, "LoRA": 2, "full": 1, "LoRA DoRA": 1, "LoHa DoRA": 1}
        for module, (weight, bias) in want.items():
            merged = unet.get_submodule(module)
            assert torch.allclose(merged.weight, weight, atol=1e-6, rtol=1e-5), module
            if bias is not None:
                assert torch.allclose(merged.bias, bias, atol=1e-6), module
    finally:
        adapter.remove()
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())


def _sgm(module: str, config: dict) -> str:
    """A diffusers UNet module's name in the SGM UNet kohya's SDXL trainer uses (`input_blocks.4.1...`)."""
    from layouts import unet_to_ldm

    (name,) = unet_to_ldm({f"{module}.weight": torch.zeros(1)}, config)
    return name.removeprefix("model.diffusion_model.").removesuffix(".weight")


def test_sdxl_files_name_sgm_blocks_and_both_text_encoders(tmp_path: Path) -> None:
    from linfusion_cli.models.loading import build_random

    comps = build_random("tiny-sdxl")
    module = next(
        n for n, _ in comps.unet.named_modules() if n.startswith("down_blocks.1.") and n.endswith("attn2.to_q")
    )
    target = comps.unet.get_submodule(module)
    clip_l, clip_g = (getattr(e, "text_model", e) for e in comps.text_encoders)  # SDXL's second keeps text_model
    te1 = clip_l.get_submodule("encoder.layers.0.mlp.fc1")
    te2 = clip_g.get_submodule("encoder.layers.0.self_attn.out_proj")
    before = [m.weight.detach().clone() for m in (target, te1, te2)]
    out_f, in_f = target.weight.shape
    kohya = "lora_unet_" + _sgm(module, dict(comps.unet.config)).replace(".", "_")
    assert "input_blocks" in kohya
    w1a, w1b, w2a, w2b = rand(out_f, 2), rand(2, in_f), rand(out_f, 2), rand(2, in_f)
    d1, u1 = rand(2, te1.weight.shape[1]), rand(te1.weight.shape[0], 2)
    w1, w2 = rand(2, 2), rand(te2.weight.shape[0] // 2, te2.weight.shape[1] // 2)
    file = {
        f"{kohya}.hada_w1_a": w1a, f"{kohya}.hada_w1_b": w1b, f"{kohya}.hada_w2_a": w2a, f"{kohya}.hada_w2_b": w2b,
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": d1,
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": u1,
        "lora_te2_text_model_encoder_layers_0_self_attn_out_proj.lokr_w1": w1,
        "lora_te2_text_model_encoder_layers_0_self_attn_out_proj.lokr_w2": w2,
    }  # fmt: skip
    save_file(file, str(tmp_path / "xl.safetensors"))
    adapter = load(comps, AdapterRef(str(tmp_path / "xl.safetensors"), 1.0))
    assert torch.allclose(target.weight, before[0] + (w1a @ w1b) * (w2a @ w2b), atol=1e-6)
    assert torch.allclose(te1.weight, before[1] + u1 @ d1, atol=1e-6)
    assert torch.allclose(te2.weight, before[2] + kron(w1, w2), atol=1e-6)
    adapter.remove()
    assert all(torch.equal(m.weight, w) for m, w in zip((target, te1, te2), before, strict=True))


@pytest.mark.parametrize(
    ("parts", "message"),
    [
        ({"oft_blocks": torch.zeros(4, 8, 8)}, "is part of OFT, a network kind this tool cannot merge"),
        ({"hada_w1_a": torch.zeros(32, 2), "wat": torch.zeros(1)}, ".wat is not a part this tool knows"),
        ({"hada_w1_a": torch.zeros(32, 2)}, "lacks its part hada_w1_b"),
        ({"lora_down.weight": torch.zeros(2, 32), "lokr_w1": torch.zeros(2, 2)}, "has parts of LoRA and LoKr"),
    ],
)
def test_what_cannot_be_merged_is_named(tiny, tmp_path: Path, parts, message) -> None:
    prefix = "lora_unet_" + f"{UNET}.attn2.to_q".replace(".", "_")
    save_file({f"{prefix}.{k}": v for k, v in parts.items()}, str(tmp_path / "odd.safetensors"))
    with pytest.raises(UsageError, match=message.replace(".", r"\.")):
        load(tiny, AdapterRef(str(tmp_path / "odd.safetensors")))


def test_a_loha_file_runs_from_the_command_line(runner, tmp_path: Path) -> None:
    from linfusion_cli.cli.commands import app

    module = "lora_unet_" + f"{UNET}.attn2.to_k".replace(".", "_")
    parts = {"hada_w1_a": rand(32, 2), "hada_w1_b": rand(2, 32), "hada_w2_a": rand(32, 2), "hada_w2_b": rand(2, 32)}
    save_file({f"{module}.{k}": v for k, v in parts.items()}, str(tmp_path / "loha.safetensors"))
    args = ["generate", "a fox", "--model", "tiny", "--size", "64", "--steps", "1", "--seed", "1", "-q", "--json"]
    result = runner.invoke(app, [*args, "--lora", str(tmp_path / "loha.safetensors:0.5"), "--out", str(tmp_path)])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    (lora,) = report["adapters"]
    assert lora["networks"] == {"LoHa": 1} and lora["name"] == "loha" and len(lora["hash"]) == 12
