"""`linfusion batch` end to end on the tiny model: formats, resume, shards, failures, metadata, replay."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from PIL import Image

from linfusion_cli.base.errors import UsageError
from linfusion_cli.cli.commands import app
from linfusion_cli.core.shards import resolve_shard

FAST = ["--model", "tiny", "--size", "128", "--steps", "2"]


def run(runner, *args: str, env: dict[str, str] | None = None):
    return runner.invoke(app, list(args), env=env, catch_exceptions=False)


def lines(result) -> list[dict]:
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


def jobs_file(tmp_path: Path, count: int = 4) -> Path:
    path = tmp_path / "jobs.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"prompt number {i}"}) + "\n" for i in range(count)))
    return path


def test_batch_json_lines_metadata_and_resume(runner, tmp_path: Path) -> None:
    path = tmp_path / "jobs.yaml"
    path.write_text(
        "defaults:\n  negative: blurry\njobs:\n  - prompt: a fox\n    seed: 5\n  - a bird\n"
        "  - prompt: a frog\n    format: jpeg\n    aspect: '2:1'\n"
    )
    out = tmp_path / "out"
    result = run(runner, "batch", str(path), *FAST, "--seed", "100", "--out", str(out), "--json")
    assert result.exit_code == 0, result.stderr
    records = lines(result)
    assert sorted(r["index"] for r in records) == [0, 1, 2] and all(r["status"] == "done" for r in records)
    by_index = {r["index"]: r for r in records}
    assert [by_index[i]["seed"] for i in range(3)] == [5, 101, 102]  # own seed, else base + index
    assert re.fullmatch(r"00000_a-fox_5_128x128_[0-9a-f]{8}\.png", Path(by_index[0]["path"]).name)
    with Image.open(by_index[0]["path"]) as image:
        text = image.text["parameters"]
        assert text.splitlines()[0] == "a fox" and text.splitlines()[1] == "Negative prompt: blurry"
        assert "Seed: 5" in text and "Sampler: DDIM" in text
        assert json.loads(image.text["linfusion"])["seed"] == 5
    with Image.open(by_index[2]["path"]) as image:
        assert image.format == "JPEG" and image.size == (128, 64)
    sidecar = json.loads(Path(by_index[1]["sidecar"]).read_text())
    assert by_index[1]["sidecar"] == by_index[1]["path"] + ".json" and sidecar["schema"] == 1
    assert sidecar["complete"] and sidecar["settings"]["negative"] == "blurry" and sidecar["stages"]

    again = run(runner, "batch", str(path), *FAST, "--seed", "100", "--out", str(out), "--json")
    assert again.exit_code == 0
    assert [r["status"] for r in lines(again)] == ["skipped"] * 3


def test_resume_with_random_seeds(runner, tmp_path: Path) -> None:
    path = jobs_file(tmp_path, 2)
    out = tmp_path / "out"
    first = lines(run(runner, "batch", str(path), *FAST, "--out", str(out), "--json"))
    second = lines(run(runner, "batch", str(path), *FAST, "--out", str(out), "--json"))
    assert [r["status"] for r in second] == ["skipped", "skipped"]
    assert sorted(r["seed"] for r in first) == sorted(r["seed"] for r in second)
    assert len(list(out.glob("*.png"))) == 2


def test_slurm_array_shards_cover_every_job_once(runner, tmp_path: Path) -> None:
    path = jobs_file(tmp_path, 5)
    out = tmp_path / "out"
    seen = []
    for task in ("1", "2"):  # sbatch --array=1-2
        env = {"SLURM_ARRAY_TASK_ID": task, "SLURM_ARRAY_TASK_COUNT": "2", "SLURM_ARRAY_TASK_MIN": "1"}
        result = run(runner, "batch", str(path), *FAST, "--seed", "0", "--out", str(out), "--json", env=env)
        assert result.exit_code == 0, result.stderr
        assert f"shard {int(task) - 1}/2" in result.stderr
        seen += [r["index"] for r in lines(result) if r["status"] == "done"]
    assert sorted(seen) == [0, 1, 2, 3, 4]
    assert len(list(out.glob("*.png"))) == 5


def test_shard_resolution() -> None:
    assert resolve_shard("1/3").index == 1
    assert resolve_shard(None, {"RANK": "2", "WORLD_SIZE": "4"}).count == 4
    assert resolve_shard(None, {}).count == 1
    for bad in ("3/3", "x", "1/0"):
        with pytest.raises(UsageError):
            resolve_shard(bad)


def test_invalid_file_exits_2_before_loading(
    runner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_model_loads: None
) -> None:

    path = tmp_path / "jobs.csv"
    path.write_text("prompt,steps\na,10\nb,lots\n")
    result = run(runner, "batch", str(path), *FAST, "--out", str(tmp_path / "out"))
    assert result.exit_code == 2
    assert "jobs.csv line 3 (job 1): field 'steps' must be a whole number" in result.stderr


def test_a_failing_job_does_not_stop_the_batch(runner, tmp_path: Path) -> None:
    path = tmp_path / "jobs.yaml"
    path.write_text("- prompt: a\n  name: first\n- prompt: b\n  name: second\n- prompt: c\n  name: third\n")
    out = tmp_path / "out"
    (out / "second.png").mkdir(parents=True)  # job 1 fails: a folder sits where its file goes
    result = run(runner, "batch", str(path), *FAST, "--out", str(out), "--json")
    assert result.exit_code == 3
    status = {r["index"]: r["status"] for r in lines(result)}
    assert status == {0: "done", 1: "failed", 2: "done"}
    assert "is not a file" in next(r["error"] for r in lines(result) if r["status"] == "failed")
    assert not [p for p in out.iterdir() if ".part-" in p.name]  # no temp files left behind


def test_every_job_failing_exits_1(runner, tmp_path: Path) -> None:
    path = jobs_file(tmp_path, 2)
    result = run(
        runner, "batch", str(path), *FAST, "--out", str(tmp_path / "out"), "--json", env={"LINFUSION_INJECT_OOM": "0!"}
    )
    assert result.exit_code == 1
    assert all(r["status"] == "failed" and "ran out of device memory" in r["error"] for r in lines(result))


def test_fail_fast(runner, tmp_path: Path) -> None:
    path = jobs_file(tmp_path, 3)
    result = run(
        runner,
        "batch",
        str(path),
        *FAST,
        "--out",
        str(tmp_path / "out"),
        "--json",
        "--fail-fast",
        env={"LINFUSION_INJECT_OOM": "0!"},
    )
    assert result.exit_code == 1 and len(lines(result)) == 1


def test_duplicate_names_are_made_unique(runner, tmp_path: Path) -> None:
    path = tmp_path / "jobs.yaml"
    path.write_text("- prompt: a\n  name: same\n- prompt: b\n  name: same\n")
    result = run(runner, "batch", str(path), *FAST, "--out", str(tmp_path / "out"), "--json")
    assert sorted(Path(r["path"]).name for r in lines(result)) == ["same-2.png", "same.png"]


def test_replay_reproduces_pixels(runner, tmp_path: Path) -> None:
    made = run(
        runner,
        "generate",
        "replay me",
        "--model",
        "tiny",
        "--size",
        "256",
        "--steps",
        "5",
        "--scheduler",
        "euler-a",
        "--out",
        str(tmp_path / "a"),
        "--json",
    )
    report = json.loads(made.stdout)
    again = run(runner, "replay", report["sidecar"], "--out", str(tmp_path / "b"), "--json")
    assert again.exit_code == 0, again.stderr
    replayed = json.loads(again.stdout)
    assert replayed["seed"] == report["seed"] and Path(replayed["path"]).name == Path(report["path"]).name
    with Image.open(report["path"]) as a, Image.open(replayed["path"]) as b:
        assert a.tobytes() == b.tobytes()


def test_info_reads_our_metadata(runner, tmp_path: Path) -> None:
    made = json.loads(
        run(
            runner, "generate", "info me", *FAST, "--format", "webp", "--seed", "9", "--out", str(tmp_path), "--json"
        ).stdout
    )
    result = run(runner, "info", made["path"])
    assert result.exit_code == 0 and "info me" in result.stdout and "Seed: 9" in result.stdout


def test_presets_list_and_show(runner) -> None:
    listed = run(runner, "presets", "list")
    for name in ("sd15-16k", "sd15-16k-fast", "sd15-16k-demofusion", "sdxl-16k", "low-vram"):
        assert name in listed.stdout
    shown = run(runner, "presets", "show", "sd15-16k")
    assert "base_size: 1024" in shown.stdout


def test_user_preset_file_is_validated(runner, tmp_path: Path) -> None:
    bad = tmp_path / "mine.yaml"
    bad.write_text("description: mine\nstepz: 3\n")
    result = run(runner, "generate", "x", "--preset", str(bad), "--model", "tiny", "--dry-run")
    assert result.exit_code == 2 and "unknown field 'stepz'" in result.stderr


def test_replay_of_an_image_that_records_nothing_says_so(runner, tmp_path: Path) -> None:
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    result = run(runner, "replay", str(tmp_path / "x.png"))
    assert result.exit_code == 2
    assert "x.png records no generation parameters (no sidecar beside it" in result.stderr
