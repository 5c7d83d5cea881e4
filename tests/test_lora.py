"""LoRA: fused into the weights, removed bit for bit, the same before or after LinFusion, read from the formats
users download, switched between batch jobs without reloading the model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from linfusion_cli.base.settings import AdapterRef, EngineSpec
from linfusion_cli.cli.commands import app
from linfusion_cli.linfusion.patching import apply_linfusion
from linfusion_cli.models.adapters import engine_spec
from linfusion_cli.models.loading import build_random
from linfusion_cli.models.lora.fuse import load as load_lora
from linfusion_cli.models.lora.fuse import tiny_lora

FAST = ["--model", "tiny", "--size", "256", "--steps", "3", "--seed", "11"]


def unet_out(comps) -> torch.Tensor:
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    text = torch.randn(1, 77, comps.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return comps.unet(x, torch.tensor([500]), encoder_hidden_states=text, return_dict=False)[0]


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_lora_before_or_after_linfusion_is_the_same_model() -> None:
    first = build_random("tiny")
    apply_linfusion(first.unet, "random")
    load_lora(first, AdapterRef("tiny", 0.8))

    second = build_random("tiny")
    lora = load_lora(second, AdapterRef("tiny", 0.8))
    patch = apply_linfusion(second.unet, "random")
    assert torch.equal(unet_out(first), unet_out(second))
    assert lora.attn1_layers == len(patch.layers)  # every attn1 carries its delta on LinFusion's projections

    plain = build_random("tiny")
    apply_linfusion(plain.unet, "random")
    assert not torch.allclose(unet_out(plain), unet_out(first), atol=1e-4)  # and the LoRA does something


def test_remove_restores_every_weight_bit_for_bit() -> None:
    comps = build_random("tiny")
    patch = apply_linfusion(comps.unet, "random")
    before = snapshot(comps.unet)
    lora = load_lora(comps, AdapterRef("tiny", 1.5))
    assert any(not torch.equal(v, before[k]) for k, v in comps.unet.state_dict().items())
    lora.remove()
    assert all(torch.equal(v, before[k]) for k, v in comps.unet.state_dict().items())
    patch.remove()  # LinFusion can still come off cleanly afterwards
    assert not any("to_q_" in k for k in comps.unet.state_dict())


def _kohya_file(comps, path: Path, scale_alpha: float = 2.0) -> dict[str, torch.Tensor]:
    """A kohya/A1111-style file (lora_unet_* keys, alphas) from the tiny LoRA's pairs, plus a text encoder pair."""
    tensors: dict[str, torch.Tensor] = {}
    for module, pair in tiny_lora(comps.unet).items():
        key = "lora_unet_" + module.replace(".", "_")
        tensors[f"{key}.lora_down.weight"] = pair.down
        tensors[f"{key}.lora_up.weight"] = pair.up
        tensors[f"{key}.alpha"] = torch.tensor(scale_alpha)
    q_proj = comps.text_encoders[0].get_submodule("encoder.layers.0.self_attn.q_proj")
    gen = torch.Generator().manual_seed(5)
    tensors["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"] = torch.randn(
        4, q_proj.in_features, generator=gen
    )
    tensors["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"] = torch.randn(
        q_proj.out_features, 4, generator=gen
    )
    tensors["lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha"] = torch.tensor(scale_alpha)
    save_file(tensors, str(path))
    return tensors


def _peft_file(comps, path: Path) -> None:
    """The same UNet pairs in diffusers/PEFT layout (alpha folded into B, since PEFT files carry no alphas)."""
    tensors = {}
    for module, pair in tiny_lora(comps.unet).items():
        tensors[f"unet.{module}.lora_A.weight"] = pair.down
        tensors[f"unet.{module}.lora_B.weight"] = pair.up * (2.0 / pair.down.shape[0])
    save_file(tensors, str(path))


