"""Farm-proof batches: every job exactly once whatever the array, the crash or the file."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from processes import Processes, read_line

from linfusion_cli.base.errors import UsageError
from linfusion_cli.cli.commands import app
from linfusion_cli.core.shards import resolve_shard, slurm_shard

FAST = ["--model", "tiny", "--size", "64", "--steps", "1"]


def run(runner, *args: str, env: dict[str, str] | None = None):
    return runner.invoke(app, list(args), env=env, catch_exceptions=False)


def lines(result) -> list[dict]:
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


def prompts(tmp_path: Path, count: int, name: str = "p.txt") -> Path:
    path = tmp_path / name
    path.write_text("".join(f"prompt {i}\n" for i in range(count)))
    return path


def images_by_index(out: Path) -> dict[int, list[str]]:
    found: dict[int, list[str]] = {}
    for path in out.glob("*.png"):
        found.setdefault(int(path.name[:5]), []).append(path.name)
    return found


# --- 1. resume by what a job is, not by its seed ----------------------------------------------------------------


def test_orphan_image_without_sidecar_is_replaced_not_duplicated(runner, tmp_path: Path) -> None:
    jobs, out = prompts(tmp_path, 2), tmp_path / "out"
    first = lines(run(runner, "batch", str(jobs), *FAST, "--out", str(out), "--json"))
    orphan = next(r for r in first if r["index"] == 0)
    Path(orphan["sidecar"]).unlink()  # a crash between the image's rename and the sidecar's
    second = run(runner, "batch", str(jobs), *FAST, "--out", str(out), "--json")
    assert second.exit_code == 0, second.stderr
    status = {r["index"]: r for r in lines(second)}
    assert status[0]["status"] == "done" and status[1]["status"] == "skipped"
    assert status[0]["path"] == orphan["path"] and status[0]["seed"] == orphan["seed"]  # replaced in place
    assert {i: len(names) for i, names in images_by_index(out).items()} == {0: 1, 1: 1}
    assert Path(orphan["sidecar"]).exists()


def test_a_changed_job_is_not_taken_for_the_old_one(runner, tmp_path: Path) -> None:
    out = tmp_path / "out"
    jobs = prompts(tmp_path, 1)
    run(runner, "batch", str(jobs), *FAST, "--out", str(out), "--json")
    again = lines(run(runner, "batch", str(jobs), *FAST, "--guidance", "3", "--out", str(out), "--json"))
    assert again[0]["status"] == "done"  # other settings: another image, under another name
    assert len(images_by_index(out)[0]) == 2


def test_names_and_sidecars_never_collide() -> None:
    from linfusion_cli.core.metadata import settings_key
    from linfusion_cli.io.names import output_stem
    from linfusion_cli.io.output import OutputPaths

    base = {"prompt": "a fox", "steps": 50, "guidance": 7.5, "model": "m"}
    keys = {
        settings_key({**base, **change}, 512, 512, 7)
        for change in ({}, {"steps": 20}, {"guidance": 5.0}, {"model": "other"}, {"negative": "blur"})
    }
    assert len(keys) == 5
    assert settings_key(base, 512, 512, 7) != settings_key(base, 512, 512, None)  # a chosen seed is part of it
    assert settings_key(base, 512, 512, 7) != settings_key(base, 512, 768, 7)
    assert settings_key({**base, "low_vram": True, "format": "jpeg"}, 512, 512, 7) == settings_key(base, 512, 512, 7)
    # demofusion's parameters decide the pixels only under demofusion
    assert settings_key({**base, "gaussian_sigma": 2.0}, 512, 512, 7) == settings_key(base, 512, 512, 7)
    demo = {**base, "refine": "demofusion"}
    assert settings_key({**demo, "gaussian_sigma": 2.0}, 512, 512, 7) != settings_key(demo, 512, 512, 7)
    stem = output_stem("a fox", 7, 512, 512, key="0123abcd")
    folder = Path("/tmp/x")
    png, jpeg = OutputPaths.for_stem(folder, stem, "png"), OutputPaths.for_stem(folder, stem, "jpeg")
    assert png.sidecar != jpeg.sidecar and png.sidecar.name == f"{stem}.png.json"


# --- 2. temp files and claims -----------------------------------------------------------------------------------


def test_stale_temp_cleanup_spares_live_writers(tmp_path: Path) -> None:
    import fcntl

    from linfusion_cli.io.locks import host_name
    from linfusion_cli.io.writes import clean_stale_temps

    host = host_name()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        names = {
            "dead": f".a.png.part-{host}-{dead_pid}",
            "live_pid": f".b.png.part-{host}-{live.pid}",
            "foreign_locked": ".c.png.part-othernode-123",
            "foreign_old": ".d.png.part-othernode-124",
            "foreign_young": ".e.png.part-othernode-125",
        }
        for name in names.values():
            (tmp_path / name).write_bytes(b"partial")
        old = time.time() - 3600
        for key in ("foreign_locked", "foreign_old"):
            os.utime(tmp_path / names[key], (old, old))
        holder = os.open(tmp_path / names["foreign_locked"], os.O_RDONLY)
        fcntl.flock(holder, fcntl.LOCK_EX)  # another node's writer, mid-write
        try:
            assert clean_stale_temps(tmp_path) == 2
        finally:
            os.close(holder)
    finally:
        live.kill()
        live.wait()
    left = {p.name for p in tmp_path.iterdir()}
    assert left == {names["live_pid"], names["foreign_locked"], names["foreign_young"]}


def test_claims_exclude_and_die_with_their_process(processes: Processes, tmp_path: Path) -> None:
    from linfusion_cli.io.locks import Claim, try_claim

    path = tmp_path / ".job.claim"
    mine = try_claim(path)
    assert isinstance(mine, Claim) and mine.locked
    other = try_claim(path)
    assert isinstance(other, str) and f"pid {os.getpid()}" in other
    mine.release()
    assert not path.exists()
    again = try_claim(path)
    assert isinstance(again, Claim)
    again.release()

    holder = processes.start_python(
        "-c",
        "import sys, time; from linfusion_cli.io.locks import try_claim; from pathlib import Path; "
        f"c = try_claim(Path({str(path)!r})); print(type(c).__name__, flush=True); time.sleep(60)",
    )
    assert read_line(holder, 60).strip() == "Claim"
    assert isinstance(try_claim(path), str)
    holder.kill()  # SIGKILL: no cleanup code runs; the kernel drops the lock
    holder.wait()
    taken = try_claim(path)
    assert isinstance(taken, Claim)
    taken.release()


@pytest.mark.slow
def test_two_tasks_on_one_folder_make_every_job_exactly_once(processes: Processes, tmp_path: Path) -> None:
    jobs, out = prompts(tmp_path, 6), tmp_path / "out"
    tasks = [processes.start("batch", str(jobs), *FAST, "--out", str(out), "--json") for _ in "ab"]
    results = [task.communicate(timeout=300) for task in tasks]
    assert all(task.returncode == 0 for task in tasks), [err[-2000:] for _, err in results]
    records = [json.loads(line) for stdout, _ in results for line in stdout.splitlines()]
    done = sorted(r["index"] for r in records if r["status"] == "done")
    assert done == list(range(6))  # each job made by exactly one of the two tasks
    assert all(r["status"] in ("done", "skipped", "claimed") for r in records)
    assert {i: len(names) for i, names in images_by_index(out).items()} == {i: 1 for i in range(6)}
    assert not [p for p in out.iterdir() if ".part-" in p.name or p.name.endswith(".claim")]


# --- 3. Slurm arrays ----------------------------------------------------------------------------------------------


def slurm_env(task: int, ids: list[int], *, step: int | None, real_max: bool = True, spec_max: int = 0) -> dict:
    env = {
        "SLURM_ARRAY_TASK_ID": str(task),
        "SLURM_ARRAY_TASK_MIN": str(min(ids)),
        "SLURM_ARRAY_TASK_MAX": str(max(ids) if real_max else max(spec_max, max(ids))),
        "SLURM_ARRAY_TASK_COUNT": str(len(ids)),
    }
    if step is not None:
        env["SLURM_ARRAY_TASK_STEP"] = str(step)
    return env


@settings(max_examples=200, deadline=None)
@given(
    st.integers(0, 40),
    st.integers(0, 60),
    st.integers(1, 9),
    st.booleans(),
    st.booleans(),
    st.integers(1, 50),
)
def test_stepped_arrays_cover_every_job_exactly_once(
    low: int, span: int, step: int, real_max: bool, list_form: bool, jobs: int
) -> None:
    """--array=LOW-HIGH:STEP, or the same ids as a comma list (for which Slurm may report step 1)."""
    ids = list(range(low, low + span + 1, step))
    reported_step = 1 if list_form else step
    shards = []
    for task in ids:
        env = slurm_env(task, ids, step=reported_step, real_max=real_max or list_form, spec_max=low + span)
        if len(ids) == 1 and task != 0:
            with pytest.raises(UsageError, match="--shard"):
                slurm_shard(env)
            return
        shards.append(resolve_shard(None, env))
    assert all(s.count == len(ids) for s in shards)
    owners = [[s.index for s in shards if s.holds(job)] for job in range(jobs)]
    assert all(len(o) == 1 for o in owners)


def test_slurm_array_cases() -> None:
    stepped = [0, 2, 4, 6, 8, 10]  # --array=0-10:2
    assert [slurm_shard(slurm_env(t, stepped, step=2)).index for t in stepped] == [0, 1, 2, 3, 4, 5]
    listed = [1, 5, 9]  # --array=1,5,9
    for reported in (1, 4, None):
        assert [slurm_shard(slurm_env(t, listed, step=reported)).index for t in listed] == [0, 1, 2]
    with pytest.raises(UsageError, match="only task"):  # resubmitting task 3 alone
        slurm_shard(slurm_env(3, [3], step=1))
    uneven = [1, 2, 9]  # cannot be placed: the odd task refuses instead of leaving a shard unrun
    with pytest.raises(UsageError, match="not evenly spaced"):
        slurm_shard(slurm_env(2, uneven, step=1))
    assert resolve_shard("3/8", slurm_env(3, [3], step=1)).index == 3  # the documented resubmission


def test_local_rank_is_read_in_one_place(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from linfusion_cli.engine import memory

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert memory.resolve_device("auto") == torch.device("cuda", 0)
    assert memory.resolve_device("auto", local_rank=2) == torch.device("cuda", 2)
    monkeypatch.setenv("LOCAL_RANK", "3")  # torchrun
    assert memory.resolve_device("auto") == torch.device("cuda", 3)
    monkeypatch.setenv("LOCAL_RANK", "x")
    with pytest.raises(UsageError):
        memory.resolve_device("auto")


# --- 4, 8. one job's bad input or bad output name fails that job only -----------------------------------------


def test_truncated_input_image_fails_its_job_only(runner, tmp_path: Path) -> None:
    from PIL import Image

    good, cut = tmp_path / "good.png", tmp_path / "cut.png"
    Image.new("RGB", (64, 64), (10, 200, 30)).save(good)
    Image.effect_noise((64, 64), 60).convert("RGB").save(cut)
    cut.write_bytes(cut.read_bytes()[:-2000])  # the header reads fine, the pixels do not
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("".join(json.dumps(j) + "\n" for j in [{"image": str(cut)}, {"prompt": "a"}, {"image": str(good)}]))
    result = run(runner, "batch", str(jobs), *FAST, "--out", str(tmp_path / "out"), "--json")
    assert result.exit_code == 3, result.stderr
    status = {r["index"]: r for r in lines(result)}
    assert [status[i]["status"] for i in range(3)] == ["failed", "done", "done"]
    assert "damaged or cut short" in status[0]["error"]


def test_unreadable_input_image_is_refused_before_the_model_loads(
    runner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_model_loads: None
) -> None:

    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 10)
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"image": str(bad)}) + "\n")
    result = run(runner, "batch", str(jobs), *FAST, "--out", str(tmp_path / "out"))
    assert result.exit_code == 2 and "jobs.jsonl line 1" in result.stderr


def test_a_link_at_one_output_name_fails_that_job_only(runner, tmp_path: Path) -> None:
    jobs = tmp_path / "jobs.yaml"
    jobs.write_text("- prompt: a\n  name: one\n- prompt: b\n  name: two\n")
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim.png"
    victim.write_bytes(b"keep")
    (out / "one.png").symlink_to(victim)
    os.mkfifo(out / "three.png.json")  # a FIFO where a sidecar goes: refused, never opened for reading
    jobs.write_text(jobs.read_text() + "- prompt: c\n  name: three\n")
    result = run(runner, "batch", str(jobs), *FAST, "--out", str(out), "--json")
    assert result.exit_code == 3, result.stderr
    status = {r["index"]: r for r in lines(result)}
    assert status[0]["status"] == "failed" and "symbolic link" in status[0]["error"]
    assert status[1]["status"] == "done" and victim.read_bytes() == b"keep"
    assert status[2]["status"] == "failed" and "not a file" in status[2]["error"]


def test_a_failed_write_fails_its_job_and_a_full_disk_stops_the_batch(
    runner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import linfusion_cli.io.pngfast as pngfast

    real, calls = pngfast.write_png, []

    def flaky(array, text, out):
        calls.append(1)
        if len(calls) == 1:
            raise OSError(errno.EIO, "Input/output error")
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(array, text, out)

    monkeypatch.setattr(pngfast, "write_png", flaky)
    jobs = prompts(tmp_path, 6)
    result = run(runner, "batch", str(jobs), *FAST, "--seed", "1", "--out", str(tmp_path / "out"), "--json")
    assert result.exit_code == 1 and "No space left on device" in result.stderr
    status = {r["index"]: r["status"] for r in lines(result)}
    assert status[0] == "failed" and status[1] == "done" and status[2] == "failed"
    assert len(calls) <= 4  # stopped: not one failure per remaining job
    assert sorted(status) == list(range(6)) and "stopped" in status.values()  # but a line for each


# --- 5, 6, 7. hostile files: no traceback, short messages, no hang, no unbounded read ------------------------------


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("big.jsonl", '{"prompt": "x", "seed": ' + "9" * 5000 + "}\n", "cannot be read"),
        ("big.yaml", "- prompt: x\n  seed: " + "9" * 5000 + "\n", "cannot be read"),
        ("big.csv", "prompt,seed\nx," + "9" * 5000 + "\n", "whole number"),
        ("deep.jsonl", '{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}\n", "nested too deeply"),
        ("deep.yaml", "- prompt: " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply"),
        ("dup.jsonl", '{"prompt": "a", "prompt": "b"}\n', "appears twice"),
        ("dup.csv", "prompt,seed,seed\na,1,2\n", "appear twice"),
        ("dup.yaml", "- prompt: a\n  prompt: b\n", "appears twice"),
        ("empty.txt", "# only a comment\n\n", "nothing to do"),
        ("huge.jsonl", json.dumps({"prompt": "x" * 1_000_000}) + "\n", "limit is 10000"),
    ],
)
def test_hostile_prompt_files_exit_2_with_a_short_message(runner, tmp_path: Path, name: str, text: str, expected: str):
    path = tmp_path / name
    path.write_text(text)
    result = run(runner, "batch", str(path), *FAST, "--out", str(tmp_path / "out"))
    assert result.exit_code == 2 and expected in result.stderr, result.stderr[:500]
    assert "Traceback" not in result.stderr and len(result.stderr) < 1000


def test_yaml_alias_bomb_is_refused_quickly(runner, tmp_path: Path) -> None:
    bomb = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    for level in "bcdefghi":
        previous = chr(ord(level) - 1)
        bomb.append(f"{level}: &{level} [" + ", ".join([f"*{previous}"] * 9) + "]")
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(bomb) + "\njobs: [{prompt: 1}]\n")
    assert path.stat().st_size < 400
    start = time.perf_counter()
    result = run(runner, "batch", str(path), *FAST, "--out", str(tmp_path / "out"))
    assert result.exit_code == 2 and "aliases" in result.stderr and len(result.stderr) < 1000
    assert time.perf_counter() - start < 10


def test_special_files_are_refused_not_read(runner, tmp_path: Path) -> None:
    fifo = tmp_path / "jobs.txt"
    os.mkfifo(fifo)
    zero = tmp_path / "zero.json"
    zero.symlink_to("/dev/zero")
    start = time.perf_counter()
    result = run(runner, "batch", str(fifo), *FAST, "--out", str(tmp_path / "out"))
    assert result.exit_code == 2 and "FIFO" in result.stderr
    result = run(runner, "replay", str(zero), "--out", str(tmp_path / "out"))
    assert result.exit_code == 2 and "character device" in result.stderr
    preset_fifo = tmp_path / "p.yaml"
    os.mkfifo(preset_fifo)
    result = run(runner, "generate", "x", *FAST, "--preset", str(preset_fifo), "--dry-run")
    assert result.exit_code == 2
    image_fifo = tmp_path / "in.png"
    os.mkfifo(image_fifo)
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"image": str(image_fifo)}) + "\n")
    result = run(runner, "batch", str(jobs), *FAST, "--out", str(tmp_path / "out"))
    assert result.exit_code == 2 and "FIFO" in result.stderr
    result = run(runner, "info", str(image_fifo))
    assert result.exit_code == 2 and "FIFO" in result.stderr
    assert time.perf_counter() - start < 30  # nothing waited on a writer


def test_sidecar_with_odd_fields_and_truncated_png_info(runner, tmp_path: Path) -> None:
    from PIL import Image

    from linfusion_cli.core.replay import job_from_sidecar

    sidecar = tmp_path / "x.png.json"
    sidecar.write_text(json.dumps({"settings": {"prompt": "a"}, "seed": 3, "file": "x.png", "dtype": "float16"}))
    job, dtype = job_from_sidecar(sidecar)
    assert job.prompt == "a" and job.seed == 3 and job.name is None and dtype == "fp16"
    sidecar.write_text(json.dumps({"settings": {"prompt": "a"}, "seed": 1e400}).replace("1e400", "1" + "0" * 5000))
    result = run(runner, "replay", str(sidecar), "--out", str(tmp_path / "out"))
    assert result.exit_code == 2 and "Traceback" not in result.stderr

    png = tmp_path / "cut.png"
    Image.effect_noise((64, 64), 60).convert("RGB").save(png, pnginfo=_text("parameters", "hello"))
    png.write_bytes(png.read_bytes()[:-1500])
    result = run(runner, "info", str(png))
    assert result.exit_code == 2 and "damaged or cut short" in result.stderr


def _text(key: str, value: str):
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text(key, value)
    return info


# --- smaller ------------------------------------------------------------------------------------------------------


def test_nul_in_a_prompt_never_reaches_a_png_text_chunk(tmp_path: Path) -> None:
    import io
    import struct

    import numpy as np

    from linfusion_cli.io.pngfast import write_png

    buffer = io.BytesIO()
    write_png(np.zeros((8, 8, 3), np.uint8), {"parameters": "a\x00b", "linfusion": "ü\x00"}, buffer)
    data, pos = buffer.getvalue(), 8
    while pos < len(data):
        length, tag = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        if tag == b"tEXt":
            assert body.count(b"\x00") == 1  # the keyword separator only
        if tag == b"iTXt":
            _, _, rest = body.partition(b"\x00")
            assert b"\x00" not in rest[4:]  # after flag, method, empty language and translated keyword
        pos += 12 + length


@pytest.mark.parametrize("name", ["CON", "nul", "Com1", "lpt9.txt", "aux"])
def test_windows_device_names_are_not_used(name: str) -> None:
    from linfusion_cli.io.names import sanitize_name

    safe = sanitize_name(name)
    assert safe.split(".")[0].upper() not in ("CON", "NUL", "COM1", "LPT9", "AUX")


def test_unwritable_output_folder_is_bad_input(runner, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = run(runner, "batch", str(prompts(tmp_path, 1)), *FAST, "--out", str(blocker / "out"))
    assert result.exit_code == 2 and "cannot create output folder" in result.stderr


def test_pillow_bomb_guard_is_left_as_it_was(tmp_path: Path) -> None:
    from PIL import Image

    from linfusion_cli.io.images import load_rgb, open_image

    path = tmp_path / "x.png"
    Image.new("RGB", (32, 16)).save(path)
    before = Image.MAX_IMAGE_PIXELS
    assert load_rgb(path).shape == (16, 32, 3)
    with open_image(path) as image:
        assert image.size == (32, 16)
    assert Image.MAX_IMAGE_PIXELS == before and before is not None


def test_writer_never_records_a_job_twice_nor_hides_a_broken_stream(tmp_path: Path) -> None:
    from linfusion_cli.core.batch import run_batch
    from linfusion_cli.core.batch_plan import plan_batch
    from linfusion_cli.core.jobs import flags_layer
    from linfusion_cli.core.prepare import RunOptions

    seen: list[dict] = []

    def broken_stdout(line: dict) -> None:
        seen.append(line)
        raise BrokenPipeError(errno.EPIPE, "Broken pipe")

    flags = flags_layer({"model": "tiny", "size": 64, "steps": 1})
    options = RunOptions(out=tmp_path / "out", device="cpu")
    with pytest.raises(BrokenPipeError):
        run_batch(plan_batch(prompts(tmp_path, 2), flags, options, None), options, on_line=broken_stdout)
    assert [line["status"] for line in seen] == ["done"]  # not also "failed", and the next job is not blamed
    assert not list((tmp_path / "out").glob(".*.claim"))


def test_json_layout_is_shared(runner, tmp_path: Path) -> None:
    report = json.loads(run(runner, "generate", "x", *FAST, "--seed", "2", "--out", str(tmp_path), "--json").stdout)
    sidecar = json.loads(Path(report["sidecar"]).read_text())
    line = lines(run(runner, "batch", str(prompts(tmp_path, 1)), *FAST, "--out", str(tmp_path / "b"), "--json"))[0]
    for record in (report, sidecar, line):
        assert record["schema"] == 1 and isinstance(record["seconds"], dict)
    assert report["dtype"] == sidecar["dtype"] == "fp32"
    assert set(report["seconds"]) >= {"generate", "model_load", "write"} and "total" in line["seconds"]
    assert "peak_vram_allocated_gib" in line and "peak_vram_allocated_gib" in report["stages"][0]
