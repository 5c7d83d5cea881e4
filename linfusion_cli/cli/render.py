"""Results drawn for people: tables (ASCII in logs) and the plan on stdout."""

from __future__ import annotations

import sys
from typing import Any

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..engine.refine import REFINE_METHODS
from ..models.adapters import ADAPTER_KINDS
from .boundary import emit_json, stderr


def render_table(table: Any, mode: str, console: Console | None = None) -> None:
    """A table on stderr (or `console`); plain ASCII in logs, where box drawing turns to mojibake."""
    if mode == "plain":
        table.box = box.ASCII
    (console or stderr).print(table)


def render_plan(summary: dict[str, Any], json_out: bool) -> None:
    """The plan is the command's result: on stdout, as JSON or a table."""
    if json_out:
        emit_json(summary)
        return
    out = Console(width=None if sys.stdout.isatty() else 120, highlight=False, emoji=False)
    table = Table(
        title=f"{summary['width']}x{summary['height']} with {summary['model']} ({summary['family']}, "
        f"native {summary['native']} px) on {summary['device']}, {summary['dtype']}",
        title_justify="left",
    )
    for col in ("stage", "kind", "size", "strength", "steps", "UNet passes", "memory", "est. peak GiB", "VAE"):
        table.add_column(col)
    method = str(summary.get("refine"))
    if method in REFINE_METHODS:
        table.caption = REFINE_METHODS.get(method).caption
    for s in summary["stages"]:
        table.add_row(
            str(s["index"] + 1),
            s["kind"],
            s["size"],
            "-" if s["strength"] is None else f"{s['strength']:g}",
            str(s["steps"]),
            str(s["unet_passes"]),
            s["memory"],
            f"{s['estimated_peak_gib']:.2f}",  # as the notes say it
            s["vae"],
        )
    table.title = escape(str(table.title))
    render_table(table, "rich" if out.is_terminal else "plain", out)
    for note in summary["notes"]:
        stderr.print(f"note: {note}", markup=False, highlight=False)
    output = f"output: {summary['output']}; " if summary.get("output") else ""
    budget = summary["memory_budget_gib"]
    budget_text = "unknown (free memory cannot be measured here)" if budget is None else f"{budget} GiB"
    dtypes = ", ".join(f"{part.replace('_', ' ')} {name}" for part, name in summary["dtypes"].items())
    out.print(f"{output}memory budget {budget_text}; {dtypes}", markup=False)
    for kind in ADAPTER_KINDS:
        for entry in summary.get(kind.name, []):
            out.print(kind.plan_line(entry), markup=False)
