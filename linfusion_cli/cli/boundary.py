"""What every linfusion command shares at its edges: parse errors and typed errors as one line and an exit code,
logging, and where output goes (stderr for people, stdout for results).

No torch at import time: `linfusion --help` and usage errors stay instant.
"""

from __future__ import annotations

import contextlib
import errno
import io
import itertools
import json
import logging
import os
import re
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, get_args

import typer
from rich.console import Console
from rich.markup import escape

# typer carries its own copy of click; its parse errors are these classes.
from typer._click.exceptions import BadParameter, NoArgsIsHelpError
from typer._click.exceptions import UsageError as ClickUsageError
from typer.core import TyperCommand, TyperGroup, TyperOption

from ..base.errors import EXIT_SIGINT, EXIT_USAGE, LinFusionError, OutputClosedError, UsageError
from ..base.registry import did_you_mean
from ..base.settings import (
    CONTROL_PANEL,
    DEVICE_PANEL,
    IP_PANEL,
    MEMORY_PANEL,
    MODEL_PANEL,
    OUTPUT_PANEL,
    PROMPT_PANEL,
    REFINE_PANEL,
    SAMPLER_PANEL,
    SIZE_PANEL,
)
from ..base.text import quote
from .help import fit_examples, install, one_paragraph_per_line, ordered, terminal_width
from .version import version_lines

install()  # --help's options stacked in a narrow terminal (help.py)
PIPE_WIDTH = 120  # a log or pipe without COLUMNS: wide enough for every table, as a log reader expects


def output_width(stream: Any) -> int | None:
    """The columns output to `stream` fits: COLUMNS where it is set (a pager, a log of a known width: piped or
    not), else the terminal's (None: rich asks it), else PIPE_WIDTH for a file or pipe (rich would say 80)."""
    text = os.environ.get("COLUMNS", "").strip()
    if text.isdigit() and int(text) > 0:
        return int(text)
    return None if stream is not None and stream.isatty() else PIPE_WIDTH


# emoji off: ":abc:" in a prompt, a path or a LoRA spec is text, not an emoji code.
stderr = Console(stderr=True, width=output_width(sys.stderr), emoji=False)
TRAIN_PANEL = "Training"  # distill
CHECKPOINT_PANEL = "Checkpoints and resume"  # distill
EVAL_PANEL = "Evaluation"  # distill
PANEL_ORDER = (
    "Options",
    PROMPT_PANEL,
    SIZE_PANEL,
    REFINE_PANEL,
    SAMPLER_PANEL,
    MODEL_PANEL,
    CONTROL_PANEL,
    IP_PANEL,
    TRAIN_PANEL,
    CHECKPOINT_PANEL,
    EVAL_PANEL,
    MEMORY_PANEL,
    OUTPUT_PANEL,
    DEVICE_PANEL,
)
# Flags of other tools (AUTOMATIC1111's API and scripts, ComfyUI) with no flag of that name here: what to use
# instead, said in place of the closest spelling, which would name an unrelated flag.
FOREIGN_FLAGS = {
    "--hr-scale": "the output size is --size; every stage up to it refines, as A1111's hires fix does once",
    "--hr-upscaler": "each stage upscales on the GPU (bicubic) before it refines; there is no upscaler to pick",
    "--hr-second-pass-steps": "each refine stage runs about --strength x --steps steps (see `linfusion plan`)",
    "--n-iter": "that is --batch-count N here (seeds counting up)",
    "--batch-size": "images are made one at a time; --batch-count N makes N of them (seeds counting up)",
    "--enable-hr": "every image over the model's native size is refined in stages up to --size",
    "--restore-faces": "there is no face restoration here",
}
# What people type after a flag that takes none.
ON_OFF_WORDS = {"true", "false", "yes", "no", "on", "off"}


def _panel_rank(panel: str | None) -> int:
    name = panel or "Options"
    return PANEL_ORDER.index(name) if name in PANEL_ORDER else len(PANEL_ORDER)


