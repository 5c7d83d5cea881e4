"""Fault injection: killed and terminated batches, failing writes, out-of-memory, hostile paths and pickles."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from PIL import Image
from processes import Processes, read_line

from linfusion_cli.base.errors import OutputError
from linfusion_cli.cli.commands import app

FAST = ["--model", "tiny", "--size", "256", "--steps", "6"]


def batch_args(jobs: Path, out: Path) -> list[str]:
    return ["batch", str(jobs), *FAST, "--seed", "1", "--out", str(out), "--json"]


def start_batch(processes: Processes, jobs: Path, out: Path) -> subprocess.Popen[str]:
    # stderr unread, one torch thread: two would spin beside xdist's workers
    return processes.start(*batch_args(jobs, out), stderr=subprocess.DEVNULL)


def wait_for_first_line(proc: subprocess.Popen[str], timeout: float = 120) -> dict:
    line = read_line(proc, timeout)
    assert line, "the batch ended without output"
    return json.loads(line)


def check_outputs(out: Path) -> list[Path]:
    """Every image present is complete (decodes fully) and has its sidecar."""
    images = sorted(out.glob("*.png"))
    for path in images:
        with Image.open(path) as image:
            image.load()
        assert json.loads(path.with_name(path.name + ".json").read_text())["complete"]
    return images


def make_jobs(tmp_path: Path, count: int) -> Path:
    jobs = tmp_path / "jobs.txt"
    jobs.write_text("".join(f"prompt {i}\n" for i in range(count)))
    return jobs


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM", "SIGINT"])
def test_stopped_batch_resumes_without_losing_anything(processes: Processes, runner, tmp_path: Path, how: str) -> None:
    """A batch stopped in its own process; the same command then resumes it (in this process: resuming reads only
    what the stopped one left on disk)."""
    jobs, out = make_jobs(tmp_path, 5), tmp_path / "out"
    proc = start_batch(processes, jobs, out)
    first = wait_for_first_line(proc)
    proc.send_signal(getattr(signal, how))
    code = proc.wait(timeout=120)
    if how != "SIGKILL":
        assert code == {"SIGTERM": 143, "SIGINT": 130}[how]  # stopped at a safe point, pending writes finished
        assert not [p for p in out.iterdir() if ".part-" in p.name]
        assert proc.stdout is not None
        lines = [first, *(json.loads(line) for line in proc.stdout.read().splitlines())]
        assert sorted(line["index"] for line in lines) == [0, 1, 2, 3, 4]  # every job its line, as a full disk
        stopped = [line for line in lines if line["status"] == "stopped"]
        assert stopped and all(f"interrupted by {how}" in line["error"] for line in stopped)
    else:
        assert code == -signal.SIGKILL
    done_before = check_outputs(out)
    assert 1 <= len(done_before) < 5
    rerun = runner.invoke(app, batch_args(jobs, out))
    assert rerun.stdout and rerun.exit_code == 0, rerun.stderr
    assert len(check_outputs(out)) == 5
    assert not [p for p in out.iterdir() if ".part-" in p.name]  # the rerun cleared any stale temp file


def test_full_disk_leaves_no_partial_file(runner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import linfusion_cli.io.pngfast as pngfast

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pngfast, "write_png", full)
    result = runner.invoke(app, ["generate", "x", *FAST, "--out", str(tmp_path)], catch_exceptions=False)
    assert result.exit_code == 1 and "No space left on device" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_read_only_output_folder(runner, tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root can write into read-only folders")
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        result = runner.invoke(app, ["generate", "x", *FAST, "--out", str(folder)], catch_exceptions=False)
    finally:
        folder.chmod(0o755)
    assert result.exit_code == 2 and "not writable" in result.stderr  # bad input, before any model loads


def test_unwritable_output_is_reported_before_loading(
    runner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_model_loads: None
) -> None:
    import linfusion_cli.core.run as output  # where the run calls it

    def denied(folder: Path) -> Path:
        raise OutputError(f"output folder {folder} is not writable: Permission denied")

    monkeypatch.setattr(output, "prepare_folder", denied)

    result = runner.invoke(app, ["generate", "x", *FAST, "--out", str(tmp_path)], catch_exceptions=False)
    assert result.exit_code == 1 and "not writable" in result.stderr


def test_planted_link_at_temp_name_is_not_followed(tmp_path: Path) -> None:
    from linfusion_cli.io.writes import atomic_file

    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    target = tmp_path / "out.png"
    (tmp_path / f".out.png.part-{os.getpid()}").symlink_to(victim)
    with atomic_file(target) as handle:
        handle.write(b"new image")
    assert victim.read_text() == "keep me" and target.read_bytes() == b"new image"


def test_out_of_memory_steps_down_and_retries(runner, tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        ["generate", "x", *FAST, "--out", str(tmp_path), "--json"],
        env={"LINFUSION_INJECT_OOM": "1"},
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.stderr
    stages = json.loads(result.stdout)["stages"]
    assert stages[1]["retried"] and "retried with" in stages[1]["retried"]
    assert stages[1]["memory_settings"]["name"] != stages[0]["memory_settings"]["name"]
    assert "out of memory" in result.stderr


def test_out_of_memory_twice_is_a_clear_error(runner, tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        ["generate", "x", *FAST, "--out", str(tmp_path)],
        env={"LINFUSION_INJECT_OOM": "0!"},
        catch_exceptions=False,
    )
    assert result.exit_code == 1
    assert "ran out of device memory again after a retry with more frugal settings" in result.stderr
    assert "Traceback" not in result.stderr and list(tmp_path.iterdir()) == []


def test_nan_output_fails_the_job_with_a_reason(runner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import linfusion_cli.engine.stages as stages

    real = stages.denoise
    monkeypatch.setattr(stages, "denoise", lambda *a, **k: real(*a, **k) * float("nan"))
    result = runner.invoke(app, ["generate", "x", *FAST, "--out", str(tmp_path)], catch_exceptions=False)
    assert result.exit_code == 1 and "NaN" in result.stderr and list(tmp_path.iterdir()) == []


def test_malicious_pickle_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {}, "payload": Evil()}, path)
    from linfusion_cli.base.errors import UnsafeFileError
    from linfusion_cli.models.loading import load_components

    for allow in (False, True):
        with pytest.raises(UnsafeFileError):
            load_components(str(path), device="cpu", dtype=torch.float32, allow_pickle=allow)
    assert not marker.exists()


@pytest.mark.parametrize("name", ["../../escape", "/etc/passwd", "a/b\\c", "con\x00trol\n", "..", "." * 300])
def test_hostile_names_stay_in_the_output_folder(runner, tmp_path: Path, name: str) -> None:
    """A name with a folder in it (or a hidden file's leading dot) is refused, naming the job, rather than quietly
    becoming another name; anything else becomes a safe file name, inside --out."""
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"prompt": "x", "name": name}) + "\n")
    out = tmp_path / "out"
    result = runner.invoke(
        app,
        ["batch", str(jobs), "--model", "tiny", "--size", "128", "--steps", "2", "--out", str(out), "--json"],
        catch_exceptions=False,
    )
    if "/" in name or "\\" in name or name.startswith("."):
        assert result.exit_code == 2 and "jobs.jsonl line 1 (job 0): field 'name'" in result.stderr
        assert not any(p.is_file() for p in tmp_path.rglob("*") if p != jobs)
        return
    assert result.exit_code == 0, result.stderr
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p.parent != tmp_path]
    assert written and all(p.parent == out for p in written)
    assert all(len(p.name) < 140 for p in written)


def test_truncated_and_huge_inputs(runner, tmp_path: Path) -> None:
    good = tmp_path / "good.png"
    Image.new("RGB", (400, 300), (10, 200, 30)).save(good)
    cut = tmp_path / "cut.png"
    cut.write_bytes(good.read_bytes()[:200])
    result = runner.invoke(
        app, ["upscale", str(cut), "--model", "tiny", "--size", "512", "--out", str(tmp_path)], catch_exceptions=False
    )
    assert result.exit_code == 2 and "damaged or cut short" in result.stderr
    result = runner.invoke(
        app,
        [
            "upscale",
            str(good),
            "--model",
            "tiny",
            "--size",
            "512",
            "--out",
            str(tmp_path),
            "--max-input-pixels",
            "1000",
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 2 and "above the limit" in result.stderr