def test_kohya_and_diffusers_files_fuse_the_same_deltas(tmp_path: Path) -> None:
    comps = build_random("tiny")
    kohya, peft = tmp_path / "style.safetensors", tmp_path / "folder" / "pytorch_lora_weights.safetensors"
    peft.parent.mkdir()
    _kohya_file(comps, kohya)
    _peft_file(comps, peft)
    encoder_before = snapshot(comps.text_encoders[0])

    a = load_lora(comps, AdapterRef(str(kohya), 0.5))
    from_kohya = snapshot(comps.unet)
    assert any(not torch.equal(v, encoder_before[k]) for k, v in comps.text_encoders[0].state_dict().items())
    a.remove()
    b = load_lora(comps, AdapterRef(str(peft.parent), 0.5))  # a folder: diffusers' file name is found
    from_peft = snapshot(comps.unet)
    b.remove()
    assert all(torch.allclose(from_kohya[k], from_peft[k], atol=1e-6) for k in from_kohya)
    assert a.describe()["hash"] and len(a.describe()["hash"]) == 12


def test_cli_lora_changes_the_image_and_is_recorded(runner, tmp_path: Path) -> None:
    plain = runner.invoke(app, ["generate", "a fox", *FAST, "--out", str(tmp_path), "--json", "--name", "plain"])
    tiny = runner.invoke(
        app, ["generate", "a fox", *FAST, "--lora", "tiny:0.8", "--out", str(tmp_path), "--json", "--name", "lora"]
    )
    assert plain.exit_code == 0 and tiny.exit_code == 0, tiny.stderr
    report = json.loads(tiny.stdout)
    assert report["settings"]["lora"] == ["tiny:0.8"]
    assert report["adapters"][0]["kind"] == "lora" and report["adapters"][0]["attn1_layers"] == 7
    with Image.open(json.loads(plain.stdout)["path"]) as a, Image.open(report["path"]) as b:
        assert a.tobytes() != b.tobytes()
        assert "a fox <lora:tiny:0.8>" in b.text["parameters"]


