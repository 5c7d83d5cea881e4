"""The `linfusion` command: parse, resolve settings, call one core function, render. No torch at import time."""

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

app = typer.Typer(
    name="linfusion",
    help="Ultra-high-resolution Stable Diffusion (4K-16K+) on one GPU with LinFusion linear attention.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
presets_app = typer.Typer(help="List and show presets.", no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks with random weights (no download); JSON on stdout.", no_args_is_help=True)
app.add_typer(presets_app, name="presets")
app.add_typer(bench_app, name="bench")

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


def _job_flags(values: dict[str, Any], exclude: tuple[str, ...] = (), **extra: Any) -> dict[str, Any]:
    """The job settings among a command's parameters (its `locals()`), validated; None means not given."""
    from .config import JOB_KEYS
    from .jobs import flags_layer

    chosen = {k: v for k, v in values.items() if k in JOB_KEYS and k not in exclude}
    return flags_layer({**chosen, **extra})


def _output_mode(quiet: bool) -> str:
    if quiet:
        return "quiet"
    return "rich" if stderr.is_terminal else "plain"


def _setup_logging(mode: str) -> None:
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


def _emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, default=str) + "\n")
    sys.stdout.flush()


def _version(value: bool) -> None:
    if value:
        typer.echo(f"linfusion {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")
    ] = False,
) -> None:
    """Ultra-high-resolution Stable Diffusion (4K-16K+) on one GPU with LinFusion linear attention."""


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="What to draw.")],
    size: SizeOpt = None,
    aspect: AspectOpt = None,
    width: WidthOpt = None,
    height: HeightOpt = None,
    model: ModelOpt = None,
    linfusion: LinOpt = None,
    vae: VaeOpt = None,
    steps: StepsOpt = None,
    guidance: GuidanceOpt = None,
    negative: NegativeOpt = None,
    seed: SeedOpt = None,
    scheduler: SchedulerOpt = None,
    strengths: StrengthsOpt = None,
    base_size: BaseSizeOpt = None,
    preset: PresetOpt = None,
    format: FormatOpt = None,
    name: NameOpt = None,
    vae_tile: VaeTileOpt = None,
    low_vram: LowVramOpt = None,
    max_vram: MaxVramOpt = None,
    out: OutOpt = Path("outputs"),
    overwrite: OverwriteOpt = False,
    save_stages: SaveStagesOpt = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    dry_run: Annotated[bool, typer.Option(help="Print the stage plan and exit; loads no model.")] = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    allow_pickle: AllowPickleOpt = False,
) -> None:
    """Generate an image: a base image at the model's native size, then 2x upscale + refine up to --size."""
    from .jobs import resolve_job
    from .runner import RunOptions

    mode = _output_mode(quiet)
    _setup_logging(mode)
    with boundary():
        flags = _job_flags(locals())
        job = resolve_job(flags)
        _check_device_flags(device, dtype)
        options = RunOptions(
            out=out, device=device, dtype=dtype, overwrite=overwrite, save_stages=save_stages, allow_pickle=allow_pickle
        )
        _run_and_render(job, options, mode, json_out, dry_run=dry_run)


def _run_and_render(
    job: Any, options: Any, mode: str, json_out: bool, *, dry_run: bool = False, init_image: Any = None, title: str = ""
) -> None:
    """Run one job with progress on stderr (SIGINT/SIGTERM stop it at a safe point), then the table/JSON."""
    from .events import CancelToken
    from .report import Reporter, stage_table
    from .runner import generate as run_generate

    cancel = CancelToken()
    restore = cancel.install()
    try:
        with Reporter(stderr, mode) as reporter:
            report = run_generate(job, options, events=reporter, cancel=cancel, dry_run=dry_run, init_image=init_image)
    finally:
        restore()
    if dry_run:
        _render_plan(report["plan"], json_out, mode)
        return
    if mode != "quiet":
        stderr.print(stage_table(report, title=f"{title}{report['width']}x{report['height']} -> {report['path']}"))
    if json_out:
        _emit_json(report)


