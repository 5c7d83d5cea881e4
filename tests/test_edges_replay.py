"""Sidecars read back: `info` of a sidecar, `replay` of a later layout refused, the model and other
engine settings replaced from the command line, relative input paths found beside the sidecar; TIFF keeping a
Unicode prompt exactly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from linfusion_cli.base.errors import UsageError
from linfusion_cli.cli.commands import app
from linfusion_cli.core.replay import job_from_sidecar
from linfusion_cli.io.metadata import encode_image, read_metadata

FAST = ["--model", "tiny", "--size", "128", "--steps", "2", "--seed", "7"]


@pytest.fixture
def sidecar(runner, tmp_path: Path) -> Path:
    result = runner.invoke(app, ["generate", "a fox", *FAST, "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.stderr
    return next((tmp_path / "out").glob("*.png.json"))


def test_info_reads_a_sidecar_as_it_reads_its_image(runner, sidecar: Path) -> None:
    of_sidecar = runner.invoke(app, ["info", str(sidecar)])
    of_image = runner.invoke(app, ["info", str(sidecar.with_suffix(""))])
    assert of_sidecar.exit_code == 0, of_sidecar.stderr
    assert "linfusion sidecar 128x128" in of_sidecar.stdout
    parameters = of_image.stdout.split("\n", 1)[1]
    assert parameters.strip() and parameters in of_sidecar.stdout  # the same A1111 text
    data = json.loads(runner.invoke(app, ["info", str(sidecar), "--json"]).stdout)
    assert data["linfusion"]["seed"] == 7


def test_replay_refuses_a_later_layout(runner, sidecar: Path) -> None:
    data = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({**data, "schema": 2}))
    result = runner.invoke(app, ["replay", str(sidecar)])
    assert result.exit_code == 2 and '"schema": 2' in result.stderr and "this linfusion reads 1" in result.stderr


def test_replay_takes_the_model_from_the_command_line(runner, sidecar: Path, tiny_model_dir: Path) -> None:
    data = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({**data, "settings": {**data["settings"], "model": "/models/that/moved"}}))
    job, _ = job_from_sidecar(sidecar, {"model": str(tiny_model_dir), "linfusion": "none"})
    assert job.model == str(tiny_model_dir) and job.linfusion == "none" and job.seed == 7
    moved = runner.invoke(app, ["replay", str(sidecar), "--model", "./not/there"])
    assert moved.exit_code == 2 and "model './not/there' does not exist" in moved.stderr


def test_replay_finds_a_relative_input_beside_the_sidecar(tmp_path: Path, sidecar: Path) -> None:
    data = json.loads(sidecar.read_text())
    Image.new("RGB", (64, 64)).save(sidecar.parent / "ref.png")
    settings = {**data["settings"], "ip_adapter": ["tiny:0.5"], "ip_image": "ref.png"}
    sidecar.write_text(json.dumps({**data, "settings": settings}))
    job, _ = job_from_sidecar(sidecar)
    assert job.ip_image == str(sidecar.parent / "ref.png")
    (sidecar.parent / "ref.png").unlink()
    job, _ = job_from_sidecar(sidecar)
    assert job.ip_image == "ref.png"  # not there: as recorded, from the current folder


def test_a_sidecar_that_is_not_one(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    path.write_text('{"schema": 1}')
    with pytest.raises(UsageError, match="not a linfusion sidecar"):
        job_from_sidecar(path)


def test_tiff_keeps_a_unicode_prompt_exactly(tmp_path: Path) -> None:
    text = 'a café in 日本, "snow" & <fog>\nNegative prompt: blur\nSteps: 2'
    path = tmp_path / "x.tif"
    path.write_bytes(encode_image(np.zeros((8, 8, 3), np.uint8), "tiff", text, "{}") or b"")
    assert read_metadata(path)["parameters"] == text
    ascii_only = tmp_path / "y.tif"
    ascii_only.write_bytes(encode_image(np.zeros((8, 8, 3), np.uint8), "tiff", "a fox", "{}") or b"")
    with Image.open(ascii_only) as image:
        assert 700 not in image.tag_v2  # plain text: the file is as it was
    assert read_metadata(ascii_only)["parameters"] == "a fox"
