"""The CLI as a user meets it: end-to-end runs on the tiny model, error exits, --dry-run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from PIL import Image

from linfusion_cli.cli.commands import app


def run(runner, *args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


@pytest.mark.slow
def test_end_to_end_tiny_non_square(runner, tmp_path: Path) -> None:
    result = run(
        runner,
        "generate",
        "a red fox",
        "--model",
        "tiny",
        "--size",
        "1024",
        "--aspect",
        "16:9",
        "--json",
        "--out",
        str(tmp_path),
        "--seed",
        "7",
    )
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)  # stdout is exactly one JSON object
    path = Path(report["path"])
    assert path.parent == tmp_path and re.fullmatch(r"a-red-fox_7_1024x576_[0-9a-f]{8}\.png", path.name)
    with Image.open(path) as image:
        assert image.size == (1024, 576)
        assert "Seed: 7" in image.text["parameters"]
        assert "Denoising strength: 0.4, " in image.text["parameters"]
    assert [s["size"] for s in report["stages"]] == ["128x72", "256x144", "512x288", "1024x576"]
    assert [s["steps"] for s in report["stages"]] == [50, 20, 12, 5]
    assert report["seed"] == 7 and report["linfusion_layers"] == 7
    assert report["settings"]["scheduler"] == "ddim" and report["versions"]["linfusion"]
    sidecar = json.loads(Path(report["sidecar"]).read_text())
    assert sidecar["complete"] and sidecar["file"]["bytes"] == path.stat().st_size


def test_the_report_says_which_vae_tile_each_stage_used_as_the_plan_does(runner, tmp_path: Path) -> None:
    args = ["x", "--model", "tiny", "--size", "256", "--vae-tile", "128", "--seed", "1", "--json"]
    report = json.loads(run(runner, "generate", *args, "--steps", "2", "--out", str(tmp_path)).stdout)
    tiles = [s["memory_settings"]["vae_tile"] for s in report["stages"]]
    assert tiles == [None, 128]  # the 128 px base fits in one tile: untiled; the 256 px stage in tiles of 128
    planned = json.loads(run(runner, "plan", *args).stdout)["stages"]
    assert [s["memory_settings"]["vae_tile"] for s in planned] == tiles  # the plan says what the run does
    assert [s["vae"] for s in planned] == ["untiled", "tiles of 128 px"]


def test_folder_model_through_real_loader(runner, tmp_path: Path, tiny_model_dir: Path) -> None:
    result = run(
        runner,
        "generate",
        "a lighthouse",
        "--model",
        str(tiny_model_dir),
        "--size",
        "256",
        "--steps",
        "4",
        "--json",
        "--out",
        str(tmp_path),
        "--seed",
        "3",
        "--scheduler",
        "euler-a",
    )
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["family"] == "tiny SD-1.x-shaped" and len(report["stages"]) == 2
    with Image.open(report["path"]) as image:
        assert image.size == (256, 256)


def test_same_seed_same_image(runner, tmp_path: Path) -> None:
    paths = []
    for out in ("a", "b"):
        result = run(
            runner,
            "generate",
            "same",
            "--model",
            "tiny",
            "--size",
            "256",
            "--steps",
            "6",
            "--seed",
            "11",
            "--json",
            "--out",
            str(tmp_path / out),
        )
        paths.append(json.loads(result.stdout)["path"])
    with Image.open(paths[0]) as a, Image.open(paths[1]) as b:
        assert a.tobytes() == b.tobytes()


def test_existing_output_is_skipped_as_a_batch_skips_it(runner, tmp_path: Path, monkeypatch) -> None:
    args = ["generate", "x", "--model", "tiny", "--size", "128", "--steps", "2", "--seed", "1", "--out", str(tmp_path)]
    made = run(runner, *args, "--json")
    first = json.loads(made.stdout)
    assert "1 stage to 128x128 with ddim on cpu" in made.stderr  # the sampler in the log, as in the plan
    image = Path(first["path"])
    stamp = image.stat().st_mtime_ns
    import linfusion_cli.engine.pipeline as pipeline

    with monkeypatch.context() as patched:
        patched.setattr(pipeline.Engine, "load", classmethod(lambda *a, **k: pytest.fail("a model was loaded")))
        again = run(runner, *args, "--json")
    assert again.exit_code == 0 and "made before with these settings: skipped" in again.stderr
    report = json.loads(again.stdout)  # the finished image's report, said on stdout as a run says it
    assert report["skipped"] is True and (report["path"], report["seed"], report["key"]) == (
        first["path"],
        1,
        first["key"],
    )
    assert image.stat().st_mtime_ns == stamp
    Path(first["sidecar"]).unlink()  # an image without its sidecar: not known to be this job's
    bare = run(runner, *args)
    assert bare.exit_code == 2 and "is not a finished image of these settings" in bare.stderr
    assert run(runner, *args, "--overwrite").exit_code == 0 and image.stat().st_mtime_ns != stamp


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--size", "0"], "--size: must be between 64 and 65536"),
        (["--size", "-3"], "--size: must be between 64 and 65536"),
        (["--size", "20000", "--format", "webp"], "webp cannot store 20000x20000"),
        (["--aspect", "0:1"], "--aspect"),
        (["--size", "70000"], "65536"),
        (["--size", "1024", "--strengths", "0.3"], "give exactly 3"),
        (["--scheduler", "klms"], "must be a sampler `linfusion samplers` lists"),
        (["--model", "./no/such/folder"], "does not exist"),
        (["--preset", "nope"], "unknown preset 'nope'"),
        (["--dtype", "fp8"], "--dtype"),
    ],
)
def test_usage_errors_exit_2_without_loading(runner, tmp_path: Path, no_model_loads, args, message) -> None:
    result = run(runner, "generate", "x", "--model", "tiny", "--out", str(tmp_path), *args)
    assert result.exit_code == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not any(tmp_path.iterdir())


def test_empty_prompt_exits_2(runner, tmp_path: Path, no_model_loads) -> None:
    result = run(runner, "generate", "  ", "--model", "tiny", "--out", str(tmp_path))
    assert result.exit_code == 2 and "prompt is empty" in result.stderr


def test_dry_run_loads_no_model(runner, tmp_path: Path, no_model_loads) -> None:
    result = run(
        runner, "generate", "x", "--model", "tiny", "--size", "1024", "--dry-run", "--json", "--out", str(tmp_path)
    )
    assert result.exit_code == 0, result.stderr
    plan = json.loads(result.stdout)
    assert [(s["stage"], s["width"], s["height"]) for s in plan["stages"]] == [
        (1, 128, 128),
        (2, 256, 256),
        (3, 512, 512),
        (4, 1024, 1024),
    ]  # numbers as numbers, stages counted as the table counts them
    assert all("estimated_peak_gib" in s and s["vae"] for s in plan["stages"])
    assert not any(tmp_path.iterdir())


def test_plan_command(runner, no_model_loads) -> None:
    result = run(runner, "plan", "--preset", "sd15-16k", "--json")
    assert result.exit_code == 0, result.stderr
    plan = json.loads(result.stdout)
    assert [s["width"] for s in plan["stages"]] == [1024, 2048, 4096, 8192, 16384]
    assert [s["height"] for s in plan["stages"]] == [512, 1024, 2048, 4096, 8192]
    assert [s["strength"] for s in plan["stages"][1:]] == [0.4, 0.3, 0.2, 0.1]


def test_unwritable_output_folder(runner, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = run(runner, "generate", "x", "--model", "tiny", "--size", "128", "--out", str(blocker / "sub"))
    assert result.exit_code == 2 and "cannot create output folder" in result.stderr  # bad input


def test_help_and_version(runner) -> None:
    assert "generate" in run(runner, "--help").stdout
    assert run(runner, "--version").stdout.startswith("linfusion ")


def test_save_stages_keeps_every_stage(runner, tmp_path: Path) -> None:
    result = run(
        runner,
        "generate",
        "stages",
        "--model",
        "tiny",
        "--size",
        "512",
        "--steps",
        "4",
        "--seed",
        "2",
        "--save-stages",
        "--out",
        str(tmp_path),
        "--json",
    )
    report = json.loads(result.stdout)
    stem = Path(report["path"]).stem
    assert report["stage_files"] == [f"{stem}.stage1.png", f"{stem}.stage2.png"]  # as the log counts: stage 1/3
    for number, (name, size) in enumerate(zip(report["stage_files"], [(128, 128), (256, 256)], strict=True), 1):
        with Image.open(tmp_path / name) as image:
            assert image.size == size
            meta = json.loads(image.text["linfusion"])
            assert (meta["width"], meta["height"], meta["stage"]) == (*size, {"number": number, "of": 3})
            assert f"Size: {size[0]}x{size[1]}" in image.text["parameters"]


def test_plan_before_download_uses_the_known_family(runner, no_model_loads) -> None:
    result = run(runner, "plan", "--preset", "sdxl-16k", "--json")
    plan = json.loads(result.stdout)
    assert plan["family"] == "SDXL" and (plan["stages"][0]["width"], plan["stages"][0]["height"]) == (1024, 1024)


def test_strengths_are_checked_against_the_models_own_plan(runner, no_model_loads) -> None:
    """SDXL's plan (1024 px base) has 4 refine stages to 16K; 4 strengths must be accepted."""
    result = run(runner, "plan", "--preset", "sdxl-16k", "--strengths", "0.4,0.3,0.2,0.1", "--json")
    assert result.exit_code == 0, result.stderr
    assert [s["strength"] for s in json.loads(result.stdout)["stages"][1:]] == [0.4, 0.3, 0.2, 0.1]


def test_long_weighted_prompt_runs_and_is_noted_once(runner, tmp_path: Path) -> None:
    prompt = "(a red fox:1.3), " + ", ".join(["in a snowy [forest]"] * 12)  # well over 75 tokens
    result = run(
        runner, "generate", prompt, "--model", "tiny", "--size", "128", "--steps", "2", "--seed", "1",
        "--out", str(tmp_path), "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert result.stderr.count("prompt is longer than 75 tokens") == 1, result.stderr
    assert "warning" not in result.stderr
    with Image.open(json.loads(result.stdout)["path"]) as image:
        assert image.text["parameters"].startswith(prompt)  # the prompt is kept as written
