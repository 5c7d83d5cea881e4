"""The `linfusion` command: parse, resolve settings, call one core function, render. No torch at import time."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape

from ..core.errors import EXIT_SIGINT
from .bench import bench_app
from .common import (
    DEVICE_PANEL,
    FLAG,
    OUTPUT_PANEL,
    PROMPT_PANEL,
    SAMPLER_PANEL,
    AllowPickleOpt,
    AspectOpt,
    BaseSizeOpt,
    Command,
    ControlEndOpt,
    ControlImageOpt,
    ControlNetOpt,
    ControlStagesOpt,
    ControlStartOpt,
    CosineScale1Opt,
    CosineScale2Opt,
    CosineScale3Opt,
    DeviceOpt,
    DtypeOpt,
    FormatOpt,
    GaussianSigmaOpt,
    Group,
    GuidanceOpt,
    HeightOpt,
    IpAdapterOpt,
    IpImageOpt,
    JsonOpt,
    LinOpt,
    LoraOpt,
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
    RefineOpt,
    SaveStagesOpt,
    SchedulerOpt,
    SeedOpt,
    SizeOpt,
    StepsOpt,
    StrengthOpt,
    StrengthsOpt,
    VaeOpt,
    VaeTileOpt,
    WidthOpt,
    base_seed_flag,
    boundary,
    check_device_flags,
    control_flags,
    emit_json,
    job_flags,
    output_mode,
    refine_flags,
    refuse_flag_value_as_prompt,
    render_plan,
    render_table,
    setup_logging,
    show_version,
    stderr,
)
from .distill import distill as distill_command
from .view import VIEW_EXAMPLES, view_command

if TYPE_CHECKING:
    import numpy as np

    from ..core.config import JobSpec
    from ..core.runner import RunOptions

app = typer.Typer(
    name="linfusion",
    cls=Group,
    help="Ultra-high-resolution Stable Diffusion (4K-16K+) on one GPU with LinFusion linear attention.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
presets_app = typer.Typer(cls=Group, help="List and show presets.", no_args_is_help=True)
app.add_typer(presets_app, name="presets")
app.add_typer(bench_app, name="bench")
app.command("distill", cls=Command)(distill_command)
app.command("view", cls=Command, epilog=VIEW_EXAMPLES)(view_command)

GENERATE_EXAMPLES = """[bold]Examples[/]
  linfusion generate "a lighthouse at dusk" --size 16k --aspect 2:1
  linfusion generate "(castle:1.3) on a cliff, mist" --preset sd15-16k --seed 42
  [dim]# on a 24 GB card:[/]
  linfusion generate "a forest" --size 8k --low-vram --format jpg
  [dim]# the plan only, no model loaded:[/]
  linfusion generate "a city" --size 4096x2048 --dry-run
  [dim]# offline smoke test (random weights; a CPU is enough):[/]
  linfusion generate "a red fox" --model tiny --size 512 --steps 8"""
PLAN_EXAMPLES = """[bold]Examples[/]
  linfusion plan --size 16k --aspect 2:1
  linfusion plan --preset sdxl-16k --max-vram 24
  linfusion plan --size 8k --json | jq '.stages[].memory'"""
UPSCALE_EXAMPLES = """[bold]Examples[/]
  linfusion upscale photo.jpg --size 8k
  linfusion upscale render.png --size 16k --prompt "a village" --strength 0.3
  linfusion upscale scan.tif --width 12000 --format tif"""
BATCH_EXAMPLES = """[bold]Examples[/]
  linfusion batch prompts.txt --size 4k --seed 1000
  linfusion batch prompts.yaml --preset sd15-16k --json > renders.jsonl
  [dim]# this machine takes jobs 0, 4, 8...:[/]
  linfusion batch prompts.csv --shard 0/4"""


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=show_version,
            is_eager=True,
            help="Show the version, with torch, diffusers, CUDA and the device.",
            **FLAG,
        ),
    ] = False,
) -> None:
    """Ultra-high-resolution Stable Diffusion (4K-16K+) on one GPU with LinFusion linear attention."""


@app.command(cls=Command, epilog=GENERATE_EXAMPLES)
def generate(
    prompt: Annotated[
        str,
        typer.Argument(
            metavar="PROMPT",
            help="What to draw, in quotes. Longer than 75 tokens is fine; (word:1.3) weights a word.",
            show_default=False,
        ),
    ],
    negative: NegativeOpt = None,
    preset: PresetOpt = None,
    size: SizeOpt = None,
    aspect: AspectOpt = None,
    width: WidthOpt = None,
    height: HeightOpt = None,
    strengths: StrengthsOpt = None,
    strength: StrengthOpt = None,
    refine: RefineOpt = None,
    cosine_scale_1: CosineScale1Opt = None,
    cosine_scale_2: CosineScale2Opt = None,
    cosine_scale_3: CosineScale3Opt = None,
    gaussian_sigma: GaussianSigmaOpt = None,
    base_size: BaseSizeOpt = None,
    steps: StepsOpt = None,
    guidance: GuidanceOpt = None,
    scheduler: SchedulerOpt = None,
    seed: SeedOpt = None,
    model: ModelOpt = None,
    linfusion: LinOpt = None,
    vae: VaeOpt = None,
    lora: LoraOpt = None,
    controlnet: ControlNetOpt = None,
    control_image: ControlImageOpt = None,
    control_start: ControlStartOpt = None,
    control_end: ControlEndOpt = None,
    control_stages: ControlStagesOpt = None,
    allow_pickle: AllowPickleOpt = False,
    ip_adapter: IpAdapterOpt = None,
    ip_image: IpImageOpt = None,
    vae_tile: VaeTileOpt = None,
    low_vram: LowVramOpt = None,
    max_vram: MaxVramOpt = None,
    out: OutOpt = Path("outputs"),
    format: FormatOpt = None,
    name: NameOpt = None,
    overwrite: OverwriteOpt = False,
    save_stages: SaveStagesOpt = False,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run", help="Print the stage plan and exit; loads no model.", rich_help_panel=OUTPUT_PANEL, **FLAG
        ),
    ] = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
) -> None:
    """Generate an image: a base image at the model's native size, then 2x upscale + refine up to --size."""
    from ..core.jobs import resolve_job
    from ..core.runner import RunOptions

    mode = output_mode(quiet)
    setup_logging(mode)
    with boundary():
        flags = job_flags(
            prompt=prompt,
            size=size,
            aspect=aspect,
            width=width,
            height=height,
            model=model,
            linfusion=linfusion,
            vae=vae,
            lora=lora,
            **control_flags(controlnet, control_image, control_start, control_end, control_stages),
            steps=steps,
            guidance=guidance,
            negative=negative,
            seed=seed,
            scheduler=scheduler,
            strengths=strengths,
            **refine_flags(refine, strength, cosine_scale_1, cosine_scale_2, cosine_scale_3, gaussian_sigma),
            base_size=base_size,
            preset=preset,
            format=format,
            name=name,
            vae_tile=vae_tile,
            low_vram=low_vram,
            max_vram=max_vram,
            ip_adapter=ip_adapter,
            ip_image=ip_image,
        )
        job = resolve_job(flags)
        check_device_flags(device, dtype)
        options = RunOptions(
            out=out, device=device, dtype=dtype, overwrite=overwrite, save_stages=save_stages, allow_pickle=allow_pickle
        )
        _run_and_render(job, options, mode, json_out, dry_run=dry_run)


