"""Processes that start and die cleanly: `--gpus N` checks the job once, in the launching process, before any
process starts; asks for N GPUs (or --device cpu); and a process a launcher started dies with it, SIGKILL included."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from linfusion_cli.cli import launch
from linfusion_cli.cli.commands import app
from linfusion_cli.engine import placement


@pytest.fixture
def no_launch(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """`relaunch` recorded instead of starting processes."""
    started: list[int] = []
    monkeypatch.setattr(launch, "relaunch", lambda gpus, argv: started.append(gpus) or 0)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    return started


def test_a_bad_value_is_refused_once_before_any_process_starts(runner, no_launch: list[int], tmp_path: Path) -> None:
    for args, said in [
        (["generate", "x", "--model", "tiny", "--steps", "0"], "--steps: must be between 1 and 1000"),
        (["generate", "x", "--model", "tiyn"], "model 'tiyn' does not exist"),
        (["upscale", str(tmp_path / "missing.png"), "--size", "1k"], "cannot read image"),
        (["batch", str(tmp_path / "missing.txt")], "cannot read prompt file"),
    ]:
        result = runner.invoke(app, [*args, "--gpus", "2", "--device", "cpu", "--out", str(tmp_path)])
        assert result.exit_code == 2, result.stderr
        assert result.stderr.count("error:") == 1 and said in result.stderr, result.stderr
    assert no_launch == []


def test_gpus_asks_for_as_many_gpus_or_cpu_processes(
    runner, no_launch: list[int], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = ["generate", "x", "--model", "tiny", "--size", "128", "--out", str(tmp_path), "--gpus", "2"]
    monkeypatch.setattr(launch, "cuda_devices", lambda: 0)
    none = runner.invoke(app, args)
    assert none.exit_code == 2 and no_launch == []
    assert (
        "--gpus 2: this machine has no CUDA device; run it on a machine with GPUs, or add --device cpu" in none.stderr
    )
    assert "--gpus 0" not in none.stderr  # no advice to ask for none (refused as well)
    monkeypatch.setattr(launch, "cuda_devices", lambda: 1)
    one = runner.invoke(app, args)
    assert one.exit_code == 2 and "only 1 CUDA device; give --gpus 1 or fewer" in one.stderr
    assert runner.invoke(app, [*args, "--device", "cpu"]).exit_code == 0 and no_launch == [2]  # asked for: CPU
    monkeypatch.setattr(launch, "cuda_devices", lambda: 4)
    assert runner.invoke(app, args).exit_code == 0 and no_launch == [2, 2]


def test_no_gpu_is_known_without_torch_where_none_can_be(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(placement, "gpu_possible", lambda: False)
    monkeypatch.setattr(launch, "gpu_possible", lambda: False)
    monkeypatch.setitem(sys.modules, "torch", None)  # importing torch would fail
    assert launch.cuda_devices() == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_a_launched_process_dies_with_its_launcher_killed(tmp_path: Path) -> None:
    """A launcher (here a small parent process) killed with SIGKILL: the process it started, as torch's launcher
    starts them (a session of its own, TORCHELASTIC_RUN_ID set), is gone within seconds instead of running on."""
    child = (
        "import time; from linfusion_cli.cli.launch import die_with_launcher; die_with_launcher(); "
        "print('armed', flush=True); time.sleep(120)"
    )
    parent = (
        "import subprocess, sys, time; "
        f"p = subprocess.Popen([sys.executable, '-c', {child!r}], start_new_session=True, stdout=subprocess.PIPE, "
        "text=True); p.stdout.readline(); print(p.pid, flush=True); time.sleep(120)"
    )
    env = {**os.environ, "TORCHELASTIC_RUN_ID": "test"}
    launcher = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True, env=env)
    worker = 0
    try:
        assert launcher.stdout is not None
        worker = int(launcher.stdout.readline())
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait(timeout=10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _alive(worker):
            time.sleep(0.05)
        assert not _alive(worker), "the launched process outlived its launcher"
    finally:
        if worker and _alive(worker):
            os.kill(worker, signal.SIGKILL)
        launcher.kill()


def _alive(pid: int) -> bool:
    """Running (not a zombie waiting for its reaper)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_every_command_arms_it_first(monkeypatch: pytest.MonkeyPatch) -> None:
    from linfusion_cli.cli import commands

    armed: list[bool] = []
    monkeypatch.setattr(commands, "die_with_launcher", lambda: armed.append(True))
    monkeypatch.setattr(sys, "argv", ["linfusion", "--help"])
    usual = gc.get_threshold()
    try:
        with pytest.raises(SystemExit):
            commands.main()
    finally:
        gc.set_threshold(*usual)  # main() collects rarely until a command's heavy imports, which --help never has
    assert armed == [True]
