"""Images from AUTOMATIC1111 (and this tool's own, without their sidecar): the `parameters` text exactly as A1111
writes it, odd cases included (a prompt over several lines, no negative line, hires fields, fields this tool does
not know, a sampler diffusers lacks), read back by `info`, `upscale IMAGE` and `replay IMAGE`, and shown by `view`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin

from linfusion_cli.cli.commands import app
from linfusion_cli.io.a1111 import parse_parameters

# As A1111 1.10 writes them (modules/processing.py create_infotext), one per odd case.
FULL = (
    "a red fox, (masterpiece:1.2), <lora:Foxy:0.7>\n"
    "Negative prompt: EasyNegative, blurry\n"
    "Steps: 3, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 5, Seed: 1234, Size: 64x64, "
    "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Clip skip: 2, "
    'Lora hashes: "Foxy: a9994a3c0a17", TI hashes: "EasyNegative: c74b4e810b03", Version: v1.10.1'
)
LINES_NO_NEGATIVE = (
    "a cozy cabin\nin the woods, snow\n"
    "Steps: 2, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 42, Size: 64x96, Model: foo"
)
HIRES_UNKNOWN = (
    "a castle\nNegative prompt: lowres\nugly\n"
    "Steps: 2, Sampler: DPM++ 2S a Karras, CFG scale: 6.5, Seed: 7, Size: 64x64, Denoising strength: 0.7, "
    'Hires upscale: 2, Hires steps: 10, Hires upscaler: Latent, ADetailer prompt: "a face, smiling", '
    "ADetailer model: face_yolov8n.pt, Version: f2.0.1v1.10.1"
)
NOT_FIELDS = "a photo\nratio: 16:9"  # a last line with fewer than three fields is prompt text


def a1111_png(path: Path, text: str, size: tuple[int, int] = (64, 64)) -> Path:
    """A PNG as A1111 saves one: the pixels and a `parameters` text chunk (PIL's PngInfo, as A1111 uses it)."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    pixels = np.random.default_rng(0).integers(0, 255, (*size[::-1], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, pnginfo=info)
    return path


def test_the_text_parses_as_a1111_parses_it() -> None:
    full = parse_parameters(FULL)
    assert full.prompt == "a red fox, (masterpiece:1.2), <lora:Foxy:0.7>" and full.negative == "EasyNegative, blurry"
    assert full.fields["Lora hashes"] == "Foxy: a9994a3c0a17" and full.fields["Schedule type"] == "Karras"
    lines = parse_parameters(LINES_NO_NEGATIVE)
    assert lines.prompt == "a cozy cabin\nin the woods, snow" and lines.negative == "" and lines.fields["Seed"] == "42"
    hires = parse_parameters(HIRES_UNKNOWN)
    assert hires.negative == "lowres\nugly" and hires.fields["ADetailer prompt"] == "a face, smiling"
    assert parse_parameters(NOT_FIELDS).prompt == NOT_FIELDS and not parse_parameters(NOT_FIELDS).fields


def test_info_json_gives_the_fields_and_our_settings(runner, tmp_path: Path) -> None:
    png = a1111_png(tmp_path / "a1111.png", FULL)
    meta = json.loads(runner.invoke(app, ["info", str(png), "--json"]).stdout)
    assert meta["a1111"]["fields"]["Model hash"] == "6ce0161689" and meta["a1111"]["negative"] == "EasyNegative, blurry"
    settings = meta["a1111"]["settings"]
    assert settings["scheduler"] == "DPM++ 2M Karras" and settings["clip_skip"] == "2" and settings["width"] == "64"


def _upscale_job(png: Path, tmp_path: Path, **settings):
    from linfusion_cli.core.api import Generator
    from linfusion_cli.core.prepare import pick_seed, plan_for

    gen = Generator(out=tmp_path, model="tiny")
    job = gen.job(settings.pop("prompt", ""), require_prompt=False, image=str(png), size=128, **settings)
    prep = plan_for(job, gen.options, seed=pick_seed(job))
    return job, " | ".join(note.message for note in prep.notes)


def test_upscale_takes_the_images_settings_and_flags_override(tmp_path: Path) -> None:
    png = a1111_png(tmp_path / "a1111.png", FULL)
    job, notes = _upscale_job(png, tmp_path)
    assert (job.prompt, job.negative) == ("a red fox, (masterpiece:1.2), ", "EasyNegative, blurry")
    assert (job.seed, job.scheduler, job.steps, job.guidance, job.clip_skip) == (1234, "dpm++2m-karras", 3, 5.0, 2)
    assert "from image a1111.png (its A1111 parameters): prompt" in notes
    assert "no LoRA named 'Foxy'" in notes and "left out (the image's prompt names it)" in notes
    mine, _ = _upscale_job(png, tmp_path, prompt="a fox", seed=9, scheduler="Euler")
    assert (mine.prompt, mine.seed, mine.scheduler, mine.steps) == ("a fox", 9, "euler", 3)
    odd, notes = _upscale_job(a1111_png(tmp_path / "odd.png", HIRES_UNKNOWN), tmp_path)
    assert odd.scheduler == "ddim" and "'DPM++ 2S a Karras' is an AUTOMATIC1111 sampler that diffusers has" in notes


def test_replay_of_an_a1111_image_makes_its_size_seed_and_prompt(runner, tmp_path: Path) -> None:
    png = a1111_png(tmp_path / "hires.png", HIRES_UNKNOWN.replace("DPM++ 2S a Karras", "Euler a"))
    args = ["replay", str(png), "--model", "tiny", "--out", str(tmp_path / "out"), "--json", "-q"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["width"], report["height"], report["seed"]) == (128, 128, 7)  # Size x Hires upscale
    assert report["settings"]["prompt"] == "a castle" and report["settings"]["negative"] == "lowres\nugly"
    assert report["settings"]["scheduler"] == "euler-a" and report["settings"]["guidance"] == 6.5


def test_own_images_without_their_sidecar_replay_and_upscale_from_their_metadata(runner, tmp_path: Path) -> None:
    args = ["generate", "a red fox", "--model", "tiny", "--size", "64", "--steps", "2", "--seed", "5", "--json", "-q"]
    first = json.loads(runner.invoke(app, [*args, "--clip-skip", "2", "--out", str(tmp_path / "a")]).stdout)
    image = Path(first["path"])
    Path(first["sidecar"]).unlink()
    again = runner.invoke(app, ["replay", str(image), "--out", str(tmp_path / "b"), "--json", "-q"])
    assert again.exit_code == 0, again.stderr
    second = json.loads(again.stdout)
    assert second["settings"]["clip_skip"] == 2 and Path(second["path"]).name == image.name
    with Image.open(image) as a, Image.open(second["path"]) as b:
        assert np.array_equal(np.asarray(a), np.asarray(b))
    job, notes = _upscale_job(image, tmp_path)
    assert (job.prompt, job.seed, job.clip_skip) == ("a red fox", 5, 2) and "its linfusion metadata" in notes


def test_an_image_recording_nothing_is_refused_and_view_shows_what_one_records(runner, tmp_path: Path) -> None:
    from linfusion_cli.view.records import read_sidecar

    bare = tmp_path / "bare.png"
    Image.new("RGB", (8, 8)).save(bare)
    refused = runner.invoke(app, ["replay", str(bare)])
    assert refused.exit_code == 2 and "records no generation parameters" in refused.stderr
    shown = read_sidecar(a1111_png(tmp_path / "shown.png", LINES_NO_NEGATIVE))
    assert shown.prompt == "a cozy cabin\nin the woods, snow" and shown.settings["scheduler"] == "Euler a"
    assert "A1111 parameters" in str(shown.problem)


def test_a_model_of_another_hash_than_the_images_is_a_warning(tmp_path: Path) -> None:
    from linfusion_cli.core.image_settings import Recorded, model_hash_note

    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes(b"not the image's model")
    (note,) = model_hash_note(Recorded("image a.png", {}, "6ce0161689"), str(checkpoint))
    assert note.level == "warning" and "model of hash 6ce0161689" in note.message
    import hashlib

    same = hashlib.sha256(checkpoint.read_bytes()).hexdigest()[:10]
    assert model_hash_note(Recorded("image a.png", {}, same), str(checkpoint)) == []