def _run_and_render(
    job: JobSpec,
    options: RunOptions,
    mode: str,
    json_out: bool,
    *,
    dry_run: bool = False,
    init_image: np.ndarray | None = None,
    title: str = "",
) -> None:
    """Run one job with progress on stderr (SIGINT/SIGTERM stop it at a safe point), then the table/JSON."""
    from ..core.events import CancelToken
    from ..core.runner import generate as run_generate
    from .report import Reporter, stage_table

    cancel = CancelToken()
    restore = cancel.install()
    try:
        with Reporter(stderr, mode) as reporter:
            report = run_generate(job, options, events=reporter, cancel=cancel, dry_run=dry_run, init_image=init_image)
    finally:
        restore()
    if dry_run:
        render_plan(report["plan"], json_out)
        return
    if mode != "quiet":
        render_table(
            stage_table(report, title=f"{title}{report['width']}x{report['height']} -> {report['path']}"), mode
        )
    if json_out:
        emit_json(report)


@app.command(cls=Command, epilog=PLAN_EXAMPLES)
def plan(
    prompt: Annotated[
        str,
        typer.Argument(
            metavar="PROMPT",
            help="The prompt, if you have one: with --seed the plan also shows the output file name.",
            show_default=False,
        ),
    ] = "",
    size: SizeOpt = None,
    aspect: AspectOpt = None,
    width: WidthOpt = None,
    height: HeightOpt = None,
    model: ModelOpt = None,
    linfusion: LinOpt = None,
    vae: VaeOpt = None,
    lora: LoraOpt = None,
    controlnet: ControlNetOpt = None,
    control_image: ControlImageOpt = None,
    control_start: ControlStartOpt = None,
    control_end: ControlEndOpt = None,
    control_stages: ControlStagesOpt = None,
    ip_adapter: IpAdapterOpt = None,
    ip_image: IpImageOpt = None,
    steps: StepsOpt = None,
    guidance: GuidanceOpt = None,
    seed: SeedOpt = None,
    scheduler: SchedulerOpt = None,
    strengths: StrengthsOpt = None,
    strength: StrengthOpt = None,
    refine: RefineOpt = None,
    cosine_scale_1: CosineScale1Opt = None,
    cosine_scale_2: CosineScale2Opt = None,
    cosine_scale_3: CosineScale3Opt = None,
    gaussian_sigma: GaussianSigmaOpt = None,
    base_size: BaseSizeOpt = None,
    preset: PresetOpt = None,
    format: FormatOpt = None,
    name: NameOpt = None,
    vae_tile: VaeTileOpt = None,
    low_vram: LowVramOpt = None,
    max_vram: MaxVramOpt = None,
    out: OutOpt = Path("outputs"),
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    json_out: JsonOpt = False,
) -> None:
    """Show the stage plan (sizes, strengths, steps, memory, VAE tiling) without loading a model. On stdout."""
    from ..core.jobs import resolve_job
    from ..core.runner import RunOptions, pick_seed, plan_for, plan_summary

    setup_logging(output_mode(False))
    with boundary():
        refuse_flag_value_as_prompt(prompt)
        flags = job_flags(
            prompt=prompt,
            size=size,
            aspect=aspect,
            width=width,
            height=height,
            model=model,
            linfusion=linfusion,
            vae=vae,
            lora=lora,
            **control_flags(controlnet, control_image, control_start, control_end, control_stages),
            steps=steps,
            guidance=guidance,
            seed=seed,
            scheduler=scheduler,
            strengths=strengths,
            **refine_flags(refine, strength, cosine_scale_1, cosine_scale_2, cosine_scale_3, gaussian_sigma),
            base_size=base_size,
            preset=preset,
            format=format,
            name=name,
            vae_tile=vae_tile,
            low_vram=low_vram,
            max_vram=max_vram,
            ip_adapter=ip_adapter,
            ip_image=ip_image,
        )
        job = resolve_job(flags, require_prompt=False)
        check_device_flags(device, dtype)
        prep, family = plan_for(job, RunOptions(out=out), seed=pick_seed(job))
        render_plan(plan_summary(prep, family, device, dtype), json_out)


