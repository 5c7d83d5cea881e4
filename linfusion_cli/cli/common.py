"""What every linfusion command shares: option types, the error boundary, logging and output helpers.

No torch at import time: `linfusion --help` and usage errors stay instant.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

# typer carries its own copy of click; its parse errors are these classes.
from typer._click.exceptions import NoArgsIsHelpError
from typer._click.exceptions import UsageError as ClickUsageError
from typer.core import TyperCommand, TyperGroup

from .. import __version__
from ..base.errors import EXIT_SIGINT, EXIT_USAGE, LinFusionError
from ..base.sizes import DEFAULT_SIZE
from ..core.config import DEFAULT_MODEL, SCHEDULERS
from ..io.formats import FORMATS

# Farm logs are not terminals; rich would wrap them at 80 columns.
# emoji off: ":abc:" in a prompt, a path or a LoRA spec is text, not an emoji code.
stderr = Console(stderr=True, width=None if sys.stderr.isatty() else 120, emoji=False)

# --- help panels: generate has ~30 options; a person looks for them by what they are about ----------------------
PROMPT_PANEL = "Prompt"
SIZE_PANEL = "Size and stages"
SAMPLER_PANEL = "Sampler"
MODEL_PANEL = "Model and adapters"
MEMORY_PANEL = "Memory"
OUTPUT_PANEL = "Output"
DEVICE_PANEL = "Device"
TRAIN_PANEL = "Training"  # distill
CHECKPOINT_PANEL = "Checkpoints and resume"  # distill
EVAL_PANEL = "Evaluation"  # distill
FLAG = {"metavar": "", "show_default": False}
ON_OFF_WORDS = {
    "true",
    "false",
    "yes",
    "no",
    "on",
    "off",
}  # what people type after a flag that takes none  # an on/off flag: no "<bool>" type, no "[default: False]"

# --- options shared by generate / plan / batch / upscale ----------------------------------------------------
SizeOpt = Annotated[
    str | None,
    typer.Option(
        "--size",
        "-s",
        metavar="PX",
        help=f"Long side of the output: 4096, 8k, 16K (x1024), or WxH like 4096x2048 \\[default: {DEFAULT_SIZE}].",
        rich_help_panel=SIZE_PANEL,
    ),
]
AspectOpt = Annotated[
    str | None, typer.Option(help="Shape W:H, e.g. 16:9 \\[default: 1:1].", rich_help_panel=SIZE_PANEL)
]
WidthOpt = Annotated[
    int | None, typer.Option(help="Exact output width, px (instead of --size).", rich_help_panel=SIZE_PANEL)
]
HeightOpt = Annotated[
    int | None, typer.Option(help="Exact output height, px (instead of --size).", rich_help_panel=SIZE_PANEL)
]
StrengthsOpt = Annotated[
    str | None,
    typer.Option(
        help="Refine-stage strengths, first to last, e.g. 0.4,0.3,0.2,0.1 \\[default: 0.4 falling linearly to 0.1].",
        rich_help_panel=SIZE_PANEL,
    ),
]
LoraOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--lora",
        metavar="SRC[:SCALE]",
        help="A LoRA to fuse into the model (repeatable): .safetensors file, folder or hub id in kohya/A1111 or "
        "diffusers format, or tiny (built-in, random); :SCALE weights it \\[default scale: 1].",
        rich_help_panel=MODEL_PANEL,
    ),
]
CONTROL_PANEL = "ControlNet"
ControlNetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--controlnet",
        metavar="SRC[:SCALE]",
        help="A ControlNet (repeatable): diffusers folder, .safetensors file, hub id, or tiny (built-in, random); "
        ":SCALE weights it \\[default scale: 1]. Its own self-attention runs linear too (LinFusion).",
        rich_help_panel=CONTROL_PANEL,
    ),
]
ControlImageOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--control-image",
        metavar="FILE|previous",
        help="One per --controlnet, in order: the image it follows (resized to every stage), or previous: each "
        "refine stage's upscaled previous image, what a tile ControlNet wants (base stages run without it).",
        rich_help_panel=CONTROL_PANEL,
    ),
]
ControlStartOpt = Annotated[
    float | None,
    typer.Option(
        metavar="FRACTION",
        help="ControlNets act from this fraction of each stage's steps \\[default: 0].",
        rich_help_panel=CONTROL_PANEL,
    ),
]
ControlEndOpt = Annotated[
    float | None,
    typer.Option(
        metavar="FRACTION",
        help="ControlNets act up to this fraction of each stage's steps \\[default: 1].",
        rich_help_panel=CONTROL_PANEL,
    ),
]
ControlStagesOpt = Annotated[
    str | None,
    typer.Option(
        metavar="SCALES",
        help="ControlNet scale per stage, first to last, the last repeating; 0,1 turns them off in the base "
        "stage \\[default: 1 everywhere].",
        rich_help_panel=CONTROL_PANEL,
    ),
]


def control_flags(
    controlnet: list[str] | None,
    control_image: list[str] | None,
    control_start: float | None,
    control_end: float | None,
    control_stages: str | None,
) -> dict[str, Any]:
    """The ControlNet flags by job key (generate, upscale, batch and plan take the same five)."""
    return {
        "controlnet": controlnet or None,
        "control_image": control_image or None,
        "control_start": control_start,
        "control_end": control_end,
        "control_stages": control_stages,
    }


REFINE_PANEL = "Refine method"
RefineOpt = Annotated[
    str | None,
    typer.Option(
        metavar="METHOD",
        help="How refine stages work: sdedit (upscale, re-noise, denoise) or demofusion (LinFusion's official "
        "high-resolution method: skip residual + a dilated global UNet pass per step, about 2x the refine time) "
        "\\[default: sdedit].",
        rich_help_panel=REFINE_PANEL,
    ),
]
StrengthOpt = Annotated[
    float | None,
    typer.Option(
        help="The first refine stage's strength; later ones fall linearly (sdedit to 0.1, demofusion towards 0) "
        "\\[default: 0.4 sdedit, 0.32 demofusion].",
        rich_help_panel=REFINE_PANEL,
    ),
]
CosineScale1Opt = Annotated[
    float | None,
    typer.Option(
        "--cosine-scale-1",
        help="demofusion: skip-residual exponent; larger keeps less of the upscaled image \\[default: 3].",
        rich_help_panel=REFINE_PANEL,
    ),
]
CosineScale2Opt = Annotated[
    float | None,
    typer.Option(
        "--cosine-scale-2",
        help="demofusion: global-branch blend exponent; larger blends in less of it \\[default: 1].",
        rich_help_panel=REFINE_PANEL,
    ),
]
CosineScale3Opt = Annotated[
    float | None,
    typer.Option(
        "--cosine-scale-3",
        help="demofusion: exponent of the blur's fall over the steps \\[default: 1].",
        rich_help_panel=REFINE_PANEL,
    ),
]
GaussianSigmaOpt = Annotated[
    float | None,
    typer.Option(
        help="demofusion: Gaussian blur sigma of the global branch, latent px \\[default: 1].",
        rich_help_panel=REFINE_PANEL,
    ),
]


def refine_flags(
    refine: str | None,
    strength: float | None,
    cosine_scale_1: float | None,
    cosine_scale_2: float | None,
    cosine_scale_3: float | None,
    gaussian_sigma: float | None,
) -> dict[str, Any]:
    """The refine-method flags by job key (every command that refines takes the same six)."""
    return {
        "refine": refine,
        "strength": strength,
        "cosine_scale_1": cosine_scale_1,
        "cosine_scale_2": cosine_scale_2,
        "cosine_scale_3": cosine_scale_3,
        "gaussian_sigma": gaussian_sigma,
    }


BaseSizeOpt = Annotated[
    str | None,
    typer.Option(
        metavar="PX",
        help="Long side of the base stage, px \\[default: the model's native size].",
        rich_help_panel=SIZE_PANEL,
    ),
]
ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        help="Hub id, diffusers folder, .safetensors file, or tiny / tiny-sd2 / tiny-sdxl (built-in, random "
        f"weights) \\[default: {DEFAULT_MODEL}].",
        rich_help_panel=MODEL_PANEL,
    ),
]
LinOpt = Annotated[
    str | None,
    typer.Option(
        help="LinFusion weights: auto (official for the model's family), none (ordinary attention), or a "
        "checkpoint folder / hub id \\[default: auto].",
        rich_help_panel=MODEL_PANEL,
    ),
]
VaeOpt = Annotated[
    str | None,
    typer.Option(
        help="Replacement VAE (diffusers folder or hub id), e.g. an fp16-fixed SDXL VAE.", rich_help_panel=MODEL_PANEL
    ),
]
AllowPickleOpt = Annotated[
    bool,
    typer.Option(
        "--allow-pickle",
        help="Allow .ckpt/.bin pickle weights (loaded weights-only).",
        rich_help_panel=MODEL_PANEL,
        **FLAG,
    ),
]
IP_PANEL = "IP-Adapter"
IpAdapterOpt = Annotated[
    str | None,
    typer.Option(
        "--ip-adapter",
        metavar="SRC[:SCALE]",
        help="An IP-Adapter: --ip-image then steers the picture like a prompt. A folder in h94/IP-Adapter's layout "
        "or that hub id (the file for the model's family is picked), a .safetensors weight file with its "
        "image_encoder/ folder beside it, or tiny (built-in, random); :SCALE weights it \\[default scale: 1].",
        rich_help_panel=IP_PANEL,
    ),
]
IpImageOpt = Annotated[
    str | None,
    typer.Option(
        "--ip-image",
        metavar="IMAGE",
        help="The reference image the --ip-adapter reads (embedded once per image, for every stage).",
        rich_help_panel=IP_PANEL,
    ),
]
PresetOpt = Annotated[
    str | None,
    typer.Option(
        "--preset",
        "-p",
        autocompletion=lambda incomplete: _preset_names(incomplete),
        help="A recipe of settings: a preset name (see `linfusion presets list`) or a YAML file.",
        rich_help_panel=PROMPT_PANEL,
    ),
]
NegativeOpt = Annotated[
    str | None, typer.Option("--negative", "-n", help="Negative prompt: what to avoid.", rich_help_panel=PROMPT_PANEL)
]
StepsOpt = Annotated[
    int | None,
    typer.Option(
        help="Full schedule steps; a stage at strength s runs about s*steps \\[default: 50].",
        rich_help_panel=SAMPLER_PANEL,
    ),
]
GuidanceOpt = Annotated[
    float | None,
    typer.Option(
        "--guidance", "-g", help="Classifier-free guidance scale \\[default: 7.5].", rich_help_panel=SAMPLER_PANEL
    ),
]
SeedOpt = Annotated[
    int | None,
    typer.Option(
        help="Random seed; -1 means random \\[default: random, always reported].", rich_help_panel=SAMPLER_PANEL
    ),
]
SchedulerOpt = Annotated[
    str | None,
    typer.Option(
        autocompletion=lambda incomplete: [n for n in SCHEDULERS if n.startswith(incomplete)],
        help=f'Sampler: {", ".join(SCHEDULERS)}, or its AUTOMATIC1111 name ("DPM++ 2M Karras", "Euler a") '
        "\\[default: ddim].",
        rich_help_panel=SAMPLER_PANEL,
    ),
]
VaeTileOpt = Annotated[
    int | None,
    typer.Option(help="VAE tile side, px \\[default: automatic from free memory].", rich_help_panel=MEMORY_PANEL),
]
LowVramOpt = Annotated[
    bool | None,
    typer.Option(
        "--low-vram", help="Most frugal memory settings (24 GB cards at 16K).", rich_help_panel=MEMORY_PANEL, **FLAG
    ),
]
MaxVramOpt = Annotated[
    float | None,
    typer.Option(metavar="GIB", help="Plan memory for at most this many GiB.", rich_help_panel=MEMORY_PANEL),
]
FormatOpt = Annotated[
    str | None,
    typer.Option(
        "--format",
        "-f",
        autocompletion=lambda incomplete: [n for n in FORMATS if n.startswith(incomplete)],
        help=f"Output format: {', '.join(FORMATS)} (also jpg, tif) \\[default: png].",
        rich_help_panel=OUTPUT_PANEL,
    ),
]
NameOpt = Annotated[
    str | None,
    typer.Option(
        help="Output file name without extension \\[default: prompt slug, seed and size].",
        rich_help_panel=OUTPUT_PANEL,
    ),
]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Output folder.", rich_help_panel=OUTPUT_PANEL)]
OverwriteOpt = Annotated[
    bool, typer.Option("--overwrite", help="Replace existing outputs.", rich_help_panel=OUTPUT_PANEL, **FLAG)
]
SaveStagesOpt = Annotated[
    bool, typer.Option("--save-stages", help="Also save each stage's image.", rich_help_panel=OUTPUT_PANEL, **FLAG)
]
JsonOpt = Annotated[
    bool,
    typer.Option(
        "--json", help="Print one JSON report on stdout (and nothing else there).", rich_help_panel=OUTPUT_PANEL, **FLAG
    ),
]
QuietOpt = Annotated[
    bool, typer.Option("--quiet", "-q", help="Show only errors.", rich_help_panel=OUTPUT_PANEL, **FLAG)
]
DeviceOpt = Annotated[
    str,
    typer.Option(help="auto (cuda, then mps, then cpu), cuda, cuda:N, mps or cpu.", rich_help_panel=DEVICE_PANEL),
]
DtypeOpt = Annotated[
    str, typer.Option(help="auto (fp16 on GPUs, fp32 on the CPU), fp16, bf16 or fp32.", rich_help_panel=DEVICE_PANEL)
]
MaxPixelsOpt = Annotated[
    int,
    typer.Option(
        metavar="PIXELS",
        help="Refuse input images with more pixels than this (1 gigapixel).",
        rich_help_panel=OUTPUT_PANEL,
    ),
]


# --- commands whose mistakes read as one line ---------------------------------------------------------------
def _preset_names(incomplete: str) -> list[str]:
    """Tab completion of --preset: shipped and user presets."""
    from ..core.presets import list_presets

    return [p.name for p in list_presets() if p.name.startswith(incomplete)]


def _panel_rank(panel: str | None) -> int:
    order: tuple[str, ...] = ("Options", PROMPT_PANEL, SIZE_PANEL, REFINE_PANEL, SAMPLER_PANEL, MODEL_PANEL)
    order += (CONTROL_PANEL, IP_PANEL, TRAIN_PANEL, CHECKPOINT_PANEL, EVAL_PANEL)
    order += (MEMORY_PANEL, OUTPUT_PANEL, DEVICE_PANEL)
    return order.index(panel or "Options") if (panel or "Options") in order else len(order)


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
            return super().make_context(info_name, args, parent=parent, **extra)  # type: ignore[misc]
        except ClickUsageError as exc:
            raise _one_line(exc) from None


class Command(_OneLineErrors, TyperCommand):
    """A command whose usage line says PROMPT, not {prompt}."""

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        return [piece.removeprefix("{").removesuffix("}") for piece in super().collect_usage_pieces(ctx)]


class Group(_OneLineErrors, TyperGroup):
    """`linfusion ...` itself: an unknown command is one line too."""

    def resolve_command(self, ctx: Any, args: list[str]) -> Any:
        try:
            return super().resolve_command(ctx, args)
        except ClickUsageError as exc:
            raise _one_line(exc) from None


def _one_line(exc: ClickUsageError) -> BaseException:
    """Print a parse error as one line (with advice for the usual mistake); the exception that exits 2."""
    if isinstance(exc, NoArgsIsHelpError):
        return exc  # help was printed; the caller only needs the exit
    ctx = exc.ctx
    message = exc.format_message().rstrip(".")
    extra = re.match(r"Got unexpected extra argument(?:s|\(s\))? \((.*)\)$", message)
    if extra and set(extra.group(1).lower().split()) <= ON_OFF_WORDS:
        message = f"unexpected '{extra.group(1)}': on/off flags take no value (--low-vram alone turns it on)" + (
            f" (see {ctx.command_path} --help)" if ctx is not None else ""
        )
    elif extra and ctx is not None and "prompt" in ctx.params:
        words = f"{ctx.params.get('prompt') or ''} {extra.group(1)}".strip()
        message = (
            f"unexpected extra words '{extra.group(1)}'; a prompt with spaces goes in quotes: "
            f'{ctx.command_path} "{words}"'
        )
    elif ctx is not None:
        message = f"{message[:1].lower()}{message[1:]} (see {ctx.command_path} --help)"
    stderr.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(EXIT_USAGE)


def refuse_flag_value_as_prompt(prompt: str) -> None:
    """`plan --low-vram true`: plan's prompt is optional, so "true" would silently become it."""
    from ..base.errors import UsageError

    if prompt.strip().lower() in ON_OFF_WORDS:
        raise UsageError(f"unexpected '{prompt}': on/off flags take no value (--low-vram alone turns it on)")


