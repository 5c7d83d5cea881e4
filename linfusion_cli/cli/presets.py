"""`linfusion presets list|show`: the shipped recipes and your own."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape

from ..core.presets import load_preset, scan_presets
from .boundary import Command, Group, boundary, stderr
from .render import render_presets

PRESETS_EXAMPLES = """[bold]Examples[/]
  linfusion presets list
  linfusion presets show sdxl-16k
  linfusion generate "a harbour" --preset sd15-16k"""
presets_app = typer.Typer(cls=Group, help="List and show presets.", no_args_is_help=True, epilog=PRESETS_EXAMPLES)


@presets_app.command("list", cls=Command, epilog=PRESETS_EXAMPLES)
def presets_list() -> None:
    """Shipped presets and your own (in $LINFUSION_HOME/presets or ~/.config/linfusion/presets)."""
    with boundary():
        presets, problems = scan_presets()
        render_presets(presets)
        for problem in problems:
            stderr.print(f"[yellow]warning:[/] {escape(problem)}", highlight=False, soft_wrap=True)


@presets_app.command("show", cls=Command, epilog=PRESETS_EXAMPLES)
def presets_show(
    name: Annotated[str, typer.Argument(metavar="NAME", help="Preset name or YAML file.", show_default=False)],
) -> None:
    """Print a preset's description and settings (as YAML)."""
    import yaml

    with boundary():
        preset = load_preset(name)
        typer.echo(f"# {preset.name} ({preset.path})")
        for line in preset.description.splitlines():
            typer.echo(f"# {line}")
        typer.echo(yaml.safe_dump(preset.settings, sort_keys=False).rstrip())