class _OneLineErrors:
    """Parse errors as one `error:` line; on/off flags (and `--help`) without a "<bool>" type: they take no
    value, and showing one makes people type `--low-vram true` (with `plan`, "true" became the prompt)."""

    def get_params(self, ctx: Any) -> list[Any]:
        params = super().get_params(ctx)  # type: ignore[misc]
        for param in params:
            if getattr(param, "is_flag", False) and param.metavar is None:
                param.metavar = ""
        # panels in one order for every command, whatever the order of its parameters (a stable sort: the
        # arguments, which have no panel, keep theirs)
        return sorted(params, key=lambda p: _panel_rank(getattr(p, "rich_help_panel", None)))

    def make_context(self, info_name: str | None, args: list[str], parent: Any = None, **extra: Any) -> Any:
        try:
            _refuse_option_as_value(self, info_name, args)
            return super().make_context(info_name, args, parent=parent, **extra)  # type: ignore[misc]
        except ClickUsageError as exc:
            raise _one_line(exc) from None


def _refuse_option_as_value(command: Any, info_name: str | None, args: list[str]) -> None:
    """Words no option may take as its value, refused before parsing:
    - another of the command's options (`generate "x" --negative --dry-run` took --dry-run as the negative prompt
      and started a real run), as git does; `--negative=--dry-run` says it;
    - empty text for a path (`--out ''` is the current folder once made a path, and the run wrote there)."""
    takes_value: set[str] = set()
    paths: set[str] = set()
    names = {"-h", "--help"}
    for param in getattr(command, "params", []):
        if isinstance(param, TyperOption):
            names.update(param.opts + param.secondary_opts)
            if not param.is_flag and not param.count:
                takes_value.update(param.opts)
            if Path in (param.type_descriptor.annotation, *get_args(param.type_descriptor.annotation)):
                paths.update(param.opts)
    for option, value in itertools.pairwise(["", *args]):
        if value == "--":
            return
        name, sep, given = value.partition("=")
        if value.startswith("--") and sep and name in paths:  # --out=PATH
            option, value = name, given
        if option in paths and not value.strip():
            raise ClickUsageError(f"{option} is empty: give a folder or file name (. for the current folder)")
        if option in takes_value and value in names:
            raise ClickUsageError(
                f"{option} needs a value, but the next word is the option {value}; give {option} its value first "
                f"(to mean the text itself, write {option}={value})"
            )


class _FitsTerminal:
    """Help text that fits the terminal (help.py): the docstring's paragraphs rewrapped, the examples broken as a
    shell reads them."""

    _epilog: str | None
    _help: str | None

    @property  # type: ignore[override]
    def epilog(self) -> str | None:
        return None if self._epilog is None else fit_examples(self._epilog, terminal_width() - 2)  # help's margin

    @epilog.setter
    def epilog(self, text: str | None) -> None:
        self._epilog = text

    @property  # type: ignore[override]
    def help(self) -> str | None:
        return None if self._help is None else one_paragraph_per_line(self._help)

    @help.setter
    def help(self, text: str | None) -> None:
        self._help = text


class Command(_FitsTerminal, _OneLineErrors, TyperCommand):
    """A command whose usage line says PROMPT, not {prompt}, and whose help fits the terminal."""

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        return [piece.removeprefix("{").removesuffix("}") for piece in super().collect_usage_pieces(ctx)]


class Group(_FitsTerminal, _OneLineErrors, TyperGroup):
    """`linfusion ...` itself (and `bench`, `presets`): an unknown command is one line too; commands listed generate
    first (help.py); help that fits the terminal."""

    def list_commands(self, ctx: Any) -> list[str]:
        return ordered(super().list_commands(ctx))

    def resolve_command(self, ctx: Any, args: list[str]) -> Any:
        try:
            return super().resolve_command(ctx, args)
        except ClickUsageError as exc:
            if args and not args[0].startswith("-") and exc.ctx is not None:
                names = self.list_commands(ctx)
                close = [name for name in names if name.startswith(args[0].lower())] or [args[0]]
                hint = did_you_mean(close[0], names)
                exc = ClickUsageError(f"no such command '{args[0]}'{hint}", ctx=exc.ctx)
            raise _one_line(exc) from None


