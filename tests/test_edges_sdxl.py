"""SDXL's size conditioning against LinFusion's official high-resolution pipeline, on tiny-sdxl: the
time_ids every UNet call of every stage receives, with `size_cond: target` and with the default `stage`."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from linfusion_cli.cli.commands import app
from linfusion_cli.core.jobspec import JobSpec
from linfusion_cli.core.metadata import settings_key
from linfusion_cli.core.presets import load_preset

VAE_SCALE = 8


def official_time_ids(width: int, height: int, default_sample_size: int) -> list[int]:
    """What `pipeline_highres_sdxl.py` (Huage001/LinFusion) passes as time_ids at every stage of a (width, height)
    request, restated: the base is the model's default sample size on the long side at the request's aspect, the
    output `actual` = base x 2^num_scales, and original_size = target_size = (actual_height, actual_width) with
    crop (0, 0)."""
    sample_height, sample_width = math.ceil(height / VAE_SCALE), math.ceil(width / VAE_SCALE)
    long_side = max(sample_height, sample_width)
    num_scales = math.ceil(math.log2(long_side / default_sample_size))
    base_height = math.ceil(default_sample_size * sample_height / long_side) * VAE_SCALE
    base_width = math.ceil(default_sample_size * sample_width / long_side) * VAE_SCALE
    actual = (base_height * 2**num_scales, base_width * 2**num_scales)
    return [*actual, 0, 0, *actual]


def time_ids_by_stage(runner, monkeypatch, tmp_path: Path, *args: str) -> dict[tuple[int, int], list[list[int]]]:
    """Run tiny-sdxl to 512x256 and record, per latent size, every time_ids row the UNet was given."""
    import linfusion_cli.engine.sampling as sampling

    seen: dict[tuple[int, int], list[list[int]]] = {}
    real = sampling.unet_call

    def recording(unet: Any, sample: Any, t: Any, states: Any, added: Any, *rest: Any) -> Any:
        size = (sample.shape[-1] * VAE_SCALE, sample.shape[-2] * VAE_SCALE)
        seen.setdefault(size, []).extend(added["time_ids"].int().tolist())
        return real(unet, sample, t, states, added, *rest)

    monkeypatch.setattr(sampling, "unet_call", recording)
    command = ["generate", "a fox", "--model", "tiny-sdxl", "--size", "512", "--aspect", "2:1", "--steps", "2"]
    result = runner.invoke(app, [*command, "--seed", "1", "--out", str(tmp_path), *args])
    assert result.exit_code == 0, result.stderr
    return seen


def test_target_conditions_every_stage_as_the_official_pipeline(runner, monkeypatch, tmp_path: Path) -> None:
    seen = time_ids_by_stage(runner, monkeypatch, tmp_path, "--size-cond", "target")
    assert sorted(seen) == [(128, 64), (256, 128), (512, 256)]  # the official pipeline's stages too
    official = official_time_ids(512, 256, default_sample_size=128 // VAE_SCALE)
    assert official == [256, 512, 0, 0, 256, 512]
    for size, rows in seen.items():
        assert rows and all(row == official for row in rows), size  # both guidance halves, every step


def test_stage_conditions_each_stage_on_its_own_size(runner, monkeypatch, tmp_path: Path) -> None:
    seen = time_ids_by_stage(runner, monkeypatch, tmp_path)
    for (width, height), rows in seen.items():
        assert all(row == [height, width, 0, 0, height, width] for row in rows)


def test_size_cond_is_a_setting_that_keeps_old_names_and_reaches_the_metadata(runner, tmp_path: Path) -> None:
    default, target = JobSpec(prompt="x"), JobSpec(prompt="x", size_cond="target")
    assert default.size_cond == "stage"
    before = settings_key({k: v for k, v in default.settings().items() if k != "size_cond"}, 64, 64, 1)
    assert settings_key(default.settings(), 64, 64, 1) == before  # the default adds nothing to the key
    assert settings_key(target.settings(), 64, 64, 1) != before
    assert load_preset("sdxl-16k").settings["size_cond"] == "target"
    bad = runner.invoke(app, ["plan", "--size-cond", "final"])
    assert bad.exit_code == 2 and "must be one of stage, target" in bad.stderr


@pytest.mark.parametrize("value", ["target", "TARGET"])
def test_size_cond_in_a_job_file(tmp_path: Path, value: str) -> None:
    from linfusion_cli.core.jobs import read_job_file

    path = tmp_path / "jobs.yaml"
    path.write_text(f"- prompt: a\n  size_cond: {value}\n")
    assert read_job_file(path).rows[0].values["size_cond"] == "target"


def test_upscale_with_demofusion_dilates_by_output_over_native(runner, monkeypatch, tmp_path: Path) -> None:
    """The official super-resolution pipeline's r = output size / the model's native size (rounded up), whatever
    the input's size; a generated image keeps r = stage / base (2, 4...)."""
    from PIL import Image

    from linfusion_cli.engine.refine.demofusion_ops import DemoFusionRefiner

    ratios: list[int] = []
    real = DemoFusionRefiner.guide
    monkeypatch.setattr(DemoFusionRefiner, "guide", lambda self, stage: ratios.append(stage.ratio) or real(self, stage))
    image = tmp_path / "in.png"
    Image.new("RGB", (192, 192), "gray").save(image)  # tiny's native size is 128
    fast = ["--model", "tiny", "--steps", "2", "--refine", "demofusion", "--out", str(tmp_path / "o")]
    result = runner.invoke(app, ["upscale", str(image), "--size", "768", *fast])
    assert result.exit_code == 0, result.stderr
    assert ratios == [3, 6]  # stages 384 and 768 px: ceil(384 / 128), ceil(768 / 128); from the input: 2, 4
    ratios.clear()
    result = runner.invoke(app, ["generate", "x", "--size", "512", "--seed", "1", *fast])
    assert result.exit_code == 0, result.stderr
    assert ratios == [2, 4]