@app.command()
def plan(
    prompt: Annotated[str, typer.Argument(help="The prompt (only used for the output name).")] = "plan",
    size: SizeOpt = None,
    aspect: AspectOpt = None,
    width: WidthOpt = None,
    height: HeightOpt = None,
    model: ModelOpt = None,
    steps: StepsOpt = None,
    guidance: GuidanceOpt = None,
    seed: SeedOpt = None,
    scheduler: SchedulerOpt = None,
    strengths: StrengthsOpt = None,
    base_size: BaseSizeOpt = None,
    preset: PresetOpt = None,
    format: FormatOpt = None,
    vae_tile: VaeTileOpt = None,
    low_vram: LowVramOpt = None,
    max_vram: MaxVramOpt = None,
    out: OutOpt = Path("outputs"),
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    json_out: JsonOpt = False,
) -> None:
    """Show the stage plan (sizes, strengths, steps, memory, VAE tiling) without loading a model."""
    from .jobs import resolve_job
    from .runner import RunOptions, pick_seed, plan_for, plan_summary

    with boundary():
        flags = _job_flags(locals())
        job = resolve_job(flags)
        _check_device_flags(device, dtype)
        prep, family = plan_for(job, RunOptions(out=out), seed=pick_seed(job))
        _render_plan(plan_summary(prep, family, device, dtype), json_out, "plain")


@app.command()
def upscale(
    image: Annotated[
        Path, typer.Argument(help="Your image: PNG, JPEG, WebP, TIFF, BMP... any mode (alpha over white).")
    ],
    size: SizeOpt = None,
    width: WidthOpt = None,
    height: HeightOpt = None,
    prompt: Annotated[
        str,
        typer.Option(
            help="What the image shows. Optional: with one, the refine stages add detail that fits it; "
            "without, generic texture."
        ),
    ] = "",
    strength: Annotated[
        float | None,
        typer.Option(help="The first refine stage's strength; later stages fall to 0.1 \\[default: 0.4]."),
    ] = None,
    model: ModelOpt = None,
    linfusion: LinOpt = None,
    vae: VaeOpt = None,
    steps: StepsOpt = None,
    guidance: GuidanceOpt = None,
    negative: NegativeOpt = None,
    seed: SeedOpt = None,
    scheduler: SchedulerOpt = None,
    strengths: StrengthsOpt = None,
    preset: PresetOpt = None,
    format: FormatOpt = None,
    name: NameOpt = None,
    vae_tile: VaeTileOpt = None,
    low_vram: LowVramOpt = None,
    max_vram: MaxVramOpt = None,
    out: OutOpt = Path("outputs"),
    overwrite: OverwriteOpt = False,
    save_stages: SaveStagesOpt = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    allow_pickle: AllowPickleOpt = False,
    max_input_pixels: MaxPixelsOpt = 1_000_000_000,
) -> None:
    """Upscale your own image to --size: 2x steps of upscale + refine, the last exactly the target, aspect kept."""
    from .images import load_rgb
    from .jobs import resolve_job
    from .runner import RunOptions

    mode = _output_mode(quiet)
    _setup_logging(mode)
    with boundary():
        flags = _job_flags(locals(), image=str(image))
        job = resolve_job(flags, require_prompt=False)
        _check_device_flags(device, dtype)
        pixels = load_rgb(image, max_input_pixels)
        options = RunOptions(
            out=out,
            device=device,
            dtype=dtype,
            overwrite=overwrite,
            save_stages=save_stages,
            allow_pickle=allow_pickle,
            max_input_pixels=max_input_pixels,
        )
        _run_and_render(job, options, mode, json_out, init_image=pixels, title="upscaled: ")