def _one_line(exc: ClickUsageError) -> BaseException:
    """Print a parse error as one line (with advice for the usual mistake); the exception that exits 2."""
    if isinstance(exc, NoArgsIsHelpError):
        return exc  # help was printed; the caller only needs the exit
    ctx = exc.ctx
    message = _plain_words(exc) or exc.format_message().rstrip(".")
    foreign = re.match(r"No such option: (\S+)", message)
    if foreign and foreign.group(1) in FOREIGN_FLAGS:
        message = f"No such option: {foreign.group(1)}: {FOREIGN_FLAGS[foreign.group(1)]}"
    extra = re.match(r"Got unexpected extra argument(?:s|\(s\))? \((.*)\)$", message)
    if extra and set(extra.group(1).lower().split()) <= ON_OFF_WORDS:
        message = f"unexpected '{extra.group(1)}': on/off flags take no value (--low-vram alone turns it on)" + (
            f" (see {ctx.command_path} --help)" if ctx is not None else ""
        )
    elif extra and ctx is not None and "port" in ctx.params and extra.group(1).isdigit():
        port = extra.group(1)
        message = f"unexpected '{port}': the port goes to --port ({ctx.command_path} ... --serve --port {port})"
    elif extra and ctx is not None and "prompt" in ctx.params:
        words = f"{ctx.params.get('prompt') or ''} {extra.group(1)}".strip()
        message = (
            f"unexpected extra words '{extra.group(1)}'; a prompt with spaces goes in quotes: "
            f'{ctx.command_path} "{words}"'
        )
    elif message.lower().startswith("no such option: --prompt") and ctx is not None and _prompt_argument(ctx):
        message = f'the prompt is the first argument, in quotes: {ctx.command_path} "a red fox" (no --prompt)'
    elif ctx is not None:
        message = f"{message[:1].lower()}{message[1:]} (see {ctx.command_path} --help)"
    else:
        message = f"{message[:1].lower()}{message[1:]}"
    stderr.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(EXIT_USAGE)


def _prompt_argument(ctx: Any) -> bool:
    """The command takes the prompt as an argument (generate, plan), not as --prompt (upscale)."""
    return any(p.name == "prompt" and p.param_type_name == "argument" for p in ctx.command.params)


# The validation library's words for a value typer could not convert -> ours (the same as a job setting's).
PLAIN_PROBLEMS = {
    "int_parsing": "must be a whole number",
    "int_from_float": "must be a whole number",
    "float_parsing": "must be a number",
    "bool_parsing": "must be true or false",
}


def _plain_words(exc: ClickUsageError) -> str | None:
    """`--max-input-pixels: must be a whole number, got '1.5'` instead of the validation library's "Input should be
    a valid integer, unable to parse string as an integer"."""
    errors = getattr(exc.__cause__, "errors", None)
    param = getattr(exc, "param", None)
    if not isinstance(exc, BadParameter) or not callable(errors) or param is None:
        return None
    first = errors()[0]
    words = PLAIN_PROBLEMS.get(first.get("type", ""), str(first.get("msg", "is not valid")).lower())
    name = param.opts[0] if getattr(param, "opts", None) else param.human_readable_name
    return f"{name}: {words}, got {quote(first.get('input'))}"


def refuse_flag_value_as_prompt(prompt: str) -> None:
    """`plan --low-vram true`: plan's prompt is optional, so "true" would silently become it."""
    if prompt.strip().lower() in ON_OFF_WORDS:
        raise UsageError(f"unexpected '{prompt}': on/off flags take no value (--low-vram alone turns it on)")


def output_mode(quiet: bool) -> str:
    if quiet:
        return "quiet"
    return "rich" if stderr.is_terminal else "plain"


