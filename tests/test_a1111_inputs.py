"""What AUTOMATIC1111 users bring, besides files: its field names in prompt files, its flag names and batch count,
and clip skip as A1111 defines it."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from linfusion_cli.cli.commands import app
from linfusion_cli.core.jobs import read_job_file


def test_prompt_files_take_a1111s_column_and_key_names(tmp_path: Path) -> None:
    csv = tmp_path / "jobs.csv"
    csv.write_text(
        "Prompt,Negative prompt,CFG Scale,Sampler,Denoising strength,Clip skip,Steps,Seed\n"
        '"a fox, red",blurry,5,DPM++ 2M Karras,0.3,2,20,7\n'
    )
    yaml = tmp_path / "jobs.yaml"
    yaml.write_text(
        "jobs:\n  - Prompt: a fox, red\n    Negative prompt: blurry\n    CFG Scale: 5\n"
        "    Sampler: DPM++ 2M Karras\n    Denoising strength: 0.3\n    Clip skip: 2\n    Steps: 20\n    Seed: 7\n"
    )
    expected = {
        "prompt": "a fox, red",
        "negative": "blurry",
        "guidance": 5.0,
        "scheduler": "dpm++2m-karras",
        "strength": 0.3,
        "clip_skip": 2,
        "steps": 20,
        "seed": 7,
    }
    for path in (csv, yaml):
        assert read_job_file(path).rows[0].values == expected


def test_foreign_flags_say_what_to_use_and_near_misses_suggest_a1111_names(runner) -> None:
    hires = runner.invoke(app, ["generate", "a fox", "--hr-scale", "2"])
    assert hires.exit_code == 2 and "--hr-scale: the output size is --size" in hires.stderr
    typo = runner.invoke(app, ["generate", "a fox", "--cfg-scal", "5"])
    assert typo.exit_code == 2 and "--cfg-scale" in typo.stderr
    field = runner.invoke(app, ["plan", "--sampler", "Euler a", "--model", "tiny", "--size", "1024", "--json"])
    assert json.loads(field.stdout)["scheduler"] == "euler-a"


def test_batch_count_makes_images_with_seeds_counting_up(runner, tmp_path: Path) -> None:
    args = ["generate", "a fox", "--model", "tiny", "--size", "64", "--steps", "1", "--seed", "41"]
    result = runner.invoke(app, [*args, "--batch-count", "2", "--out", str(tmp_path), "--json", "-q"])
    assert result.exit_code == 0, result.stderr
    reports = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["seed"] for r in reports] == [41, 42] and len({r["path"] for r in reports}) == 2
    again = runner.invoke(app, [*args[:-1], "42", "--out", str(tmp_path / "one"), "--json", "-q"])
    one = json.loads(again.stdout)  # the second image is the image of seed 42
    with Image.open(one["path"]) as alone, Image.open(reports[1]["path"]) as second:
        assert np.array_equal(np.asarray(alone), np.asarray(second))


@pytest.fixture(scope="module")
def tiny():
    from linfusion_cli.models.loading import build_random

    return build_random("tiny")


def test_clip_skip_is_the_encoder_without_its_last_layers(tiny) -> None:
    """A1111's Clip skip N: CLIP's hidden state N - 1 layers before the last, through the final layer norm, which
    is what the same encoder with its last N - 1 layers removed gives as its last hidden state."""
    from linfusion_cli.engine.text import TextOptions, encode_prompt

    cpu = torch.device("cpu")
    full = encode_prompt(tiny, "a red fox", "", 1.0, cpu).embeds
    skipped = encode_prompt(tiny, "a red fox", "", 1.0, cpu, options=TextOptions(clip_skip=2)).embeds
    assert torch.equal(encode_prompt(tiny, "a red fox", "", 1.0, cpu, options=TextOptions(clip_skip=1)).embeds, full)
    shorter = copy.deepcopy(tiny)
    encoder = shorter.text_encoders[0]
    encoder.encoder.layers = encoder.encoder.layers[:-1]
    encoder.config.num_hidden_layers -= 1
    expected = encode_prompt(shorter, "a red fox", "", 1.0, cpu).embeds
    assert not torch.allclose(skipped, full) and torch.allclose(skipped, expected, atol=1e-6)


def test_clip_skip_is_recorded_keyed_and_refused_past_the_encoders_depth(runner, tmp_path: Path) -> None:
    from linfusion_cli.core.jobspec import JobSpec
    from linfusion_cli.core.metadata import settings_key

    default = JobSpec(prompt="x").settings()
    assert settings_key({**default, "clip_skip": 1}, 64, 64, 1) == settings_key(default, 64, 64, 1)
    assert settings_key({**default, "clip_skip": 2}, 64, 64, 1) != settings_key(default, 64, 64, 1)
    args = ["generate", "a fox", "--model", "tiny", "--size", "64", "--steps", "1", "--seed", "1", "--out"]
    done = runner.invoke(app, [*args, str(tmp_path), "--clip-skip", "2", "--json", "-q"])
    assert done.exit_code == 0, done.stderr
    report = json.loads(done.stdout)
    info = runner.invoke(app, ["info", report["path"]])
    assert "Clip skip: 2" in info.stdout and report["settings"]["clip_skip"] == 2
    deep = runner.invoke(app, [*args, str(tmp_path), "--clip-skip", "3"])  # the tiny CLIP has 2 layers
    assert deep.exit_code == 2 and "--clip-skip 3: this model's text encoder has 2 layers" in deep.stderr