@app.command()
def batch(
    file: Annotated[Path, typer.Argument(help="Prompt file: .txt (a prompt a line), .yaml/.yml, .jsonl or .csv.")],
    size: SizeOpt = None,
    aspect: AspectOpt = None,
    width: WidthOpt = None,
    height: HeightOpt = None,
    model: ModelOpt = None,
    linfusion: LinOpt = None,
    vae: VaeOpt = None,
    steps: StepsOpt = None,
    guidance: GuidanceOpt = None,
    negative: NegativeOpt = None,
    scheduler: SchedulerOpt = None,
    strengths: StrengthsOpt = None,
    base_size: BaseSizeOpt = None,
    preset: PresetOpt = None,
    format: FormatOpt = None,
    vae_tile: VaeTileOpt = None,
    low_vram: LowVramOpt = None,
    max_vram: MaxVramOpt = None,
    seed: Annotated[
        int | None, typer.Option(help="Base seed: a job without its own seed gets BASE + its index [default: random].")
    ] = None,
    shard: Annotated[
        str | None,
        typer.Option(
            help="Run jobs whose index mod N is K, as K/N [default: from SLURM_ARRAY_TASK_* or torchrun's RANK/WORLD_SIZE]."
        ),
    ] = None,
    fail_fast: Annotated[bool, typer.Option(help="Stop at the first failed job.")] = False,
    out: OutOpt = Path("outputs"),
    overwrite: Annotated[bool, typer.Option(help="Redo jobs whose outputs exist.")] = False,
    save_stages: SaveStagesOpt = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    json_out: Annotated[
        bool, typer.Option("--json", help="One JSON line per finished or skipped job on stdout.")
    ] = False,
    quiet: QuietOpt = False,
    allow_pickle: AllowPickleOpt = False,
) -> None:
    """Run a prompt file: model loaded once, resumable, shardable (Slurm arrays, torchrun); exit 3 if some failed."""
    from .batch import run_batch
    from .events import CancelToken
    from .report import Reporter, batch_table
    from .runner import RunOptions

    mode = _output_mode(quiet)
    _setup_logging(mode)
    with boundary():
        flags = _job_flags(locals(), exclude=("seed",))  # --seed is the base seed here
        _check_device_flags(device, dtype)
        options = RunOptions(
            out=out, device=device, dtype=dtype, overwrite=overwrite, save_stages=save_stages, allow_pickle=allow_pickle
        )
        cancel = CancelToken()
        restore = cancel.install()
        try:
            with Reporter(stderr, mode) as reporter:
                summary = run_batch(
                    file,
                    flags,
                    options,
                    base_seed=seed,
                    shard_flag=shard,
                    fail_fast=fail_fast,
                    events=reporter,
                    on_line=_emit_json if json_out else None,
                    cancel=cancel,
                )
        finally:
            restore()
        if mode != "quiet":
            stderr.print(batch_table(summary))
        raise typer.Exit(summary.exit_code)


@app.command()
def replay(
    sidecar: Annotated[Path, typer.Argument(help="A sidecar .json that linfusion wrote next to an image.")],
    out: OutOpt = Path("outputs"),
    overwrite: OverwriteOpt = False,
    device: DeviceOpt = "auto",
    dtype: Annotated[str | None, typer.Option(help="Precision [default: the one recorded in the sidecar].")] = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    allow_pickle: AllowPickleOpt = False,
) -> None:
    """Regenerate an image from its sidecar: same settings, same seed."""
    from .images import load_rgb
    from .replay import job_from_sidecar
    from .runner import RunOptions

    mode = _output_mode(quiet)
    _setup_logging(mode)
    with boundary():
        job, recorded_dtype = job_from_sidecar(sidecar)
        options = RunOptions(
            out=out, device=device, dtype=dtype or recorded_dtype, overwrite=overwrite, allow_pickle=allow_pickle
        )
        _check_device_flags(device, options.dtype)
        init_image = load_rgb(job.image) if job.image else None
        _run_and_render(job, options, mode, json_out, init_image=init_image, title="replayed: ")


