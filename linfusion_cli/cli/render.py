"""Results drawn for people: tables (ASCII in logs) and the plan on stdout."""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any

from rich import box
from rich.console import Console, ConsoleOptions, RenderResult
from rich.markup import escape
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from ..base.errors import EXIT_PIPE, OutputClosedError
from ..base.text import plural
from ..engine.refine import REFINE_METHODS
from ..models.adapters import ADAPTER_KINDS
from .boundary import emit_json, output_width, stderr

UNBOUNDED = 100_000  # columns to measure a table's natural width in
CONTINUED = "  "  # the indent of a table row's continuation lines


class StdoutConsole(Console):
    """Results on stdout: as wide as COLUMNS says, else the terminal (120 columns in a file or pipe). A reader that
    goes away (`| head -1`) ends the command quietly with the shell's SIGPIPE status, as other tools end."""

    def __init__(self) -> None:
        super().__init__(width=output_width(sys.stdout), highlight=False, emoji=False)

    def on_broken_pipe(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's flush at exit: no complaint
        raise SystemExit(EXIT_PIPE)


class FieldLines:
    """A table's rows as lines, `stage 2 refine: size 256x256, steps 3, ...`: its title and caption wrapped as
    prose, each row's fields broken between fields only. A field longer than a line (a long output path) is left
    whole, past the width: cut, its end (the file's name) would be lost; the terminal shows it wrapped."""

    def __init__(self, title: Any, lines: list[str], caption: Any) -> None:
        self.title, self.lines, self.caption = title, lines, caption

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        if self.title:
            yield Text.from_markup(str(self.title), style="table.title")
        for line in self.lines:
            yield Text.from_markup(line, overflow="ignore")
        if self.caption:
            yield Text.from_markup(str(self.caption), style="table.caption")

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        return Measurement(1, max((len(line) for line in self.lines), default=1))


def lines_if_wider(table: Table, width: int | None, console: Console) -> Table | FieldLines:
    """`table` if it fits `width` columns (None: no limit); else the same rows as FieldLines, wrapped between
    fields, never inside one. Squeezed into a narrow terminal, rich cuts or folds cells ("128x..."): a size or a
    number must never be cut."""
    natural = console.measure(table, options=console.options.update_width(UNBOUNDED)).maximum
    if width is None or natural <= width:
        return table
    headers = [str(column.header) for column in table.columns]
    lines: list[str] = []
    for first, *rest in zip(*(list(column.cells) for column in table.columns), strict=True):
        head = str(first) if str(first) == "total" else f"{headers[0]} {first}"
        fields = [f"{name} {cell}" for name, cell in zip(headers[1:], rest, strict=True) if str(cell)]
        lines += fields_in_lines(f"{head}:", fields, width)
    return FieldLines(table.title, lines, table.caption)


def fields_in_lines(head: str, fields: list[str], width: int) -> list[str]:
    """`head field, field, ...` in lines of at most `width` columns, broken only between fields (a field longer
    than a line stands alone on its own)."""
    lines: list[str] = []
    line = head
    for index, field in enumerate(fields):
        piece = field + ("," if index < len(fields) - 1 else "")
        if len(line) + 1 + len(piece) > width:
            lines.append(line)
            line = CONTINUED + piece
        else:
            line = f"{line} {piece}"
    return [*lines, line]


def render_table(table: Any, mode: str, console: Console | None = None, *, prose: bool = False) -> None:
    """A table on stderr (or `console`), as lines where it is wider than the console (COLUMNS, the terminal, or
    120 in a log); plain ASCII in logs, where box drawing turns to mojibake. `prose`: its last column is text
    that wraps between words (a description), so the table is kept and squeezed to the width, never turned to
    lines."""
    console = console or stderr
    if isinstance(table, Table) and not prose:
        table = lines_if_wider(table, console.width, console)
    if mode == "plain" and isinstance(table, Table) and table.box is not None:
        table.box = box.ASCII
    console.print(table, crop=False)  # FieldLines' longest fields are left whole


def emit_result(data: dict[str, Any]) -> None:
    """A result as JSON on stdout; a reader gone (`| head -1`) ends the command quietly, as a table does (nothing
    is lost: a plan is made again in a moment)."""
    try:
        emit_json(data)
    except OutputClosedError:
        raise SystemExit(EXIT_PIPE) from None


def render_plan(summary: dict[str, Any], json_out: bool) -> None:
    """The plan is the command's result: on stdout, as JSON or a table."""
    if json_out:
        emit_result(summary)
        return
    out = StdoutConsole()
    table = Table(
        title=f"{summary['width']}x{summary['height']} with {summary['model']} ({summary['family']}, "
        f"native {summary['native']} px) on {summary['device']}, {summary['dtype']}",
        title_justify="left",
    )
    split = summary.get("world_size", 1) > 1
    columns = ["stage", "kind", "size", *(["per process"] if split else []), "strength", "steps", "UNet passes"]
    host = any(s.get("estimated_host_gib") for s in summary["stages"])  # skips parked in CPU memory
    for col in (*columns, "memory", "est. peak GiB", *(["est. CPU GiB"] if host else []), "VAE"):
        table.add_column(col)
    if split:
        title = f" split over {summary['world_size']} processes (memory per process)"
        table.title = f"{table.title},{title}"
    method = str(summary.get("refine"))
    if method in REFINE_METHODS:
        table.caption = REFINE_METHODS.get(method).caption
    for s in summary["stages"]:
        table.add_row(
            str(s["stage"]),
            s["kind"],
            f"{s['width']}x{s['height']}",
            *([_per_process(s["per_rank"])] if split else []),
            "-" if s["strength"] is None else f"{s['strength']:g}",
            str(s["steps"]),
            str(s["unet_passes"]),
            s["memory"],
            f"{s['estimated_peak_gib']:.2f}",  # as the notes say it
            *([f"{s['estimated_host_gib']:.2f}" if s["estimated_host_gib"] else "-"] if host else []),
            s["vae"],
        )
    table.title = escape(str(table.title))
    render_table(table, "rich" if out.is_terminal else "plain", out)
    say_notes(summary)
    sampler = f"sampler {summary['scheduler']}, guidance {summary['guidance']:g}; "
    output = f"output: {summary['output']}; " if summary.get("output") else ""
    budget = summary["memory_budget_gib"]
    budget_text = "unknown (free memory cannot be measured here)" if budget is None else f"{budget} GiB"
    dtypes = ", ".join(f"{part.replace('_', ' ')} {name}" for part, name in summary["dtypes"].items())
    out.print(f"{sampler}{output}memory budget {budget_text}; {dtypes}", markup=False)
    for kind in ADAPTER_KINDS:
        for entry in summary.get(kind.name, []):
            out.print(kind.plan_line(entry), markup=False)
    if "simulation" in summary:
        _render_simulation(summary, out)


def _render_simulation(summary: dict[str, Any], out: Console) -> None:
    """`plan --simulate`: per stage the estimate beside the simulated peak, where the peak is and what it holds,
    and the work; then where the configs came from and the notes."""
    simulation = summary["simulation"]
    card = simulation["card"]
    on = f", time floor on an {card['name']} ({card['tflops_fp16']:g} TFLOPS fp16)" if card else ""
    title = f"simulated on the meta device as a CUDA GPU{on} (in {simulation['seconds']} s)"
    table = Table(title=title, title_justify="left")
    columns = ["stage", "size", "memory", "est. GiB", "sim. GiB", "est./sim.", "peak in", "weights GiB", "TFLOP/step"]
    host = any(s.get("estimated_host_gib") for s in summary["stages"])  # CPU memory: parked skips, the output
    for col in (*columns, "TFLOP", *(["floor s"] if card else []), *(["sim. CPU GiB"] if host else [])):
        table.add_column(col)
    for s in summary["stages"]:
        sim = s["simulated"]
        row = [
            str(s["stage"]),
            f"{s['width']}x{s['height']}",
            sim["memory"],
            f"{s['estimated_peak_gib']:.2f}",
            f"{sim['peak_gib']:.2f}",
        ]
        row += [f"{sim['estimate_over_simulated']:.2f}", sim["peak_phase"], f"{sum(sim['weights_gib'].values()):.2f}"]
        row += [f"{sim['tflop_step']:.1f}", f"{sim['tflop_stage']:.1f}"]
        row += [f"{sim['floor_seconds']:.2f}"] if card else []
        row += [f"{sim['host_peak_gib']:.2f}"] if host else []
        table.add_row(*row)
    render_table(lines_if_wider(table, out.width, out), "rich" if out.is_terminal else "plain", out)
    out.print(f"configs: {simulation['configs']}", markup=False)
    for note in simulation["notes"]:
        stderr.print(f"note: {note}", markup=False, highlight=False)


def render_batch_plan(plans: list[dict[str, Any]], json_out: bool) -> None:
    """`batch --dry-run`: each job's plan, on stdout: one JSON line per job, or one table (a row per job)."""
    if json_out:
        for plan in plans:
            emit_result(plan)
        return
    out = StdoutConsole()
    table = Table(title=f"{plural(len(plans), 'job')} planned; nothing loaded", title_justify="left")
    for col in ("job", "size", "stages", "steps", "est. peak GiB", "output"):
        table.add_column(col, overflow="fold")
    for plan in plans:
        stages = " > ".join(f"{s['width']}x{s['height']}" for s in plan["stages"])
        peak = max((s["estimated_peak_gib"] for s in plan["stages"]), default=0.0)
        steps = sum(s["steps"] for s in plan["stages"])
        table.add_row(
            str(plan["index"]),
            f"{plan['width']}x{plan['height']}",
            stages,
            str(steps),
            f"{peak:.2f}",
            plan["output"] or "(named once its seed is drawn)",
        )
    render_table(table, "rich" if out.is_terminal else "plain", out)
    for plan in plans:
        say_notes(plan, f"job {plan['index']}: ")


def say_notes(plan: dict[str, Any], prefix: str = "") -> None:
    """A plan's notes and warnings on stderr, each once."""
    for level in ("notes", "warnings"):
        for text in plan[level]:
            stderr.print(f"{level[:-1]}: {prefix}{text}", markup=False, highlight=False, soft_wrap=True)


def _per_process(rows: dict[str, Any]) -> str:
    return f"{rows['width']}x{rows['height']}" + (" whole" if rows["whole"] else "")


def render_presets(presets: list[Any]) -> None:
    """`presets list`: a name and a description per preset, on stdout, as wide as the terminal."""
    table = Table(title="presets", title_justify="left")
    table.add_column("name", no_wrap=True)
    table.add_column("description", overflow="fold")  # wrapped between words; a word wider than it, folded
    for preset in presets:
        table.add_row(escape(preset.name), escape(preset.description))
    out = StdoutConsole()
    render_table(table, "rich" if out.is_terminal else "plain", out, prose=True)