@app.command(cls=Command, epilog=UPSCALE_EXAMPLES)
def upscale(
    image: Annotated[
        Path,
        typer.Argument(
            metavar="IMAGE",
            help="Your image: PNG, JPEG, WebP, TIFF, BMP... any mode (alpha over white).",
            show_default=False,
        ),
    ],
    size: SizeOpt = None,
    width: WidthOpt = None,
    height: HeightOpt = None,
    prompt: Annotated[
        str,
        typer.Option(
            help="What the image shows. Optional: with one, the refine stages add detail that fits it; "
            "without, generic texture.",
            rich_help_panel=PROMPT_PANEL,
        ),
    ] = "",
    strength: StrengthOpt = None,
    model: ModelOpt = None,
    linfusion: LinOpt = None,
    vae: VaeOpt = None,
    lora: LoraOpt = None,
    controlnet: ControlNetOpt = None,
    control_image: ControlImageOpt = None,
    control_start: ControlStartOpt = None,
    control_end: ControlEndOpt = None,
    control_stages: ControlStagesOpt = None,
    steps: StepsOpt = None,
    guidance: GuidanceOpt = None,
    negative: NegativeOpt = None,
    seed: SeedOpt = None,
    scheduler: SchedulerOpt = None,
    strengths: StrengthsOpt = None,
    refine: RefineOpt = None,
    cosine_scale_1: CosineScale1Opt = None,
    cosine_scale_2: CosineScale2Opt = None,
    cosine_scale_3: CosineScale3Opt = None,
    gaussian_sigma: GaussianSigmaOpt = None,
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
    ip_adapter: IpAdapterOpt = None,
    ip_image: IpImageOpt = None,
    max_input_pixels: MaxPixelsOpt = 1_000_000_000,
) -> None:
    """Upscale your own image to --size: 2x steps of upscale + refine, the last exactly the target, aspect kept."""
    from ..core.jobs import resolve_job
    from ..core.runner import RunOptions
    from ..io.images import load_rgb

    mode = output_mode(quiet)
    setup_logging(mode)
    with boundary():
        flags = job_flags(
            image=str(image),
            prompt=prompt,
            size=size,
            width=width,
            height=height,
            model=model,
            linfusion=linfusion,
            vae=vae,
            lora=lora,
            **control_flags(controlnet, control_image, control_start, control_end, control_stages),
            steps=steps,
            guidance=guidance,
            negative=negative,
            seed=seed,
            scheduler=scheduler,
            strengths=strengths,
            **refine_flags(refine, strength, cosine_scale_1, cosine_scale_2, cosine_scale_3, gaussian_sigma),
            preset=preset,
            format=format,
            name=name,
            vae_tile=vae_tile,
            low_vram=low_vram,
            max_vram=max_vram,
            ip_adapter=ip_adapter,
            ip_image=ip_image,
        )
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