def setup_logging(mode: str) -> None:
    """Our logs to stderr; the libraries' chatter (progress bars, deprecations) off."""
    level = logging.ERROR if mode == "quiet" else logging.WARNING
    if mode == "rich":
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(console=stderr, show_path=False, show_time=False)
    else:
        handler = logging.StreamHandler(sys.stderr)
        # the same timestamp as the progress lines (report.PLAIN_TIME): farm logs interleave processes
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s: %(message)s", "%Y-%m-%d %H:%M:%S"))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    # diffusers/transformers log through their own handlers; these variables are read when they import.
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    for noisy in ("diffusers", "transformers", "huggingface_hub", "accelerate", "httpx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*torchvision.*")


@contextlib.contextmanager
def boundary() -> Iterator[None]:
    """The one error boundary: typed errors become one line on stderr and their exit code."""
    try:
        yield
    except LinFusionError as exc:
        for line in str(exc).splitlines() or [""]:  # several mistakes (a prompt file's): one line each
            stderr.print(f"[bold red]error:[/] {escape(_who() + line)}", highlight=False, soft_wrap=True)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        stderr.print("[bold red]interrupted[/]", highlight=False)
        raise typer.Exit(EXIT_SIGINT) from None


def _who() -> str:
    """'rank N: ' in a group of processes (torchrun's, --gpus'), so a failure's line names its process."""
    world, rank = os.environ.get("WORLD_SIZE", "1"), os.environ.get("RANK", "0")
    return f"rank {rank}: " if world.isdigit() and int(world) > 1 else ""


def say_stopping(signal_name: str) -> None:
    """At the first Ctrl-C (or SIGTERM): say at once that the command is stopping, straight to stderr's file
    descriptor (a signal handler must not wait on the console's lock)."""
    with contextlib.suppress(OSError):
        os.write(2, f"\n{signal_name}: stopping at the next safe point (again: stop at once)\n".encode())


def emit_json(data: Any) -> None:
    """One JSON line on stdout. A stdout closed under us (`| head -1` has read its line, or `>&-`) is an
    OutputClosedError: the caller stops cleanly instead of a traceback."""
    try:
        if sys.stdout is None:  # started with stdout closed
            raise BrokenPipeError
        sys.stdout.write(json.dumps(data, default=str) + "\n")
        sys.stdout.flush()
    except (BrokenPipeError, ValueError) as exc:  # ValueError: "I/O operation on closed file"
        if isinstance(exc, ValueError) and "closed" not in str(exc):
            raise
        _quiet_stdout()
        raise OutputClosedError("stdout was closed (its reader stopped, as | head does, or >&-)") from None


STDOUT_FD = 1


class ClosedStdout(io.TextIOBase):
    """stdout for a process started with it closed (`>&-`), where Python gives None and typer, click and rich
    would print a result into nothing and exit 0: the first write fails as a broken pipe does (141); a command
    that prints nothing on stdout is not disturbed. Its descriptor, 1, is /dev/null: a file opened later must not
    take fd 1 and receive what is printed, and rich's own broken-pipe handler points fd 1 at /dev/null too."""

    def __init__(self) -> None:
        super().__init__()
        devnull = os.open(os.devnull, os.O_WRONLY)
        if devnull != STDOUT_FD:
            os.dup2(devnull, STDOUT_FD)
            os.close(devnull)

    def write(self, text: str) -> int:
        raise BrokenPipeError(errno.EPIPE, "stdout is closed")

    def fileno(self) -> int:
        return STDOUT_FD

    def isatty(self) -> bool:
        return False


class PipeAwareStdout:
    """stdout, noting when its reader went away (`| head -1`): help, --version and `info` are printed by typer,
    click and rich, which end a broken pipe with exit 1; `main` makes that 141, as every other command ends."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.broken = False

    def write(self, text: str) -> int:
        try:
            return int(self.stream.write(text))
        except BrokenPipeError:
            self.broken = True
            raise

    def flush(self) -> None:
        try:
            self.stream.flush()
        except BrokenPipeError:
            self.broken = True
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def _quiet_stdout() -> None:
    """Point stdout at /dev/null, so that Python's flush at exit does not report the broken pipe once more."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


def show_version(value: bool) -> None:
    """`--version`: ours, then what a bug report needs (version.py: no torch import, so it is instant)."""
    if not value:
        return
    for line in version_lines():
        typer.echo(line)
    raise typer.Exit()
