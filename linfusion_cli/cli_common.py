"""What every linfusion command shares: option types, the error boundary, logging and output helpers.

No torch at import time: `linfusion --help` and usage errors stay instant.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from . import __version__
from .config import DEFAULT_MODEL, DEFAULT_SIZE, FORMATS, SCHEDULERS
from .errors import EXIT_SIGINT, LinFusionError

# Farm logs are not terminals; rich would wrap them at 80 columns.
stderr = Console(stderr=True, width=None if sys.stderr.isatty() else 120)

# --- options shared by generate / plan / batch / upscale ----------------------------------------------------
SizeOpt = Annotated[
    int | None, typer.Option("--size", "-s", help=f"Long side of the output, px \\[default: {DEFAULT_SIZE}].")
]
AspectOpt = Annotated[str | None, typer.Option(help="Shape W:H, e.g. 16:9 \\[default: 1:1].")]
WidthOpt = Annotated[int | None, typer.Option(help="Exact output width, px (instead of --size).")]
HeightOpt = Annotated[int | None, typer.Option(help="Exact output height, px (instead of --size).")]
ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        help=f"Hub id, diffusers folder, .safetensors file, or tiny / tiny-sd2 / tiny-sdxl (built-in, random weights) \\[default: {DEFAULT_MODEL}].",
    ),
]
LinOpt = Annotated[
    str | None,
    typer.Option(
        help="LinFusion weights: auto (official for the model's family), none (ordinary attention), or a checkpoint folder / hub id \\[default: auto]."
    ),
]
VaeOpt = Annotated[
    str | None, typer.Option(help="Replacement VAE (diffusers folder or hub id), e.g. an fp16-fixed SDXL VAE.")
]
StepsOpt = Annotated[
    int | None, typer.Option(help="Full schedule steps; a stage at strength s runs about s*steps \\[default: 50].")
]
GuidanceOpt = Annotated[
    float | None, typer.Option("--guidance", "-g", help="Classifier-free guidance scale \\[default: 7.5].")
]
NegativeOpt = Annotated[str | None, typer.Option("--negative", "-n", help="Negative prompt.")]
SeedOpt = Annotated[int | None, typer.Option(help="Random seed \\[default: random, always reported].")]
SchedulerOpt = Annotated[str | None, typer.Option(help=f"Sampler: {', '.join(SCHEDULERS)} \\[default: ddim].")]
StrengthsOpt = Annotated[
    str | None,
    typer.Option(
        help="Refine-stage strengths, first to last, e.g. 0.4,0.3,0.2,0.1 \\[default: 0.4 falling linearly to 0.1]."
    ),
]
BaseSizeOpt = Annotated[
    int | None, typer.Option(help="Long side of the base stage, px \\[default: the model's native size].")
]
PresetOpt = Annotated[
    str | None, typer.Option("--preset", "-p", help="Preset name (see `linfusion presets list`) or YAML file.")
]
FormatOpt = Annotated[
    str | None, typer.Option("--format", "-f", help=f"Output format: {', '.join(FORMATS)} \\[default: png].")
]
NameOpt = Annotated[
    str | None, typer.Option(help="Output file name without extension \\[default: prompt slug, seed and size].")
]
VaeTileOpt = Annotated[int | None, typer.Option(help="VAE tile side, px \\[default: automatic from free memory].")]
LowVramOpt = Annotated[
    bool | None,
    typer.Option("--low-vram", help="Most frugal memory settings (24 GB cards at 16K).", show_default=False),
]
MaxVramOpt = Annotated[float | None, typer.Option(help="Plan memory for at most this many GiB.")]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Output folder.")]
OverwriteOpt = Annotated[bool, typer.Option(help="Replace existing outputs.")]
SaveStagesOpt = Annotated[bool, typer.Option(help="Also save each stage's image.")]
DeviceOpt = Annotated[str, typer.Option(help="auto (cuda, then mps, then cpu), cuda, cuda:N, mps or cpu.")]
DtypeOpt = Annotated[str, typer.Option(help="auto (fp16 on GPUs, fp32 on the CPU), fp16, bf16 or fp32.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON report on stdout (and nothing else there).")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Show only errors.")]
MaxPixelsOpt = Annotated[int, typer.Option(help="Refuse input images with more pixels than this (1 gigapixel).")]
AllowPickleOpt = Annotated[bool, typer.Option(help="Allow .ckpt/.bin pickle weights (loaded weights-only).")]


def job_flags(values: dict[str, Any], exclude: tuple[str, ...] = (), **extra: Any) -> dict[str, Any]:
    """The job settings among a command's parameters (its `locals()`), validated; None means not given."""
    from .config import JOB_KEYS
    from .jobs import flags_layer

    chosen = {k: v for k, v in values.items() if k in JOB_KEYS and k not in exclude}
    return flags_layer({**chosen, **extra})


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
        handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
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
        stderr.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        stderr.print("[bold red]interrupted[/]; finished outputs are kept", highlight=False)
        raise typer.Exit(EXIT_SIGINT) from None


def emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, default=str) + "\n")
    sys.stdout.flush()


def show_version(value: bool) -> None:
    if value:
        typer.echo(f"linfusion {__version__}")
        raise typer.Exit()


def check_device_flags(device: str, dtype: str) -> None:
    from .errors import UsageError

    if dtype not in ("auto", "fp16", "bf16", "fp32"):
        raise UsageError(f"--dtype {dtype!r}: must be auto, fp16, bf16 or fp32")
    if device != "auto" and device.split(":")[0] not in ("cuda", "cpu", "mps"):
        raise UsageError(f"--device {device!r}: must be auto, cpu, mps, cuda or cuda:N")


def render_plan(summary: dict[str, Any], json_out: bool, mode: str) -> None:
    from rich.table import Table

    if json_out:
        emit_json(summary)
        return
    table = Table(
        title=f"{summary['width']}x{summary['height']} with {summary['model']} ({summary['family']}, "
        f"native {summary['native']} px) on {summary['device']}, {summary['dtype']}",
        title_justify="left",
    )
    for col in ("stage", "kind", "size", "strength", "steps", "memory", "est. peak GiB", "VAE"):
        table.add_column(col)
    for s in summary["stages"]:
        table.add_row(
            str(s["index"] + 1),
            s["kind"],
            s["size"],
            "-" if s["strength"] is None else f"{s['strength']:g}",
            str(s["steps"]),
            s["memory"],
            f"{s['estimated_peak_gib']:.1f}",
            s["vae"],
        )
    stderr.print(table)
    for note in summary["notes"]:
        stderr.print(f"note: {note}", highlight=False)
    stderr.print(f"output: {summary['output']}  (memory budget {summary['memory_budget_gib']} GiB)", highlight=False)
