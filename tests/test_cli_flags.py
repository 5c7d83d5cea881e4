"""Each flag -> the exact job the core receives (fastapi-cli's style: the core is mocked, no model loads)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from linfusion_cli.cli.commands import app
from linfusion_cli.core.settings import job_keys

# flag arguments -> the job fields they must set (anything not listed keeps its default)
GENERATE_FLAGS: list[tuple[list[str], dict[str, Any]]] = [
    (["--size", "3000"], {"size": 3000}),
    (["--size", "16k"], {"size": 16384}),
    (["--size", "8K"], {"size": 8192}),
    (["--size", "4096x2048"], {"size": None, "width": 4096, "height": 2048}),
    (["--aspect", "16:9"], {"aspect": "16:9"}),
    (["--width", "1000"], {"width": 1000}),
    (["--height", "800"], {"height": 800}),
    (["--model", "tiny-sd2"], {"model": "tiny-sd2"}),
    (["-m", "tiny"], {"model": "tiny"}),
    (["--linfusion", "none"], {"linfusion": "none"}),
    (["--vae", "some/vae"], {"vae": "some/vae"}),
    (["--steps", "30"], {"steps": 30}),
    (["--guidance", "5"], {"guidance": 5.0}),
    (["-g", "3.5"], {"guidance": 3.5}),
    (["--negative", "blurry"], {"negative": "blurry"}),
    (["--seed", "42"], {"seed": 42}),
    (["--seed", "-1"], {"seed": None}),
    (["--scheduler", "euler"], {"scheduler": "euler"}),
    (["--size-cond", "target"], {"size_cond": "target"}),
    (["--refine", "DemoFusion"], {"refine": "demofusion"}),
    (["--scheduler", "DPM++ 2M Karras"], {"scheduler": "dpm++2m-karras"}),
    (["--scheduler", "Euler a"], {"scheduler": "euler-a"}),
    (["--strengths", "0.3,0.2"], {"strengths": [0.3, 0.2]}),
    (["--base-size", "1k"], {"base_size": 1024}),
    (["--preset", "low-vram"], {"preset": "low-vram", "low_vram": True, "vae_tile": 512}),
    (["--format", "jpg"], {"format": "jpeg"}),
    (["--format", "TIF"], {"format": "tiff"}),
    (["--format", "webp"], {"format": "webp"}),
    (["--name", "fox"], {"name": "fox"}),
    (["--vae-tile", "512"], {"vae_tile": 512}),
    (["--low-vram"], {"low_vram": True}),
    (["--max-vram", "12"], {"max_vram": 12.0}),
    (["--memory", "Split"], {"memory": "split"}),
    (["--memory", "lowest"], {"memory": "lowest"}),
    (["--strength", "0.3"], {"strength": 0.3}),
    (["--refine", "demofusion"], {"refine": "demofusion"}),
    (["--cosine-scale-1", "2"], {"cosine_scale_1": 2.0}),
    (["--cosine-scale-2", "0.5"], {"cosine_scale_2": 0.5}),
    (["--cosine-scale-3", "4"], {"cosine_scale_3": 4.0}),
    (["--gaussian-sigma", "0.8"], {"gaussian_sigma": 0.8}),
    (["--lora", "tiny"], {"lora": ["tiny:1"]}),
    (["--lora", "a.safetensors:0.5", "--lora", "tiny:-1"], {"lora": ["a.safetensors:0.5", "tiny:-1"]}),
    (["--ip-adapter", "tiny:0.6"], {"ip_adapter": ["tiny:0.6"]}),
    (["--ip-image", "face.png"], {"ip_image": "face.png"}),
    (
        [
            "--controlnet",
            "a/canny:0.8",
            "--controlnet",
            "tiny",
            "--control-image",
            "e.png",
            "--control-image",
            "previous",
        ],
        {"controlnet": ["a/canny:0.8", "tiny:1"], "control_image": ["e.png", "previous"]},
    ),
    (["--control-start", "0.2", "--control-end", "0.9"], {"control_start": 0.2, "control_end": 0.9}),
    (["--control-stages", "0,1"], {"control_stages": [0.0, 1.0]}),
    # AUTOMATIC1111's names for them
    (["--clip-skip", "2"], {"clip_skip": 2}),
    (["--cfg-scale", "5"], {"guidance": 5.0}),
    (["--sampler", "DPM++ SDE Karras"], {"scheduler": "dpm++sde-karras"}),
    (["--negative-prompt", "blurry"], {"negative": "blurry"}),
    (["--denoising-strength", "0.3"], {"strength": 0.3}),
    (["--denoise", "0.2"], {"strength": 0.2}),
    (["--lora-dir", "loras", "--lora-dir", "more"], {"lora_dir": ["loras", "more"]}),
    (["--embeddings", "embeddings"], {"embeddings": ["embeddings"]}),
]


def _invoke(runner: Any, *args: str) -> Any:
    result = runner.invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    return result


def _assert_job(job: Any, expected: dict[str, Any]) -> None:
    from linfusion_cli.core.jobspec import JobSpec

    default = JobSpec()
    for key in job_keys():
        want = expected.get(key, getattr(default, key))
        if key == "prompt":
            continue
        assert getattr(job, key) == want, key


@pytest.mark.parametrize(("flags", "expected"), GENERATE_FLAGS, ids=[" ".join(f) for f, _ in GENERATE_FLAGS])
def test_generate_flag_reaches_the_job(runner, core, flags, expected) -> None:
    _invoke(runner, "generate", "a fox", "--quiet", *flags)
    assert core["job"].prompt == "a fox"
    _assert_job(core["job"], expected)


def test_every_generate_job_flag_is_covered() -> None:
    """A new job flag on `generate` must come with a row above (so its mapping is tested)."""
    import typer.main

    command = typer.main.get_command(app).commands["generate"]  # type: ignore[attr-defined]
    job_params = {p.name for p in command.params if p.name in job_keys()} - {"prompt"}
    tested = {key for _, expected in GENERATE_FLAGS for key in expected}
    assert job_params <= tested, job_params - tested


def test_generate_run_options(runner, core, tmp_path: Path) -> None:
    _invoke(
        runner,
        "generate",
        "x",
        "--quiet",
        "--out",
        str(tmp_path),
        "--overwrite",
        "--save-stages",
        "--device",
        "cpu",
        "--dtype",
        "fp32",
        "--allow-pickle",
    )
    options = core["options"]
    assert (options.out, options.overwrite, options.save_stages) == (tmp_path, True, True)
    assert (options.device, options.dtype, options.allow_pickle) == ("cpu", "fp32", True)
    assert "dry_run" not in core and core["init_image"] is None  # a dry run never reaches the run


def test_upscale_flags(runner, core, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import linfusion_cli.core.api as api

    pixels = np.zeros((64, 96, 3), np.uint8)
    monkeypatch.setattr(api, "load_rgb", lambda path, limit=None: pixels)
    image = tmp_path / "in.png"
    _invoke(
        runner, "upscale", str(image), "--quiet", "--size", "2k", "--prompt", "a hill", "--strength", "0.3",
        "--seed", "5", "--scheduler", "UniPC", "--max-input-pixels", "1000",
    )  # fmt: skip
    _assert_job(
        core["job"],
        {"image": str(image), "size": 2048, "strength": 0.3, "seed": 5, "scheduler": "unipc"},
    )
    assert core["job"].prompt == "a hill" and core["init_image"] is pixels
    assert core["options"].max_input_pixels == 1000


def test_plan_flags(runner, monkeypatch: pytest.MonkeyPatch) -> None:
    import linfusion_cli.core.api as api

    seen: dict[str, Any] = {}

    def fake_plan_for(job: Any, options: Any, *, seed: int) -> Any:
        seen["job"] = job
        return None

    summary = {"width": 8, "height": 8, "model": "m", "family": "f", "native": 8, "device": "cpu", "dtype": "fp32"}
    summary |= {"stages": [], "notes": [], "warnings": [], "output": None, "memory_budget_gib": 1.0, "dtypes": {}}
    summary |= {"scheduler": "ddim", "guidance": 7.5}
    monkeypatch.setattr(api, "plan_for", fake_plan_for)
    monkeypatch.setattr(api, "plan_anywhere", lambda prep, options, world: summary)
    _invoke(runner, "plan", "--size", "8k", "--aspect", "2:1", "--low-vram", "--max-vram", "20", "--format", "tif")
    _assert_job(seen["job"], {"size": 8192, "aspect": "2:1", "low_vram": True, "max_vram": 20.0, "format": "tiff"})


def test_batch_flags(runner, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import linfusion_cli.core.api as api  # where the API checks the file
    import linfusion_cli.core.batch as batch

    seen: dict[str, Any] = {}
    checked = object()

    def fake_plan_batch(path: Path, flags: dict[str, Any], options: Any, base_seed: Any, shard: Any) -> Any:
        seen.update(path=path, flags=flags, options=options, base_seed=base_seed, shard=shard)
        return checked

    def fake_run_batch(plan: Any, options: Any, **kwargs: Any) -> Any:
        seen.update(plan=plan, **kwargs)
        return SimpleNamespace(exit_code=0)

    monkeypatch.setattr(api, "plan_batch", fake_plan_batch)
    monkeypatch.setattr(batch, "run_batch", fake_run_batch)
    prompts = tmp_path / "p.txt"
    _invoke(
        runner, "batch", str(prompts), "--quiet", "--size", "4k", "--steps", "20", "--seed", "1000",
        "--shard", "1/4", "--fail-fast", "--format", "jpg", "--low-vram",
    )  # fmt: skip
    # --seed is the base seed here, not a job setting
    assert seen["flags"] == {"size": 4096, "steps": 20, "format": "jpeg", "low_vram": True}
    assert (seen["base_seed"], seen["shard"].index, seen["shard"].count, seen["fail_fast"]) == (1000, 1, 4, True)
    assert seen["plan"] is checked  # checked once, before the engine's imports, and run as checked


def test_batch_random_base_seed(runner, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import linfusion_cli.core.api as api  # where the API checks the file
    import linfusion_cli.core.batch as batch

    seen: dict[str, Any] = {}
    monkeypatch.setattr(api, "plan_batch", lambda path, flags, options, base_seed, shard: seen.update(seed=base_seed))
    monkeypatch.setattr(batch, "run_batch", lambda plan, options, **kw: SimpleNamespace(exit_code=0))
    _invoke(runner, "batch", str(tmp_path / "p.txt"), "--quiet", "--seed", "-1")
    assert seen["seed"] is None


def test_bench_pipeline_flags(runner, monkeypatch: pytest.MonkeyPatch) -> None:
    import linfusion_cli.bench.pipeline as bench_pipeline

    seen: dict[str, Any] = {}

    def fake_bench(arch: str, flags: dict[str, Any], device: Any, dtype: Any, **kwargs: Any) -> dict[str, Any]:
        seen.update(arch=arch, flags=flags)
        return {
            "size": "8x8",
            "device": "cpu",
            "seconds": {"model_load": 0, "generate": 0, "write": 0},
            "peak_vram_allocated_gib": None,
            "stages": [],
        }

    monkeypatch.setattr(bench_pipeline, "bench_pipeline", fake_bench)
    _invoke(
        runner, "bench", "pipeline", "--arch", "tiny", "--size", "1k", "--aspect", "2:1", "--steps", "4",
        "--scheduler", "Euler", "--low-vram", "--max-vram", "8", "--vae-tile", "256", "--device", "cpu",
    )  # fmt: skip
    assert seen["arch"] == "tiny"
    assert seen["flags"] == {
        "size": 1024,
        "aspect": "2:1",
        "steps": 4,
        "scheduler": "euler",
        "low_vram": True,
        "max_vram": 8.0,
        "vae_tile": 256,
    }
