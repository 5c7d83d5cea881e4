"""One image split over several processes (gloo on the CPU): the same image as one process, the same latents after
every stage to fp32 reduction-order error (processes forked with torchrun's environment, as tests/parallel_harness.py
starts them), a killed process ending them all and a batch over `--gpus` (torchrun itself), and the plan per
process."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from parallel_harness import launch, ok_results
from PIL import Image
from processes import Processes, read_line
from stage_latents import record_stage_latents

from linfusion_cli.engine.splitting import ImageSplit

LAUNCH = ["-m", "torch.distributed.run", "--standalone"]
LATENT_TOLERANCE = 1e-5  # relative to the latents' largest value: reduction-order error of fp32

CASES = {
    # 2 processes: ControlNet (its own attention and convs split too), LoRA, DPM++ 2M SDE Karras (noise drawn each
    # step, handed to it by the stage: every stochastic sampler is checked band by band in test_samplers.py), the
    # VAE tiled with several tiles per process; 3:2 makes the last stage ragged (21 latent rows, no multiple of 4:
    # bands of 8 and 13 rows)
    "tiny-controlnet-lora-sde": (
        2,
        {"model": "tiny", "size": 256, "aspect": "3:2", "steps": 6, "seed": 5, "controlnet": ["tiny"]}
        | {"control_image": ["previous"], "lora": ["tiny:0.7"], "scheduler": "DPM++ 2M SDE Karras", "vae_tile": 64},
    ),
    # 3 processes, unequal bands (16, 16 then 12, 24, 12 latent rows): SDXL-shaped, demofusion's dilated global
    # branch (its blur too), the base stage run whole on each (16 latent rows make fewer than 3 bands of 4)
    "tiny-sdxl-demofusion": (3, {"model": "tiny-sdxl", "size": 384, "steps": 5, "seed": 3, "refine": "demofusion"}),
}


def _split_job(comm: Any, out: Path, settings: dict[str, Any]) -> str | None:
    """One process's part of the job through the Python API, in a process forked with torchrun's environment and
    its group up (the API joins it as it joins torchrun's): the image and sidecar go to OUT, and each stage's latents
    this process held (its band while the stage ran split, else the whole) with their first row to OUT/latents-RANK.pt."""
    from linfusion_cli.core.api import LinFusionPipeline

    stages: list[tuple[int, torch.Tensor]] = []
    held = ImageSplit.held

    def recording(self: ImageSplit, latents: torch.Tensor) -> Any:
        rows = held(self, latents)
        stages.append((rows.span[0], rows.tensor.detach().cpu().clone()))
        return rows

    ImageSplit.held = recording  # type: ignore[method-assign]  # this forked process's class; it ends with os._exit
    with LinFusionPipeline(out=out, split=True, timeout_s=60, name="x", **settings) as gen:
        result = gen.generate("a house")
    torch.save(stages, out / f"latents-{comm.rank}.pt")
    return str(result.path) if result.path else None


def _split(out: Path, settings: dict[str, Any], nproc: int) -> None:
    """The job split over `nproc` gloo processes forked from this one (tests/parallel_harness.py): RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR and MASTER_PORT as torchrun sets them, the only launch facts the product reads; a fork
    starts in well under a second where a fresh interpreter imports torch and diffusers for ~6 s of CPU."""
    paths = ok_results(launch(nproc, _split_job, out, settings, deadline_s=240, timeout_s=60))
    assert paths[0] == str(out / "x.png") and paths[1:] == [None] * (nproc - 1)  # the first process writes it


def _one_process(out: Path, settings: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """The same job in this process, its latents recorded after each stage as the worker records them."""
    from linfusion_cli.core.api import LinFusionPipeline

    stages = record_stage_latents(monkeypatch)
    with LinFusionPipeline(out=out, split=True, name="x", **settings) as gen:
        gen.generate("a house")
    torch.save(stages, out / "latents-0.pt")


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_split_image_equals_the_one_process_image(tmp_path: Path, case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    nproc, settings = CASES[case]
    _one_process(tmp_path / "one", settings, monkeypatch)
    _split(tmp_path / "split", settings, nproc)
    with Image.open(tmp_path / "one" / "x.png") as a, Image.open(tmp_path / "split" / "x.png") as b:
        one, split = np.asarray(a).astype(int), np.asarray(b).astype(int)
    assert one.shape == split.shape and np.abs(one - split).max() <= 1  # within 1/255 per pixel
    sidecars = [json.loads((tmp_path / d / "x.png.json").read_text()) for d in ("one", "split")]
    assert sidecars[0]["key"] == sidecars[1]["key"] and "parallel" not in sidecars[0]
    parallel = sidecars[1]["parallel"]
    assert parallel["world_size"] == nproc and parallel["backend"] == "gloo" and len(parallel["bands"]) == nproc
    assert sum(parallel["bands"]) * 8 == one.shape[0]  # the last stage split, ragged or not
    assert parallel["comm_bytes"]["sent"] > 0
    assert all(len(s["peak_vram_allocated_gib_per_rank"]) == nproc for s in sidecars[1]["stages"])
    assert all(len(s["sent_bytes_per_rank"]) == nproc and s["phases"]["unet"] > 0 for s in sidecars[1]["stages"])
    assert {"upscale", "vae encode", "vae decode"} <= set(sidecars[1]["stages"][-1]["phases"])  # timed per stage
    reference = torch.load(tmp_path / "one" / "latents-0.pt")
    for rank in range(nproc):  # every process's rows of each stage's latents: its band, or all of a whole stage
        latents = torch.load(tmp_path / "split" / f"latents-{rank}.pt")
        assert len(latents) == len(reference)
        for whole, (first, mine) in zip(reference, latents, strict=True):
            rows = whole[:, :, first : first + mine.shape[-2]]
            assert rows.shape == mine.shape and (rows - mine).abs().max() <= LATENT_TOLERANCE * whole.abs().max()
        assert any(mine.shape[-2] < whole.shape[-2] for whole, (_, mine) in zip(reference, latents, strict=True))
    assert not list((tmp_path / "split").glob("*.png.json"))[1:]  # one writer: one image, one sidecar


def _rank_pid(launcher: int, rank: int) -> int | None:
    """The pid of the launcher's child process with RANK=rank (read from /proc)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        parent = next((line.split()[1] for line in status.splitlines() if line.startswith("PPid:")), "")
        if parent == str(launcher) and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    return None


@pytest.mark.slow
def test_a_killed_process_ends_the_others_and_no_file_is_written(processes: Processes, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["generate", "a fox", "--model", "tiny", "--size", "1024", "--steps", "20", "--seed", "1"]
    proc = processes.start_python(
        *LAUNCH, "--nproc-per-node", "2", "-m", "linfusion_cli", *args, "--out", str(out), "--timeout", "30",
        stdout=subprocess.DEVNULL, env=processes.env(PYTHONUNBUFFERED="1"),
    )  # fmt: skip
    while "stage 2/" not in (line := read_line(proc, 120, "stderr")):  # rank 0's progress: the second stage
        assert line, "the run ended before its second stage"
    victim = _rank_pid(proc.pid, 1)
    assert victim is not None, "no process with RANK=1 under the launcher"
    os.kill(victim, signal.SIGKILL)
    start = time.time()
    proc.communicate(timeout=90)
    assert proc.returncode != 0 and time.time() - start < 60  # all stopped, within a bounded time
    assert not list(out.glob("*.png")) and not list(out.glob(".*part*"))  # no image, no partial file


def test_plan_splits_each_stage_and_plans_one_process(runner) -> None:
    from linfusion_cli.cli.commands import app

    args = ["plan", "--size", "16k", "--aspect", "2:1", "--memory", "frugal", "--json"]  # the same rung for both
    one = json.loads(runner.invoke(app, args).stdout)
    eight = json.loads(runner.invoke(app, [*args, "--world-size", "8"]).stdout)
    assert eight["world_size"] == 8 and eight["stages"][0]["bands_px"] is None  # the base stage runs whole
    last = eight["stages"][-1]
    assert last["bands_px"] == [1024] * 8 and last["per_rank"] == {"width": 16384, "height": 1024, "whole": False}
    assert last["estimated_peak_gib"] < one["stages"][-1]["estimated_peak_gib"] / 3


def test_plan_bands_each_share_that_does_not_fit_whole(runner) -> None:
    """SD-1.5 at 16384^2 on 12 GB GPUs: split over 2, a process's half fits no rung whole (frugal needs ~22 GiB), so
    each process bands its share and it fits; over 8 the share fits whole and is not banded."""
    from linfusion_cli.cli.commands import app

    args = ["plan", "--size", "16k", "--max-vram", "12", "--device", "cuda", "--json"]
    two, eight = (json.loads(runner.invoke(app, [*args, "--world-size", n]).stdout) for n in ("2", "8"))
    last = two["stages"][-1]
    assert (last["memory"], last["fits"], last["per_rank"]["height"]) == ("banded", True, 8192) and two["fits"]
    assert last["estimated_peak_gib"] <= 12 and eight["stages"][-1]["memory"] == "split" and eight["fits"]
    # SDXL's 16K recipe over 2 GPUs of 12 GB fits no rung: the size it suggests is the largest that fits over 2
    sdxl = [*args[:1], "--preset", "sdxl-16k", *args[3:], "--world-size", "2"]
    over = json.loads(runner.invoke(app, sdxl).stdout)
    size = re.search(r"about --size (\d+) fits", over["warnings"][-1])
    assert not over["fits"] and size is not None
    fits = [
        json.loads(runner.invoke(app, [*sdxl, "--size", str(int(size[1]) + more)]).stdout)["fits"] for more in (0, 64)
    ]
    assert fits == [True, False]


@pytest.mark.slow
def test_batch_split_image_with_gpus_makes_each_job_once_and_resumes(processes: Processes, tmp_path: Path) -> None:
    """`--gpus 2 --device cpu` (torch's launcher, started by linfusion itself) on a batch: both processes make each job, the
    first writes it and alone prints its JSON line; a rerun skips them. The second process runs out of memory in
    every job's base stage (the test hook) at `frugal`: both step down the memory ladder together to `banded` (their
    shares in row bands) and run it again."""
    jobs = tmp_path / "jobs.txt"
    jobs.write_text("a fox\na cat\n")
    args = ["batch", str(jobs), "--model", "tiny", "--size", "128", "--steps", "2", "--seed", "7", "--json"]
    args += ["--out", str(tmp_path / "out"), "--gpus", "2", "--device", "cpu", "--memory", "frugal"]  # CPU processes
    first = processes.run(*args, timeout=240, env=processes.env(LINFUSION_INJECT_OOM="0@1"))
    assert first.returncode == 0, first.stderr[-2000:]
    lines = [json.loads(line) for line in first.stdout.splitlines()]
    assert [(r["index"], r["status"]) for r in lines] == [(0, "done"), (1, "done")]
    sidecar = json.loads(Path(lines[0]["sidecar"]).read_text())
    assert sidecar["parallel"]["world_size"] == 2
    for line in lines:
        (stage,) = json.loads(Path(line["sidecar"]).read_text())["stages"]  # 128 px: the base stage alone
        assert stage["retried"].startswith("process 1: out of memory with frugal")
        assert stage["memory_settings"]["name"] == "banded"
    again = processes.run(*args, timeout=240)
    assert [json.loads(line)["status"] for line in again.stdout.splitlines()] == ["skipped", "skipped"]
