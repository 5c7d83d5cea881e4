"""`--help` that fits the terminal: commands in the order a new user needs them, options that are never cut, and
examples that wrap the way a shell reads them.

typer draws help with rich, as a table per panel: name, type and help side by side. Below ~80 columns rich
squeezes every column, a long flag name included (`--gradient-checkpoi…`), so there each option is drawn on a line
of its own with its help indented below (as man pages do). Examples are commands to copy: one too long for the
terminal is broken between words (outside quotes) with a ` \\` at the end of each piece, so the pieces still paste
into a shell as one command; a comment is wrapped as comments are, `# ` starting each line (a comment after a
command goes on lines of its own above it, where a ` \\` would not continue it).
"""

from __future__ import annotations

import re
import textwrap
from typing import Any

from rich.console import Console
from rich.padding import Padding
from rich.panel import Panel
from rich.table import Table
from rich.text import Text
from typer import rich_utils

NARROW = 80  # columns below which options are stacked
COMMAND_ORDER = ("generate", "upscale", "batch", "replay", "plan", "info", "view", "presets", "samplers", "bench")
EXAMPLE = re.compile(r"^(\s*)((?:linfusion|torchrun|srun|python)\s.*)$")
COMMENT = re.compile(r"^(\s*)(\[dim\])?#\s*(.*?)(?:\[/\w*\])?$")  # `# text`, or `[dim]# text[/]` as help writes it
CONTINUATION_INDENT = "    "
_typer_options_panel = rich_utils._print_options_panel


def ordered(names: list[str]) -> list[str]:
    """Commands as a new user meets them (generate first), the rest (distill, added ones) after, as registered."""
    first = [name for name in COMMAND_ORDER if name in names]
    return first + [name for name in names if name not in first]


def one_paragraph_per_line(text: str) -> str:
    """A docstring's paragraphs, each on one line: rich wraps them to the terminal, not to the source's 120."""
    return "\n\n".join(" ".join(part.split()) for part in text.split("\n\n"))


def terminal_width() -> int:
    """The width help is drawn at: the terminal's, or COLUMNS (rich's rule), as typer's console finds it."""
    return Console(width=rich_utils.MAX_WIDTH).width


def fit_examples(epilog: str, width: int) -> str:
    """An epilog whose example commands longer than `width` are broken between words, ` \\` ending each piece."""
    return "\n".join(piece for line in epilog.split("\n") for piece in _fit_line(line, width))


def _fit_line(line: str, width: int) -> list[str]:
    if len(Text.from_markup(line).plain) <= width:
        return [line]
    comment = COMMENT.match(line)
    if comment:
        return _comment_lines(comment.group(1), comment.group(3), width, dim=bool(comment.group(2)))
    match = EXAMPLE.match(line)
    if match is None:
        return [line]
    indent, words = match.group(1), _shell_words(match.group(2))
    said = next((i for i, word in enumerate(words) if COMMENT.match(word)), len(words))
    if said < len(words):  # `linfusion view renders # and open ...`: the comment above, the command alone
        note = COMMENT.match(" ".join(words[said:]))
        assert note is not None
        above = _comment_lines(indent, note.group(3), width, dim=bool(note.group(2)))
        return [*above, *_fit_line(indent + " ".join(words[:said]), width)]
    pieces: list[str] = []
    current = indent + words[0]
    for word in words[1:]:
        if len(current) + 1 + len(word) + 2 > width:  # room for " \\"
            pieces.append(current + " \\")
            current = indent + CONTINUATION_INDENT + word
        else:
            current += " " + word
    return [*pieces, current]


def _comment_lines(indent: str, text: str, width: int, *, dim: bool) -> list[str]:
    """A comment in lines that each start with `# `: a comment's second line without one would be run as a
    command when pasted."""
    lines = [f"# {piece}" for piece in _wrap(text, max(width - len(indent) - 2, 20))]
    return [indent + (f"[dim]{line}[/]" if dim else line) for line in lines]


def _wrap(text: str, width: int) -> list[str]:
    return textwrap.wrap(text, width, break_long_words=False, break_on_hyphens=False)  # a URL or path stays whole


def _shell_words(command: str) -> list[str]:
    """The command split at spaces outside quotes (a quoted prompt stays one piece)."""
    return re.findall(r"(?:\"[^\"]*\"|'[^']*'|\S)+", command)


def _options_panel(*, name: str, params: list[Any], ctx: Any, markup_mode: Any, console: Console) -> None:
    """typer's panel where it fits; in a narrow terminal, each option on a line of its own, its help below."""
    if console.width >= NARROW or not params:
        _typer_options_panel(name=name, params=params, ctx=ctx, markup_mode=markup_mode, console=console)
        return
    table = Table(box=None, show_header=False, padding=0, pad_edge=False, expand=True)
    table.add_column(overflow="fold")
    for param in params:
        names = getattr(param, "display_name_raw", None) if not param.opts[0].startswith("-") else None
        label = Text(names or ", ".join([*param.opts, *param.secondary_opts]), style="bold cyan")
        kind = param.display_type_rich(ctx=ctx)
        if kind:
            label.append(f" {kind}", style="yellow")
        table.add_row(label)
        table.add_row(
            Padding(rich_utils._get_parameter_help(param=param, ctx=ctx, markup_mode=markup_mode), (0, 0, 0, 4))
        )
    console.print(Panel(table, border_style="dim", title=name, title_align="left"))


def install() -> None:
    """Draw every command's option panels with `_options_panel` (typer looks the function up at each call)."""
    rich_utils._print_options_panel = _options_panel