def job_flags(**values: Any) -> dict[str, Any]:
    """The job settings given as flags, by job key (None: not given), validated. Each command names its
    mapping explicitly: a key that is not a job setting is a programming error, not a silent drop."""
    from ..core.config import JOB_KEYS
    from ..core.jobs import flags_layer

    unknown = sorted(set(values) - set(JOB_KEYS))
    if unknown:
        raise TypeError(f"not job settings: {', '.join(unknown)}")
    return flags_layer(values)


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
        stderr.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        stderr.print("[bold red]interrupted[/]; finished outputs are kept", highlight=False)
        raise typer.Exit(EXIT_SIGINT) from None


def emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, default=str) + "\n")
    sys.stdout.flush()


def show_version(value: bool) -> None:
    """`--version`: ours, then what a bug report needs (torch, diffusers, CUDA, the device `auto` picks)."""
    if not value:
        return
    typer.echo(f"linfusion {__version__}")
    import torch

    from ..base.text import plural
    from ..core.runner import describe_device, versions
    from ..engine.memory import resolve_device

    found = versions()
    cuda = torch.version.cuda
    if cuda is None:
        cuda_line = "CUDA: none (this torch is built for the CPU)"
    elif torch.cuda.is_available():
        cuda_line = f"CUDA: {cuda}, {plural(torch.cuda.device_count(), 'GPU')}"
    else:
        cuda_line = f"CUDA: {cuda}, but no GPU is visible"
    typer.echo(f"torch {found['torch']}, diffusers {found['diffusers']}, transformers {found['transformers']}")
    typer.echo(f"python {found['python']}; {cuda_line}")
    typer.echo(f"device: {describe_device(resolve_device('auto'))}")
    raise typer.Exit()


