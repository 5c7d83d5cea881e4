"""The CLI's garbage collector: rare collections while torch and diffusers load, then the usual ones with the
imports frozen out of them (cli/startup.py)."""

from __future__ import annotations

import gc
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from linfusion_cli.cli import startup
from linfusion_cli.cli.commands import main


@pytest.fixture
def collector() -> Iterator[tuple[int, ...]]:
    usual = gc.get_threshold()
    try:
        yield usual
    finally:
        gc.unfreeze()
        gc.set_threshold(*usual)


def test_started_restores_the_usual_collector_once(collector: tuple[int, ...]) -> None:
    startup.starting()
    assert gc.get_threshold() == (startup.STARTUP_THRESHOLD, *collector[1:])
    startup.started()
    assert gc.get_threshold() == collector and gc.get_freeze_count() > 0
    frozen = gc.get_freeze_count()
    kept = [[i] for i in range(1000)]  # tracked objects a second freeze would add
    startup.started()  # a second call, or one without `starting` (the Python API, a test): nothing
    assert gc.get_threshold() == collector and gc.get_freeze_count() < frozen + len(kept)  # frozen ones may die


def test_a_cli_run_collects_as_usual_once_its_imports_are_done(
    collector: tuple[int, ...], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = ["generate", "x", "--model", "tiny", "--size", "128", "--steps", "2", "--out", str(tmp_path), "--quiet"]
    monkeypatch.setattr(sys, "argv", ["linfusion", *args])
    with pytest.raises(SystemExit) as done:
        main()
    assert done.value.code in (0, None) and list(tmp_path.glob("*.png"))
    assert gc.get_threshold() == collector and gc.get_freeze_count() > 0


def test_a_command_without_heavy_imports_still_collects(collector: tuple[int, ...], monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", ["linfusion", "presets", "list"])
    with pytest.raises(SystemExit):
        main()
    assert 0 < gc.get_threshold()[0] <= startup.STARTUP_THRESHOLD  # rarer while it lasts, never off
    assert gc.isenabled()
