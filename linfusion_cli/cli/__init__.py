"""The `linfusion` command: Typer commands, shared options, and rendering of events as progress and tables."""

from .commands import app, main

__all__ = ["app", "main"]
