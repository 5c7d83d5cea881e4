"""`linfusion samplers`: every sampler this build runs, by AUTOMATIC1111's name and ours, with the diffusers
scheduler and options each one is, and A1111's samplers that diffusers lacks."""

from __future__ import annotations

from typing import Any

from rich.markup import escape
from rich.table import Table

from ..engine.schedulers import DEFAULT_SAMPLER, NOT_IN_DIFFUSERS, SAMPLERS
from .boundary import boundary, stderr
from .options import JsonOpt
from .render import StdoutConsole, emit_result, render_table

SAMPLERS_EXAMPLES = """[bold]Examples[/]
  linfusion samplers
  linfusion generate "a red fox" --sampler "DPM++ 2M SDE Karras"
  linfusion generate "a red fox" --scheduler euler-a"""


def samplers_command(json_out: JsonOpt = False) -> None:
    """List the samplers: AUTOMATIC1111's name, ours, the diffusers scheduler and options, whether it draws noise
    at each step. --sampler and --scheduler take either name, in any case."""
    with boundary():
        rows: list[dict[str, Any]] = [
            {
                "a1111": s.a1111,
                "name": s.name,
                "scheduler": s.scheduler,
                "options": dict(s.options),
                "stochastic": s.stochastic,
            }
            for s in SAMPLERS
        ]
        if json_out:
            emit_result({"samplers": rows, "default": DEFAULT_SAMPLER, "not_in_diffusers": list(NOT_IN_DIFFUSERS)})
            return
        table = Table(title="samplers", title_justify="left")
        table.add_column("AUTOMATIC1111", max_width=18)
        table.add_column("name", no_wrap=True)
        table.add_column("noise each step", max_width=9)
        table.add_column("diffusers scheduler (options)", overflow="fold")
        for row in rows:
            options = ", ".join(f"{k}={v}" for k, v in row["options"].items())
            scheduler = f"{row['scheduler']}({options})" if options else row["scheduler"]
            table.add_row(escape(row["a1111"]), escape(row["name"]), "yes" * row["stochastic"], escape(scheduler))
        out = StdoutConsole()
        render_table(table, "rich" if out.is_terminal else "plain", out)
        missing = ", ".join(NOT_IN_DIFFUSERS)
        stderr.print(f"note: AUTOMATIC1111 samplers diffusers has no scheduler for: {missing}", markup=False)
