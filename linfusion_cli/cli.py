"""The `linfusion` command: parse, resolve settings, call one core function, render. No torch at import time."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from .cli_bench import bench_app
from .cli_common import (
    AllowPickleOpt,
    AspectOpt,
    BaseSizeOpt,
    DeviceOpt,
    DtypeOpt,
    FormatOpt,
    GuidanceOpt,
    HeightOpt,
    JsonOpt,
    LinOpt,
    LowVramOpt,
    MaxPixelsOpt,
    MaxVramOpt,
    ModelOpt,
    NameOpt,
    NegativeOpt,
    OutOpt,
    OverwriteOpt,
    PresetOpt,
    QuietOpt,
    SaveStagesOpt,
    SchedulerOpt,
    SeedOpt,
    SizeOpt,
    StepsOpt,
    StrengthsOpt,
    VaeOpt,
    VaeTileOpt,
    WidthOpt,
    boundary,
    check_device_flags,
    emit_json,
    job_flags,
    output_mode,
    render_plan,
    setup_logging,
    show_version,
    stderr,
)
from .errors import EXIT_SIGINT

app = typer.Typer(
    name="linfusion",
    help="Ultra-high-resolution Stable Diffusion (4K-16K+) on one GPU with LinFusion linear attention.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
presets_app = typer.Typer(help="List and show presets.", no_args_is_help=True)
app.add_typer(presets_app, name="presets")
app.add_typer(bench_app, name="bench")


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=show_version, is_eager=True, help="Show the version.")
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

    mode = output_mode(quiet)
    setup_logging(mode)
    with boundary():
        flags = job_flags(locals())
        job = resolve_job(flags)
        check_device_flags(device, dtype)
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
        render_plan(report["plan"], json_out, mode)
        return
    if mode != "quiet":
        stderr.print(stage_table(report, title=f"{title}{report['width']}x{report['height']} -> {report['path']}"))
    if json_out:
        emit_json(report)


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
        flags = job_flags(locals())
        job = resolve_job(flags)
        check_device_flags(device, dtype)
        prep, family = plan_for(job, RunOptions(out=out), seed=pick_seed(job))
        render_plan(plan_summary(prep, family, device, dtype), json_out, "plain")


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

    mode = output_mode(quiet)
    setup_logging(mode)
    with boundary():
        flags = job_flags(locals(), image=str(image))
        job = resolve_job(flags, require_prompt=False)
        check_device_flags(device, dtype)
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

    mode = output_mode(quiet)
    setup_logging(mode)
    with boundary():
        flags = job_flags(locals(), exclude=("seed",))  # --seed is the base seed here
        check_device_flags(device, dtype)
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
                    on_line=emit_json if json_out else None,
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

    mode = output_mode(quiet)
    setup_logging(mode)
    with boundary():
        job, recorded_dtype = job_from_sidecar(sidecar)
        options = RunOptions(
            out=out, device=device, dtype=dtype or recorded_dtype, overwrite=overwrite, allow_pickle=allow_pickle
        )
        check_device_flags(device, options.dtype)
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
            emit_json(meta)
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


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(EXIT_SIGINT)