def base_seed_flag(seed: int | None) -> int | None:
    """batch's --seed BASE: checked like a job's seed (-1: random, i.e. none)."""
    from ..core.config import FLAGS, coerce

    return coerce("seed", seed, where=FLAGS)


def check_device_flags(device: str, dtype: str) -> None:
    from ..base.errors import UsageError

    if dtype not in ("auto", "fp16", "bf16", "fp32"):
        raise UsageError(f"--dtype {dtype!r}: must be auto, fp16, bf16 or fp32")
    if device != "auto" and device.split(":")[0] not in ("cuda", "cpu", "mps"):
        raise UsageError(f"--device {device!r}: must be auto, cpu, mps, cuda or cuda:N")
    if device != "auto":
        from ..engine.memory import resolve_device

        resolve_device(device)  # a device this machine lacks: one line, exit 2, before any model loads


def render_table(table: Any, mode: str, console: Console | None = None) -> None:
    """A table on stderr (or `console`); plain ASCII in logs, where box drawing turns to mojibake."""
    from rich import box

    if mode == "plain":
        table.box = box.ASCII
    (console or stderr).print(table)


def render_plan(summary: dict[str, Any], json_out: bool) -> None:
    """The plan is the command's result: on stdout, as JSON or a table."""
    from rich.table import Table

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
    if summary.get("refine") == "demofusion":
        table.caption = "refine: demofusion (a local and a dilated global UNet pass per refine step)"
    for s in summary["stages"]:
        table.add_row(
            str(s["index"] + 1),
            s["kind"],
            s["size"],
            "-" if s["strength"] is None else f"{s['strength']:g}",
            str(s["steps"]),
            str(s["unet_passes"]),
            s["memory"],
            f"{s['estimated_peak_gib']:.1f}",
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
    for unit in summary.get("loras", []):
        out.print(f"LoRA {unit['source']} at scale {unit['scale']:g} (fused)", markup=False)
    for unit in summary.get("controlnets", []):
        out.print(f"ControlNet {unit['source']} at scale {unit['scale']:g} on {unit['image']}", markup=False)
    for unit in summary.get("ip_adapters", []):
        out.print(f"IP-Adapter {unit['source']} at scale {unit['scale']:g} on {unit['image']}", markup=False)
