"""A1111's inline LoRA tags: `<lora:NAME:WEIGHT>` (and `<lyco:...>`) find NAME.safetensors in the LoRA folders
(--lora-dir, $LINFUSION_LORA_DIR, a job file's or preset's lora_dir), leave the text CLIP sees and the file name,
and make the same job as `--lora FILE:WEIGHT` (the same pixels, name and Lora hashes); a name not found is refused
before the model loads, with the closest name in the folders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from linfusion_cli.cli.commands import app

RUN = ["--model", "tiny", "--size", "64", "--steps", "2", "--seed", "3", "--json", "-q"]


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA folder with a kohya-layout file (in a sub-folder, as people keep them) and a LoHa beside it."""
    from linfusion_cli.models.loading import build_random
    from linfusion_cli.models.lora.fuse import tiny_lora

    folder = tmp_path_factory.mktemp("loras")
    (folder / "styles").mkdir()
    tensors: dict[str, torch.Tensor] = {}
    for module, pair in tiny_lora(build_random("tiny").unet).items():
        key = "lora_unet_" + module.replace(".", "_")
        tensors |= {f"{key}.lora_down.weight": pair.down, f"{key}.lora_up.weight": pair.up}
        tensors[f"{key}.alpha"] = torch.tensor(2.0)
    save_file(tensors, str(folder / "styles" / "Foxy.safetensors"))
    return folder


def _run(runner, tmp_path: Path, *args: str) -> dict:
    result = runner.invoke(app, ["generate", *args, *RUN, "--out", str(tmp_path)])
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def _pixels(path: str) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


def test_a_tag_makes_the_same_image_as_the_flag(runner, tmp_path: Path, lora_dir: Path) -> None:
    tagged = _run(runner, tmp_path / "tag", "a red fox <lora:Foxy:0.8>, masterpiece", "--lora-dir", str(lora_dir))
    file = str(lora_dir / "styles" / "Foxy.safetensors")
    flagged = _run(runner, tmp_path / "flag", "a red fox , masterpiece", "--lora", f"{file}:0.8")
    plain = _run(runner, tmp_path / "plain", "a red fox , masterpiece")
    assert Path(tagged["path"]).name == Path(flagged["path"]).name  # the tag is not in the name
    assert tagged["settings"]["prompt"] == "a red fox , masterpiece" and tagged["settings"]["lora"] == [f"{file}:0.8"]
    assert np.array_equal(_pixels(tagged["path"]), _pixels(flagged["path"]))
    assert not np.array_equal(_pixels(tagged["path"]), _pixels(plain["path"]))
    info = runner.invoke(app, ["info", tagged["path"]]).stdout
    assert "a red fox , masterpiece <lora:Foxy:0.8>" in info and 'Lora hashes: "Foxy: ' in info


def test_names_are_found_in_the_env_folder_by_flag_and_by_lyco_tag(
    runner, tmp_path: Path, lora_dir, monkeypatch
) -> None:
    from linfusion_cli.core.api import Generator

    monkeypatch.setenv("LINFUSION_LORA_DIR", str(lora_dir))
    file = str(lora_dir / "styles" / "Foxy.safetensors")
    with Generator(out=tmp_path, model="tiny") as gen:
        by_flag = gen.plan("a fox", lora=["foxy:0.5"])  # any case, when no file has it exactly
        by_tag = gen.plan("a fox <lyco:Foxy>")
    assert by_flag["loras"] == [{"source": file, "scale": 0.5}]
    assert by_tag["loras"] == [{"source": file, "scale": 1.0}] and by_tag["prompt"] == "a fox "


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ("a fox <lora:Foxi:0.8>", "no LoRA named 'Foxi' in "),
        ("a fox <lora:Foxy:0.5:0.8>", "separate text-encoder and UNet weights"),
        ("a fox <lora:Foxy:strong>", "the weight 'strong' is not a number"),
    ],
)
def test_tag_mistakes_exit_2_before_the_model_loads(runner, no_model_loads, lora_dir, prompt, message) -> None:
    result = runner.invoke(app, ["generate", prompt, "--lora-dir", str(lora_dir), *RUN])
    assert result.exit_code == 2 and message in result.stderr
    if "Foxi" in prompt:
        assert "(did you mean Foxy?)" in result.stderr


def test_job_files_and_presets_take_tags_and_folders(runner, tmp_path: Path, lora_dir, monkeypatch) -> None:
    home = Path(__import__("os").environ["LINFUSION_HOME"])
    (home / "presets").mkdir(parents=True, exist_ok=True)
    (home / "presets" / "mine.yaml").write_text(f"description: mine\nlora_dir: [{lora_dir}]\n")
    jobs = tmp_path / "jobs.yaml"
    jobs.write_text(
        "jobs:\n  - a fox <lora:Foxy:0.4>\n  - prompt: a cat <hypernet:old:1>\n    negative: <lora:Foxy> dull\n"
    )
    result = runner.invoke(app, ["batch", str(jobs), "--preset", "mine", "--model", "tiny", "--dry-run", "--json"])
    assert result.exit_code == 0, result.stderr
    first, second = (json.loads(line) for line in result.stdout.splitlines())
    assert first["loras"] == [{"source": str(lora_dir / "styles" / "Foxy.safetensors"), "scale": 0.4}]
    assert second["loras"] == [] and second["prompt"] == "a cat "
    notes = " ".join(second["notes"])
    assert "<hypernet:old:1> ignored" in notes and "tag(s) in the negative prompt ignored" in notes
