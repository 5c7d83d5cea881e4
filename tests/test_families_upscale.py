"""SD-2.x (v-prediction) and SDXL shapes end to end on the CPU, LinFusion-XL checkpoints, and `upscale`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from linfusion_cli import apply_linfusion
from linfusion_cli.cli.commands import app
from linfusion_cli.models.loading import build_random


def run(runner, *args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


@pytest.mark.parametrize(
    ("model", "family", "prediction"),
    [("tiny-sd2", "tiny SD-2.x-shaped", "v_prediction"), ("tiny-sdxl", "tiny SDXL-shaped", "epsilon")],
)
def test_other_families_end_to_end(runner, tmp_path: Path, model: str, family: str, prediction: str) -> None:
    result = run(
        runner,
        "generate",
        "a castle",
        "--model",
        model,
        "--size",
        "512",
        "--aspect",
        "3:2",
        "--steps",
        "4",
        "--scheduler",
        "dpm++2m-karras",
        "--out",
        str(tmp_path),
        "--json",
    )
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["family"] == family and report["linfusion_layers"] == {"tiny-sd2": 7, "tiny-sdxl": 11}[model]
    assert [s["size"] for s in report["stages"]] == ["128x88", "256x176", "512x344"]
    with Image.open(report["path"]) as image:
        assert image.size == (512, 344)
        assert np.asarray(image).std() > 1  # not a blank image
    assert build_random(model).scheduler_config["prediction_type"] == prediction


def test_sdxl_size_conditioning_follows_the_stage(monkeypatch: pytest.MonkeyPatch) -> None:
    from linfusion_cli.engine import sampling
    from linfusion_cli.engine.text import Conditioning

    cond = Conditioning(torch.zeros(2, 77, 64), torch.zeros(2, 32))
    inputs = sampling.StageInputs(cond, 7.5, (2048, 1024))
    added = sampling._added_cond(inputs, slice(0, 2), torch.device("cpu"), torch.float32)
    assert added is not None
    assert added["time_ids"].tolist() == [[1024, 2048, 0, 0, 1024, 2048]] * 2


def test_linfusion_xl_checkpoint_by_hand(tmp_path: Path) -> None:
    """An official-format LinFusion-XL style checkpoint (projection mid dim = dim / 16) on the SDXL shape."""
    from safetensors.torch import save_file

    unet = build_random("tiny-sdxl").unet
    names = [n for n, _ in unet.named_modules() if n.endswith(".attn1")]
    entries, tensors = [], {}
    for i, name in enumerate(names):
        attn = unet.get_submodule(name)
        dim, mid = attn.to_q.in_features, attn.to_q.in_features // 16
        entries.append({"module_name": name, "dim_n": dim, "heads": attn.heads, "projection_mid_dim": mid})
        for proj in ("to_q", "to_k", "to_v", "to_out.0"):
            tensors[f"{i}.{proj}.weight"] = torch.randn(dim, dim)
        tensors[f"{i}.to_out.0.bias"] = torch.randn(dim)
        for mlp in ("to_q_", "to_k_"):
            tensors[f"{i}.{mlp}.0.weight"], tensors[f"{i}.{mlp}.0.bias"] = torch.randn(mid, dim), torch.randn(mid)
            tensors[f"{i}.{mlp}.1.weight"], tensors[f"{i}.{mlp}.1.bias"] = torch.randn(mid), torch.randn(mid)
            tensors[f"{i}.{mlp}.3.weight"], tensors[f"{i}.{mlp}.3.bias"] = torch.randn(dim, mid), torch.randn(dim)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "LinFusion", "modules_list": entries}))
    save_file(tensors, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    patch = apply_linfusion(unet, str(tmp_path))
    assert len(patch.layers) == 11
    first = unet.get_submodule(names[0])
    assert first.to_q_[0].out_features == first.dim // 16
    assert torch.equal(first.to_k_[3].weight, tensors["0.to_k_.3.weight"])


@pytest.mark.parametrize(
    ("mode", "suffix", "size", "args", "expected"),
    [
        ("RGB", ".png", (201, 123), ["--size", "640"], (640, 392)),
        ("RGB", ".jpg", (97, 150), ["--width", "312", "--height", "480"], (312, 480)),
        ("RGBA", ".png", (150, 150), ["--size", "600", "--prompt", "a cat"], (600, 600)),
        ("P", ".png", (130, 70), ["--size", "256"], (256, 136)),
        ("I;16", ".png", (64, 80), ["--size", "320"], (256, 320)),
    ],
)
def test_upscale_inputs_to_exact_targets(
    runner, tmp_path: Path, mode: str, suffix: str, size: tuple[int, int], args: list[str], expected: tuple[int, int]
) -> None:
    rng = np.random.default_rng(0)
    source = tmp_path / f"input{suffix}"
    pixels = (rng.random((size[1], size[0], 4)) * 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGBA")
    if mode == "RGB":
        image = image.convert("RGB")
    elif mode == "P":
        image = image.convert("RGB").quantize(16)
    elif mode == "I;16":
        image = Image.fromarray(pixels[..., 0].astype(np.uint16) * 257)  # 16-bit grey
    image.save(source)
    result = run(
        runner,
        "upscale",
        str(source),
        "--model",
        "tiny",
        "--steps",
        "4",
        *args,
        "--out",
        str(tmp_path / "out"),
        "--json",
    )
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert all(s["kind"] == "refine" for s in report["stages"])
    with Image.open(report["path"]) as out:
        assert out.size == expected
    assert report["settings"]["image"] == str(source)


def test_upscale_refuses_smaller_target_and_bad_files(runner, tmp_path: Path) -> None:
    source = tmp_path / "in.png"
    Image.new("RGB", (300, 200)).save(source)
    small = run(runner, "upscale", str(source), "--model", "tiny", "--size", "128", "--out", str(tmp_path / "o"))
    assert small.exit_code == 2 and "smaller than the input" in small.stderr
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image at all")
    bad = run(runner, "upscale", str(junk), "--model", "tiny", "--size", "512", "--out", str(tmp_path / "o"))
    assert bad.exit_code == 2 and "is not an image" in bad.stderr


def test_batch_upscales_a_folder(runner, tmp_path: Path) -> None:
    for i in range(2):
        Image.new("RGB", (100 + i * 10, 80), (i * 90, 40, 200)).save(tmp_path / f"render{i}.png")
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(
        "".join(json.dumps({"image": str(tmp_path / f"render{i}.png"), "size": 256}) + "\n" for i in range(2))
    )
    result = run(
        runner, "batch", str(jobs), "--model", "tiny", "--steps", "4", "--out", str(tmp_path / "out"), "--json"
    )
    assert result.exit_code == 0, result.stderr
    paths = [json.loads(line)["path"] for line in result.stdout.splitlines()]
    assert [Path(p).name.split("_")[1] for p in paths] == ["render0-upscaled", "render1-upscaled"]


def test_exif_rotation_is_applied(tmp_path: Path) -> None:
    from linfusion_cli.io.images import load_rgb

    source = tmp_path / "phone.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the stored 100x60 image is shown as 60x100
    Image.new("RGB", (100, 60), (200, 10, 10)).save(source, exif=exif.tobytes())
    assert load_rgb(source).shape == (100, 60, 3)
