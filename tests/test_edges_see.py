"""What a person sees: tables that follow the terminal and never cut a number, progress rows that do
not wrap, Ctrl-C said at once and worded for what it stopped, and help that shows the way."""

from __future__ import annotations

import re
import signal
import subprocess

import pytest
from processes import read_line
from rich.console import Console

from linfusion_cli.cli.commands import app
from linfusion_cli.cli.render import StdoutConsole, render_table
from linfusion_cli.cli.report import stage_table


def stage(index: int, kind: str, size: str, strength: float | None, steps: int, seconds: float) -> dict:
    return {
        "index": index,
        "kind": kind,
        "size": size,
        "strength": strength,
        "steps": steps,
        "seconds": seconds,
        "peak_vram_allocated_gib": 12.5,
        "peak_vram_reserved_gib": 14.25,
        "peak_rss_gib": 3.5,
        "memory_settings": {"name": "frugal"},
        "retried": "once",
    }


REPORT = {
    "stages": [stage(0, "base", "1024x1024", None, 50, 9.5), stage(1, "refine", "16384x16384", 0.1, 5, 1234.56)],
    "width": 16384,
    "height": 16384,
    "seconds": {"model_load": 4.2, "write": 1.3},
}


@pytest.mark.parametrize("width", [60, 80, 100, 200])
def test_the_final_table_never_cuts_a_number(width: int) -> None:
    console = Console(width=width, record=True)
    render_table(stage_table(REPORT, title="16384x16384 -> out.png", width=width), "rich", console)
    text = console.export_text()
    assert "…" not in text
    flat = " ".join(text.split())
    for number in ("1024x1024", "16384x16384", "1234.56", "1244.06", "12.50", "14.25", "3.50", "frugal (retried)"):
        assert number in flat, (number, text)
    assert max(len(line.rstrip()) for line in text.splitlines()) <= width


def test_results_on_stdout_follow_the_terminal(monkeypatch) -> None:
    monkeypatch.setattr("sys.stdout.isatty", lambda: True)
    monkeypatch.setenv("COLUMNS", "100")
    assert StdoutConsole().width == 100  # presets list in a 100-column terminal: 100 wide, not 120
    monkeypatch.setattr("sys.stdout.isatty", lambda: False)
    assert StdoutConsole().width == 100  # piped to a pager or a file: COLUMNS still says how wide
    monkeypatch.delenv("COLUMNS")
    assert StdoutConsole().width == 120  # a file or pipe, and no COLUMNS: the log width


def test_a_narrow_progress_row_shows_the_eta_alone() -> None:
    from rich.progress import Progress

    from linfusion_cli.cli.report import WIDE_ENOUGH, Reporter

    reporter = Reporter(Console(width=60), "rich")
    with reporter:
        assert isinstance(reporter.progress, Progress)
        rate = reporter.progress.columns[-1]
        assert getattr(rate, "compact", None) is True
    assert Reporter(Console(width=WIDE_ENOUGH), "rich").__enter__().progress.columns[-1].compact is False  # type: ignore[union-attr]


@pytest.mark.slow
def test_ctrl_c_is_said_at_once_and_a_single_image_is_not_resumed(processes, tmp_path) -> None:
    args = ["generate", "a fox", "--model", "tiny", "--size", "1024", "--steps", "50", "--out", str(tmp_path)]
    proc = processes.start(*args, stderr=subprocess.STDOUT)
    while "loading tiny" not in read_line(proc, 120):
        pass
    proc.send_signal(signal.SIGINT)  # while the model loads: no safe point for a while
    said = read_line(proc, 10)
    while not said.strip():
        said = read_line(proc, 10)
    rest, _ = proc.communicate(timeout=120)
    assert "SIGINT: stopping at the next safe point" in said + rest
    assert proc.returncode == 130
    assert "interrupted by SIGINT; nothing was saved" in rest and "resume" not in rest
    assert not list(tmp_path.glob("*.png"))


@pytest.mark.parametrize(
    ("command", "example"),
    [
        (["replay"], "linfusion replay"),
        (["info"], "linfusion info"),
        (["presets", "list"], "linfusion presets show"),
        (["presets"], "linfusion presets list"),
        (["bench"], "linfusion bench pipeline"),
        (["bench", "pipeline"], "linfusion bench pipeline"),
        (["distill"], "linfusion distill --model"),
    ],
)
def test_help_ends_with_examples(runner, command: list[str], example: str) -> None:
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0
    assert "Examples" in result.stdout and example in result.stdout


def test_help_says_what_a_new_user_asks(runner) -> None:
    def help_of(*command: str) -> str:
        text = re.sub("[│╭╮╰╯─]", " ", runner.invoke(app, [*command, "--help"]).stdout)  # no panel borders
        return " ".join(text.split())

    distill = help_of("distill")
    assert "Distill LinFusion" in distill and "Distil " not in distill
    assert re.search(r"--data .*\[required", distill)
    assert "a hash of the other settings" in help_of("generate")
    assert "auto, fp16, bf16 or fp32" in help_of("replay")
    assert "--size-cond" in help_of("bench", "pipeline") and "--refine" in help_of("bench", "pipeline")


def test_bench_pipeline_runs_the_refine_method_and_adapters_users_run(runner) -> None:
    import json

    args = ["bench", "pipeline", "--arch", "tiny", "--size", "256", "--steps", "2", "--refine", "demofusion"]
    args += ["--size-cond", "target", "--lora", "tiny", "--controlnet", "tiny", "--control-image", "previous"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["refine"] == "demofusion" and report["size_cond"] == "target"
    assert [a["kind"] for a in report["adapters"]] == ["lora", "controlnet"]
    assert report["stages"][1]["size"] == "256x256"
    bad = runner.invoke(app, ["bench", "pipeline", "--arch", "tiny", "--controlnet", "tiny"])
    assert bad.exit_code == 2 and "control image" in bad.stderr  # checked as a run checks it