@app.command()
def info(
    image: Annotated[Path, typer.Argument(help="An image linfusion (or AUTOMATIC1111) wrote.")],
    json_out: JsonOpt = False,
    max_input_pixels: MaxPixelsOpt = 1_000_000_000,
) -> None:
    """Print the generation parameters stored in an image."""
    from .output import read_metadata

    with boundary():
        meta = read_metadata(image, max_input_pixels)
        if json_out:
            _emit_json(meta)
            return
        stderr.print(f"{image}: {meta['format']} {meta['size']}", highlight=False)
        if meta["parameters"]:
            typer.echo(meta["parameters"])
        else:
            stderr.print("no generation parameters found in this image", highlight=False)


@presets_app.command("list")
def presets_list() -> None:
    """Shipped presets and your own (in $LINFUSION_HOME/presets or ~/.config/linfusion/presets)."""
    from rich.table import Table

    from .presets import list_presets

    with boundary():
        table = Table(title="presets", title_justify="left")
        table.add_column("name", no_wrap=True)
        table.add_column("description")
        for preset in list_presets():
            table.add_row(preset.name, preset.description)
        Console(width=120).print(table)


@presets_app.command("show")
def presets_show(name: Annotated[str, typer.Argument(help="Preset name or YAML file.")]) -> None:
    """Print a preset's description and settings (as YAML)."""
    import yaml

    from .presets import load_preset

    with boundary():
        preset = load_preset(name)
        typer.echo(f"# {preset.name} ({preset.path})")
        for line in preset.description.splitlines():
            typer.echo(f"# {line}")
        typer.echo(yaml.safe_dump(preset.settings, sort_keys=False).rstrip())


def _check_device_flags(device: str, dtype: str) -> None:
    from .errors import UsageError

    if dtype not in ("auto", "fp16", "bf16", "fp32"):
        raise UsageError(f"--dtype {dtype!r}: must be auto, fp16, bf16 or fp32")
    if device != "auto" and device.split(":")[0] not in ("cuda", "cpu", "mps"):
        raise UsageError(f"--device {device!r}: must be auto, cpu, mps, cuda or cuda:N")


def _render_plan(summary: dict[str, Any], json_out: bool, mode: str) -> None:
    from rich.table import Table

    if json_out:
        _emit_json(summary)
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


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(EXIT_SIGINT)


# --- bench --------------------------------------------------------------------------------------------------
ArchOpt = Annotated[
    str, typer.Option(help="Architecture with random weights: tiny, tiny-sd2, tiny-sdxl, sd15, sd21, sdxl.")
]
BenchDeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N, mps.")]
BenchDtypeOpt = Annotated[str, typer.Option(help="auto (fp16 on GPUs, fp32 on the CPU), fp16, bf16, fp32.")]


def _bench_setup(arch: str | None, device: str, dtype: str) -> tuple[Any, Any]:
    from .archs import ARCHS
    from .errors import UsageError
    from .memory import resolve_device, resolve_dtype

    if arch is not None and arch not in ARCHS:
        raise UsageError(f"--arch {arch!r}: must be one of {', '.join(ARCHS)}")
    _check_device_flags(device, dtype)
    _setup_logging("plain")
    dev = resolve_device(device)
    return dev, resolve_dtype(dtype, dev)


@bench_app.command("unet")
def bench_unet_cmd(
    arch: ArchOpt = "tiny",
    sizes: Annotated[
        str | None, typer.Option(help="Comma-separated sizes, N or WxH [default: per architecture].")
    ] = None,
    device: BenchDeviceOpt = "auto",
    dtype: BenchDtypeOpt = "auto",
    repeats: Annotated[int, typer.Option(min=1, help="Timed steps per measurement (median).")] = 3,
    sdpa: Annotated[bool, typer.Option(help="Also time ordinary attention (SDPA).")] = True,
) -> None:
    """Time one UNet step (batch 2, as with guidance) with LinFusion and with ordinary attention."""
    from .bench import bench_unet, parse_size
    from .errors import UsageError

    with boundary():
        dev, dt = _bench_setup(arch, device, dtype)
        size_list = [s.strip() for s in sizes.split(",")] if sizes else None
        try:
            [parse_size(s) for s in size_list or []]
        except ValueError as exc:
            raise UsageError(f"--sizes: {exc}") from None
        modes = ("linfusion", "sdpa") if sdpa else ("linfusion",)

        def show(row: dict[str, Any]) -> None:
            cells = [
                f"{m}: "
                + (f"{row[m]['seconds']:.4f} s" if "seconds" in row.get(m, {}) else row.get(m, {}).get("skipped", "-"))
                for m in modes
            ]
            ratio = f", SDPA/LinFusion {row['sdpa_over_linfusion']}x" if "sdpa_over_linfusion" in row else ""
            stderr.print(
                f"{row['size']:>11} ({row['tokens']} tokens, {row['memory']}): {'; '.join(cells)}{ratio}",
                highlight=False,
            )

        _emit_json(bench_unet(arch, size_list, dev, dt, repeats=repeats, modes=modes, on_result=show))


