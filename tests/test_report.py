"""What the progress display draws from events: escaped text, agreeing counters, bars from the start,
a summary line per stage, timestamps and ASCII in plain logs."""

from __future__ import annotations

import io
import re

import pytest
from rich.console import Console

from linfusion_cli.base.events import Note, StageFinished, StageStarted, StepDone, TilesDone, Working
from linfusion_cli.cli.render import render_table
from linfusion_cli.cli.report import Reporter, stage_table

SETTINGS = {"name": "split", "cfg_split": True, "ff_chunk": 16384, "attn_chunk": None, "vae_budget_gib": None}
USAGE = {"seconds": 2.0, "peak_vram_allocated_gib": 3.5, "peak_vram_reserved_gib": 4.0, "peak_rss_gib": 1.0}


def _console() -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, width=160, force_terminal=True, color_system=None), buffer


def _task(reporter: Reporter, key: str):
    assert reporter.progress is not None
    return next(t for t in reporter.progress.tasks if t.id == reporter._tasks[key])


def test_rich_stage_counter_agrees_with_its_bar_and_bars_show_from_the_start() -> None:
    console, _ = _console()
    with Reporter(console, "rich") as reporter:
        reporter(StageStarted(1, 5, "refine", "1024x1024", 20, 0.4, SETTINGS))
        stages, steps = _task(reporter, "stages"), _task(reporter, "steps")
        assert stages.fields["counter"] == "stage 2/5" and stages.completed == 1 and stages.total == 5
        assert steps.total == 20 and steps.completed == 0  # before the first step ends
        assert "tiles-encode" in reporter._tasks  # a refine stage starts with the VAE encode
        reporter(StepDone(1, 10, 20, vram_gib=3.25))
        assert _task(reporter, "stages").completed == pytest.approx(1.5)
        headline = reporter.progress.headline.plain  # type: ignore[union-attr]
        assert "memory split (guidance 2 x 1, FF chunks 16384)" in headline and "VRAM peak 3.25 GiB" in headline
        reporter(TilesDone(1, "decode", 0, 4))
        assert _task(reporter, "tiles-decode").total == 4
        reporter(StageFinished(1, 2.0, USAGE))
        assert _task(reporter, "stages").completed == 2


def test_rich_escapes_what_users_and_data_write() -> None:
    console, buffer = _console()
    with Reporter(console, "rich") as reporter:
        reporter(Note("warning", "prompt 'a [red] fox [/] [bold]' is long"))
        reporter(StageStarted(0, 1, "base", "512x512", 4, None, {"name": "[fast]"}))
        reporter(StageFinished(0, 1.0, USAGE))
    out = buffer.getvalue()
    assert "prompt 'a [red] fox [/] [bold]' is long" in out
    assert "memory [fast]" in out


def test_rich_leaves_a_summary_line_per_stage() -> None:
    console, buffer = _console()
    with Reporter(console, "rich") as reporter:
        reporter(StageStarted(0, 2, "base", "512x256", 4, None, SETTINGS))
        for step in range(1, 5):
            reporter(StepDone(0, step, 4))
        reporter(StageFinished(0, 1.5, USAGE))
    assert re.search(
        r"stage 1/2 base 512x256: 1\.5 s, 4 steps at [0-9.]+ s/step, memory split, peak VRAM 3\.50", buffer.getvalue()
    )


def test_plain_lines_carry_timestamps_and_rates() -> None:
    console, buffer = _console()
    with Reporter(console, "plain") as reporter:
        reporter(Note("info", "seed 1"))
        reporter(StageStarted(0, 1, "base", "512x512", 4, None, SETTINGS))
        for step in range(1, 5):
            reporter(StepDone(0, step, 4))
        reporter(TilesDone(0, "decode", 1, 1))
        reporter(StageFinished(0, 1.0, USAGE))
    lines = buffer.getvalue().splitlines()
    assert all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ", line) for line in lines), lines
    assert any("steps 2/4 (stage 1), " in line and "s/step, ETA" in line for line in lines)
    assert any("VAE decode 1/1 tile (stage 1)" in line for line in lines)


def test_quiet_draws_nothing() -> None:
    console, buffer = _console()
    with Reporter(console, "quiet") as reporter:
        reporter(Note("warning", "x"))
        reporter(StageStarted(0, 1, "base", "512x512", 4, None, SETTINGS))
    assert buffer.getvalue() == ""


def test_plain_tables_are_ascii() -> None:
    sidecar = {
        "width": 512,
        "height": 512,
        "seconds": {"model_load": 1.0, "write": 0.1},
        "stages": [
            {
                "index": 0,
                "kind": "base",
                "size": "512x512",
                "strength": None,
                "steps": 4,
                "seconds": 1.0,
                "peak_vram_allocated_gib": None,
                "peak_vram_reserved_gib": None,
                "peak_rss_gib": 1.0,
                "memory_settings": {"name": "[fast]"},
            }
        ],
    }
    console, buffer = _console()
    render_table(stage_table(sidecar, title="512x512 -> out/[x].png"), "plain", console)
    out = buffer.getvalue()
    assert out.isascii() and "+---" in out
    assert "out/[x].png" in out and "[fast]" in out


def test_the_vae_reports_progress_untiled_too() -> None:
    import torch

    from linfusion_cli.engine.vae import TiledVAE
    from linfusion_cli.models.loading import build_random

    seen: list[tuple[str, int, int]] = []
    vae = TiledVAE(build_random("tiny").vae, on_tile=lambda kind, done, total: seen.append((kind, done, total)))
    latents = vae.encode(torch.zeros(1, 3, 64, 64))
    vae.decode(latents)
    assert seen == [("encode", 0, 1), ("encode", 1, 1), ("decode", 0, 1), ("decode", 1, 1)]


def test_uncounted_work_shows_until_the_next_event() -> None:
    console, _ = _console()
    with Reporter(console, "rich") as reporter:
        reporter(Working("loading models/[v2].safetensors"))
        working = _task(reporter, "working")
        assert working.total is None and working.description == "  loading models/\\[v2].safetensors"
        reporter(Note("info", "LinFusion: 16 layers patched"))
        assert "working" in reporter._tasks  # a note does not end it
        reporter(StageStarted(0, 1, "base", "512x512", 4, None, SETTINGS))
        assert "working" not in reporter._tasks