@app.command(cls=Command, epilog=BATCH_EXAMPLES)
def batch(
    file: Annotated[
        Path,
        typer.Argument(
            metavar="FILE", help="Prompt file: .txt (a prompt a line), .yaml/.yml, .jsonl or .csv.", show_default=False
        ),
    ],
    size: SizeOpt = None,
    aspect: AspectOpt = None,
    width: WidthOpt = None,
    height: HeightOpt = None,
    model: ModelOpt = None,
    linfusion: LinOpt = None,
    vae: VaeOpt = None,
    lora: LoraOpt = None,
    controlnet: ControlNetOpt = None,
    control_image: ControlImageOpt = None,
    control_start: ControlStartOpt = None,
    control_end: ControlEndOpt = None,
    control_stages: ControlStagesOpt = None,
    steps: StepsOpt = None,
    guidance: GuidanceOpt = None,
    negative: NegativeOpt = None,
    scheduler: SchedulerOpt = None,
    strengths: StrengthsOpt = None,
    strength: StrengthOpt = None,
    refine: RefineOpt = None,
    cosine_scale_1: CosineScale1Opt = None,
    cosine_scale_2: CosineScale2Opt = None,
    cosine_scale_3: CosineScale3Opt = None,
    gaussian_sigma: GaussianSigmaOpt = None,
    base_size: BaseSizeOpt = None,
    preset: PresetOpt = None,
    format: FormatOpt = None,
    vae_tile: VaeTileOpt = None,
    low_vram: LowVramOpt = None,
    max_vram: MaxVramOpt = None,
    seed: Annotated[
        int | None,
        typer.Option(
            help="Base seed: a job without its own seed gets BASE + its index; -1 means random \\[default: random].",
            rich_help_panel=SAMPLER_PANEL,
        ),
    ] = None,
    shard: Annotated[
        str | None,
        typer.Option(
            metavar="K/N",
            help="Run the jobs whose index mod N is K \\[default: from SLURM_ARRAY_TASK_* or torchrun's "
            "RANK/WORLD_SIZE].",
            rich_help_panel=DEVICE_PANEL,
        ),
    ] = None,
    fail_fast: Annotated[
        bool, typer.Option("--fail-fast", help="Stop at the first failed job.", rich_help_panel=OUTPUT_PANEL, **FLAG)
    ] = False,
    out: OutOpt = Path("outputs"),
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Redo jobs whose outputs exist.", rich_help_panel=OUTPUT_PANEL, **FLAG)
    ] = False,
    save_stages: SaveStagesOpt = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    json_out: Annotated[
        bool,
        typer.Option(
            "--json", help="One JSON line per finished or skipped job on stdout.", rich_help_panel=OUTPUT_PANEL, **FLAG
        ),
    ] = False,
    quiet: QuietOpt = False,
    allow_pickle: AllowPickleOpt = False,
    ip_adapter: IpAdapterOpt = None,
    ip_image: IpImageOpt = None,
) -> None:
    """Run a prompt file: model loaded once, resumable, shardable (Slurm arrays, torchrun); exit 3 if some failed."""
    from ..core.batch import run_batch
    from ..core.events import CancelToken
    from ..core.runner import RunOptions
    from .report import Reporter, batch_table

    mode = output_mode(quiet)
    setup_logging(mode)
    with boundary():
        flags = job_flags(  # no seed: --seed is the base seed here
            size=size,
            aspect=aspect,
            width=width,
            height=height,
            model=model,
            linfusion=linfusion,
            vae=vae,
            lora=lora,
            **control_flags(controlnet, control_image, control_start, control_end, control_stages),
            steps=steps,
            guidance=guidance,
            negative=negative,
            scheduler=scheduler,
            strengths=strengths,
            **refine_flags(refine, strength, cosine_scale_1, cosine_scale_2, cosine_scale_3, gaussian_sigma),
            base_size=base_size,
            preset=preset,
            format=format,
            vae_tile=vae_tile,
            low_vram=low_vram,
            max_vram=max_vram,
            ip_adapter=ip_adapter,
            ip_image=ip_image,
        )
        base_seed = base_seed_flag(seed)
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
                    base_seed=base_seed,
                    shard_flag=shard,
                    fail_fast=fail_fast,
                    events=reporter,
                    on_line=emit_json if json_out else None,
                    cancel=cancel,
                )
        finally:
            restore()
        if mode != "quiet":
            render_table(batch_table(summary), mode)
        raise typer.Exit(summary.exit_code)