@bench_app.command("attention")
def bench_attention_cmd(
    tokens: Annotated[str, typer.Option(help="Comma-separated token counts.")] = "4096,16384,65536",
    dim: Annotated[int, typer.Option(help="Channels (SD-1.5's top level: 320).")] = 320,
    heads: Annotated[int, typer.Option(help="Heads (SD-1.5: 8).")] = 8,
    device: BenchDeviceOpt = "auto",
    dtype: BenchDtypeOpt = "auto",
    repeats: Annotated[int, typer.Option(min=1)] = 5,
) -> None:
    """Time the LinFusion layer against the straightforward batched-matmul form of the same formula."""
    from .bench import bench_attention
    from .errors import UsageError

    with boundary():
        dev, dt = _bench_setup(None, device, dtype)
        try:
            counts = [int(t) for t in tokens.split(",")]
        except ValueError:
            raise UsageError(f"--tokens {tokens!r}: comma-separated whole numbers") from None
        report = bench_attention(counts, dim, heads, dev, dt, repeats=repeats)
        for row in report["results"]:
            stderr.print(
                f"N={row['tokens']}: ours {row['ours_seconds']:.4f} s, straightforward "
                f"{row['straightforward_seconds']:.4f} s ({row['speedup']}x)",
                highlight=False,
            )
        _emit_json(report)


@bench_app.command("vae")
def bench_vae_cmd(
    arch: Annotated[str, typer.Option(help="VAE shape: sd15 (SD-1.x/2.x VAE), sdxl, tiny.")] = "sd15",
    sizes: Annotated[str, typer.Option(help="Comma-separated output sizes, N or WxH.")] = "2048,4096",
    tile: Annotated[int | None, typer.Option(help="Tile side, px [default: automatic].")] = None,
    fidelity: Annotated[bool, typer.Option(help="Instead: PSNR of tiled vs untiled at --fidelity-size.")] = False,
    fidelity_size: Annotated[int, typer.Option(help="Output side for --fidelity (untiled must fit).")] = 768,
    fidelity_tile: Annotated[int, typer.Option(help="Tile side for --fidelity.")] = 256,
    seeds: Annotated[str, typer.Option(help="Comma-separated seeds for --fidelity.")] = "0",
    diffusers: Annotated[bool, typer.Option(help="Also time diffusers' built-in tiling (1024 px tiles).")] = True,
    device: BenchDeviceOpt = "auto",
    dtype: BenchDtypeOpt = "auto",
    repeats: Annotated[int, typer.Option(min=1)] = 1,
) -> None:
    """Tiled VAE decode/encode against the untiled per-pixel floor and diffusers' tiling; or --fidelity."""
    from .bench import bench_vae, parse_size, vae_fidelity
    from .errors import UsageError

    with boundary():
        dev, dt = _bench_setup(arch, device, dtype)
        if fidelity:
            try:
                seed_list = [int(s) for s in seeds.split(",")]
            except ValueError:
                raise UsageError(f"--seeds {seeds!r}: comma-separated whole numbers") from None
            report = vae_fidelity(arch, fidelity_size, fidelity_tile, seed_list, dev, dt)
            for row in report["results"]:
                stderr.print(
                    f"seed {row['seed']}: decode {row['decode_psnr']} dB (diffusers "
                    f"{row['diffusers_decode_psnr']}), encode {row['encode_psnr']} dB (diffusers "
                    f"{row['diffusers_encode_psnr']})",
                    highlight=False,
                )
            _emit_json(report)
            return
        size_list = [s.strip() for s in sizes.split(",")]
        try:
            [parse_size(s) for s in size_list]
        except ValueError as exc:
            raise UsageError(f"--sizes: {exc}") from None
        report = bench_vae(arch, size_list, dev, dt, tile=tile, repeats=repeats, diffusers=diffusers)
        for row in report["results"]:
            stderr.print(
                f"{row['size']} (tile {row['tile']}): decode {row['decode']['seconds']} s "
                f"({row['decode']['over_floor']}x floor), encode {row['encode']['seconds']} s "
                f"({row['encode']['over_floor']}x floor)",
                highlight=False,
            )
        _emit_json(report)