def test_keys_that_match_nothing_are_an_error(runner, tmp_path: Path) -> None:
    bad = tmp_path / "other.safetensors"
    save_file(
        {
            "lora_unet_no_such_block_to_q.lora_down.weight": torch.zeros(4, 8),
            "lora_unet_no_such_block_to_q.lora_up.weight": torch.zeros(8, 4),
        },
        str(bad),
    )
    result = runner.invoke(app, ["generate", "x", *FAST, "--lora", str(bad), "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "match nothing in this model" in result.stderr and "another model family" in result.stderr
    assert "Traceback" not in result.stderr


def test_pickled_lora_is_refused(runner, tmp_path: Path) -> None:
    bad = tmp_path / "old.bin"
    bad.write_bytes(b"not really a pickle")
    result = runner.invoke(app, ["generate", "x", *FAST, "--lora", str(bad), "--out", str(tmp_path)])
    assert result.exit_code == 2 and "only .safetensors" in result.stderr


def test_batch_switches_loras_without_reloading_the_model(runner, tmp_path: Path, model_loads) -> None:

    loads = model_loads
    jobs = tmp_path / "jobs.yaml"
    jobs.write_text(
        "defaults: {model: tiny, size: 256, steps: 3}\n"
        "jobs:\n"
        "  - {prompt: a fox, seed: 11, name: none1}\n"
        "  - {prompt: a fox, seed: 11, name: lora, lora: 'tiny:0.8'}\n"
        "  - {prompt: a fox, seed: 11, name: none2}\n"
    )
    result = runner.invoke(app, ["batch", str(jobs), "--out", str(tmp_path / "out"), "--json"])
    assert result.exit_code == 0, result.stderr
    assert len(loads) == 1
    paths = {Path(json.loads(line)["path"]).stem: json.loads(line)["path"] for line in result.stdout.splitlines()}
    assert sorted(paths) == ["lora", "none1", "none2"]
    with Image.open(paths["none1"]) as a, Image.open(paths["none2"]) as c, Image.open(paths["lora"]) as b:
        assert a.tobytes() == c.tobytes()  # removed between jobs: bit for bit as before
        assert a.tobytes() != b.tobytes()


def test_engine_spec_reads_refs() -> None:
    from linfusion_cli.core.jobs import resolve_job

    job = resolve_job({"prompt": "p", "model": "tiny", "lora": ["a.safetensors:0.5", "tiny"]})
    spec = engine_spec(job)
    assert spec.refs("loras") == (AdapterRef("a.safetensors", 0.5), AdapterRef("tiny", 1.0))
    assert spec.base() == EngineSpec("tiny")
    assert AdapterRef.parse("C:/loras/x.safetensors") == AdapterRef("C:/loras/x.safetensors")
    with pytest.raises(ValueError):
        AdapterRef.parse("x.safetensors:99")


def test_a_lora_for_another_family_exits_2_before_the_model_loads(runner, tmp_path: Path, monkeypatch) -> None:
    """A LoRA made for the SDXL-shaped model (text width 64) on the SD-1.x-shaped one (32): refused by its
    header alone, naming both families, and no model is loaded."""
    from linfusion_cli.engine import pipeline

    xl = build_random("tiny-sdxl")
    path = tmp_path / "xl-style.safetensors"
    _kohya_file(xl, path)

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(pipeline, "load_components", no_load)
    result = runner.invoke(app, ["generate", "x", *FAST, "--lora", str(path), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2, result.stderr
    assert "made for tiny SDXL-shaped (cross-attention width 64)" in result.stderr
    assert "tiny SD-1.x-shaped (cross-attention width 32)" in result.stderr


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("missing.safetensors", "LoRA 'missing.safetensors' does not exist"),
        ("tiny:abc", "--lora tiny:abc: the scale 'abc' is not a number"),
        ("BAD", "is not a readable safetensors file"),
        ("OLD.bin", "only .safetensors files are read, whatever --allow-pickle says"),
    ],
)
def test_lora_mistakes_exit_2_before_the_model_loads(runner, tmp_path: Path, monkeypatch, spec, message) -> None:
    from linfusion_cli.engine import pipeline

    (tmp_path / "bad.safetensors").write_bytes(b"garbage, not a safetensors header")
    (tmp_path / "old.bin").write_bytes(b"a pickle")
    spec = {"BAD": str(tmp_path / "bad.safetensors"), "OLD.bin": str(tmp_path / "old.bin")}.get(spec, spec)

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(pipeline, "load_components", no_load)
    result = runner.invoke(
        app, ["generate", "x", *FAST, "--lora", spec, "--allow-pickle", "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 2, result.stderr
    assert message in result.stderr


def test_a_bad_lora_in_a_batch_names_its_job_before_anything_runs(runner, tmp_path: Path) -> None:
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    jobs = tmp_path / "jobs.yaml"
    jobs.write_text(f"- prompt: good\n- prompt: bad\n  lora: {tmp_path / 'bad.safetensors'}\n")
    result = runner.invoke(app, ["batch", str(jobs), *FAST[:4], "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "jobs.yaml line 2 (job 1)" in result.stderr and "not a readable safetensors file" in result.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").glob("*.png"))


def test_plan_lists_the_loras(runner) -> None:
    result = runner.invoke(app, ["plan", "x", "--model", "tiny", "--size", "256", "--lora", "tiny:0.5"])
    assert result.exit_code == 0, result.stderr
    assert "LoRA tiny at scale 0.5 (fused)" in result.stdout
    shown = runner.invoke(app, ["plan", "x", "--model", "tiny", "--size", "256", "--lora", "tiny:0.5", "--json"])
    assert json.loads(shown.stdout)["loras"] == [{"source": "tiny", "scale": 0.5}]