@app.command(cls=Command)
def replay(
    sidecar: Annotated[
        Path,
        typer.Argument(
            metavar="SIDECAR", help="A sidecar .json that linfusion wrote next to an image.", show_default=False
        ),
    ],
    out: OutOpt = Path("outputs"),
    overwrite: OverwriteOpt = False,
    device: DeviceOpt = "auto",
    dtype: Annotated[
        str | None,
        typer.Option(help="Precision \\[default: the one recorded in the sidecar].", rich_help_panel=DEVICE_PANEL),
    ] = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    allow_pickle: AllowPickleOpt = False,
) -> None:
    """Regenerate an image from its sidecar: same settings, same seed."""
    from ..core.replay import job_from_sidecar
    from ..core.runner import RunOptions
    from ..io.images import load_rgb

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


@app.command(cls=Command)
def info(
    image: Annotated[
        Path,
        typer.Argument(metavar="IMAGE", help="An image linfusion (or AUTOMATIC1111) wrote.", show_default=False),
    ],
    json_out: JsonOpt = False,
    max_input_pixels: MaxPixelsOpt = 1_000_000_000,
) -> None:
    """Print the generation parameters stored in an image (on stdout)."""
    from ..io.output import read_metadata

    with boundary():
        meta = read_metadata(image, max_input_pixels)
        if json_out:
            emit_json(meta)
            return
        typer.echo(f"{image}: {meta['format']} {meta['size']}")
        if meta["parameters"]:
            typer.echo(meta["parameters"])
        else:
            typer.echo("no generation parameters found in this image")


@presets_app.command("list", cls=Command)
def presets_list() -> None:
    """Shipped presets and your own (in $LINFUSION_HOME/presets or ~/.config/linfusion/presets)."""
    from rich.table import Table

    from ..core.presets import list_presets

    with boundary():
        table = Table(title="presets", title_justify="left")
        table.add_column("name", no_wrap=True)
        table.add_column("description")
        for preset in list_presets():
            table.add_row(escape(preset.name), escape(preset.description))
        Console(width=120, emoji=False).print(table)


@presets_app.command("show", cls=Command)
def presets_show(
    name: Annotated[str, typer.Argument(metavar="NAME", help="Preset name or YAML file.", show_default=False)],
) -> None:
    """Print a preset's description and settings (as YAML)."""
    import yaml

    from ..core.presets import load_preset

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