@bench_app.command("png")
def bench_png_cmd(
    size: Annotated[str, typer.Option(help="Image size, WxH.")] = "16384x8192",
    repeats: Annotated[int, typer.Option(min=1)] = 3,
    pillow: Annotated[bool, typer.Option(help="Also time Pillow's fastest PNG level (slow).")] = True,
) -> None:
    """Time writing a big PNG (fsynced) with our encoder and with Pillow."""
    from .bench import bench_png, parse_size
    from .errors import UsageError

    with boundary():
        try:
            width, height = parse_size(size)
        except ValueError as exc:
            raise UsageError(f"--size: {exc}") from None
        report = bench_png(width, height, repeats=repeats, pillow=pillow)
        stderr.print(
            f"{report['size']}: linfusion {report['linfusion']['seconds']} s "
            f"({report['linfusion']['mib']} MiB, {report['deflate']})"
            + (f", Pillow level 1 {report['pillow_level1']['seconds']} s ({report['speedup']}x)" if pillow else ""),
            highlight=False,
        )
        _emit_json(report)


@bench_app.command("pipeline")
def bench_pipeline_cmd(
    arch: ArchOpt = "sd15",
    size: SizeOpt = None,
    aspect: AspectOpt = None,
    preset: PresetOpt = None,
    steps: StepsOpt = None,
    scheduler: SchedulerOpt = None,
    low_vram: LowVramOpt = None,
    max_vram: MaxVramOpt = None,
    vae_tile: VaeTileOpt = None,
    baseline: Annotated[bool, typer.Option(help="Also run the published recipe as its notebooks build it.")] = False,
    keep: Annotated[Path | None, typer.Option(help="Keep the output image in this folder.")] = None,
    device: BenchDeviceOpt = "auto",
    dtype: BenchDtypeOpt = "auto",
) -> None:
    """The whole generate path with random weights: model load, each stage, file writing; JSON on stdout."""
    from .bench_pipeline import bench_pipeline

    with boundary():
        dev, dt = _bench_setup(arch, device, dtype)
        flags = _job_flags(locals())
        report = bench_pipeline(arch, flags, dev, dt, out=keep, baseline=baseline)
        stderr.print(
            f"{report['size']} ({arch}, {report['device']}): load {report['model_load_seconds']} s, "
            f"generate {report['generate_seconds']} s, write {report['write_seconds']} s, peak VRAM "
            f"{report['peak_vram_allocated_gib']} GiB",
            highlight=False,
        )
        for s in report["stages"]:
            stderr.print(
                f"  stage {s['index'] + 1} {s['size']}: {s['seconds']:.2f} s, "
                f"{s['memory_settings']['name']}, VRAM {s['peak_vram_allocated_gib']} GiB",
                highlight=False,
            )
        if "baseline" in report:
            stderr.print(
                f"published recipe: {report['baseline']['seconds']} s "
                f"({report['speedup_over_baseline']}x slower than ours)",
                highlight=False,
            )
        _emit_json(report)
