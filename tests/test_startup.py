"""The CLI's garbage collector: rare collections while torch and diffusers load, then the usual ones with the
imports frozen out of them (cli/startup.py)."""

from __future__ import annotations

import gc
import json
import subprocess
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


STARTS_WITHOUT_TORCH = [  # (arguments, exit code): each must answer without importing torch or diffusers
    (["--version"], 0),
    (["plan", "--model", "tiny", "--size", "16k", "--world-size", "4"], 0),
    (["plan", "--size", "8k", "--device", "cuda", "--max-vram", "24", "--json"], 0),
    (["generate", "x", "--model", "tiny", "--size", "512", "--dry-run"], 0),
    (["generate", "x", "--size", "0"], 2),
    (["generate", "x", "--model", "tiyn"], 2),
    (["generate", "x", "--model", "tiny", "--device", "gpu"], 2),
    (["generate", "x", "--model", "tiny", "--device", "cuda"], 2),
    (["upscale", "missing.png", "--size", "1k"], 2),
    (["batch", "missing.txt"], 2),
    (["replay", "missing.json"], 2),
]


def test_plans_dry_runs_and_refusals_never_import_torch(tmp_path: Path) -> None:
    """Start-up: `--version`, a plan, a dry run and a refused value answer without torch or diffusers (importing
    them takes seconds), on a machine where no GPU can be (as CI's); one fresh interpreter for all of them."""
    from linfusion_cli.engine.placement import gpu_possible

    if gpu_possible():
        pytest.skip("a GPU may be here: then torch is asked which device `auto` is")
    script = (
        "import json, sys\nfrom linfusion_cli.cli.commands import main\ncodes = []\n"
        f"for args in {[args for args, _ in STARTS_WITHOUT_TORCH]!r}:\n"
        "    sys.argv = ['linfusion', *args]\n"
        "    try:\n        main()\n    except SystemExit as done:\n        codes.append(done.code or 0)\n"
        "print(json.dumps([codes, 'torch' in sys.modules, 'diffusers' in sys.modules]), file=sys.stderr)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    codes, torch_imported, diffusers_imported = json.loads(done.stderr.strip().splitlines()[-1])
    assert codes == [code for _, code in STARTS_WITHOUT_TORCH], done.stderr
    assert not torch_imported and not diffusers_imported
    assert "a plan for cuda, which this machine does not have" in done.stdout
