"""The `linfusion` command: parse, call the Python API (core/api.py), render. Each job setting's flag comes from
its declaration (options.with_settings); no torch at import time."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ..base.errors import DEFAULT_TIMEOUT_S, EXIT_PIPE, EXIT_SIGINT, UsageError
from ..base.settings import (
    BATCH,
    GENERATE,
    PLAN,
    REPLAY,
    UPSCALE,
)
from ..base.sizes import DEFAULT_MAX_PIXELS
from ..core.jobspec import JobSpec
from ..core.replay import describe, job_from_sidecar
from ..core.settings import FLAGS, coerce
from .bench import bench_app
from .boundary import (
    ClosedStdout,
    Command,
    Group,
    PipeAwareStdout,
    boundary,
    emit_json,
    output_mode,
    refuse_flag_value_as_prompt,
    setup_logging,
    show_version,
)
from .distill import DISTILL_EXAMPLES
from .distill import distill as distill_command
from .launch import die_with_launcher, first_process, process_mode, relaunch_for
from .options import (
    FLAG,
    AllowPickleOpt,
    BatchCountOpt,
    BatchDryRunOpt,
    BatchFailFastOpt,
    BatchFileOpt,
    BatchJsonOutOpt,
    BatchOverwriteOpt,
    BatchSeedOpt,
    BatchShardOpt,
    DeviceOpt,
    DryRunOpt,
    DtypeOpt,
    GpusOpt,
    JsonOpt,
    MaxPixelsOpt,
    OutOpt,
    OverwriteOpt,
    PlanGpuOpt,
    PlanPromptOpt,
    PlanSimulateOpt,
    PlanWorldSizeOpt,
    QuietOpt,
    ReplayDtypeOpt,
    ReplaySidecarOpt,
    SaveStagesOpt,
    SplitImageOpt,
    TimeoutOpt,
    UpscaleImageOpt,
    UpscalePromptOpt,
    with_settings,
)
from .presets import presets_app
from .render import render_batch_plan, render_plan, render_table
from .report import batch_table, progress, stage_table
from .samplers import SAMPLERS_EXAMPLES, samplers_command
from .startup import started, starting
from .view import VIEW_EXAMPLES, view_command

if TYPE_CHECKING:
    from ..core.api import LinFusionPipeline
    from ..core.result import Result

REPLAY_EXAMPLES = """[bold]Examples[/]
  linfusion replay renders/00003_a-fox_17_4096x4096_1c2d3e4f.png.json
  [dim]# the same image on another machine, its model in another folder:[/]
  linfusion replay fox.png.json --model /models/sd15 --out again"""
INFO_EXAMPLES = """[bold]Examples[/]
  linfusion info renders/00003_a-fox_17_4096x4096_1c2d3e4f.png
  linfusion info renders/*.png
  linfusion info fox.png.json --json | jq .settings"""
app = typer.Typer(
    name="linfusion",
    cls=Group,
    help="Ultra-high-resolution Stable Diffusion (4K-16K+) on one GPU with LinFusion linear attention.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(presets_app, name="presets")
app.add_typer(bench_app, name="bench")
app.command("distill", cls=Command, epilog=DISTILL_EXAMPLES)(distill_command)
app.command("view", cls=Command, epilog=VIEW_EXAMPLES)(view_command)
app.command("samplers", cls=Command, epilog=SAMPLERS_EXAMPLES)(samplers_command)

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
PROMPT_HELP = "What to draw, in quotes. Longer than 75 tokens is fine; (word:1.3) weights a word."


def _pipeline(**options: Any) -> LinFusionPipeline:
    """The Python API every command is a client of, with this run's options (and, for a batch, the flags); its
    errors name the flags."""
    from ..core.api import LinFusionPipeline  # lazy: its imports cost ~0.3 s, which --help and usage errors never need

    return LinFusionPipeline(names="flags", **options)


def _import_engine() -> None:
    """Once a job is checked and will load a model: the engine's imports (torch, diffusers: seconds, paid only
    now, so a refused value costs none of them), then the collector as usual (startup.py)."""
    importlib.import_module("linfusion_cli.core.run")
    started()


def _render_result(result: Result, mode: str, json_out: bool, title: str = "") -> None:
    report = result.report
    if report.get("dry_run"):
        render_plan(report["plan"], json_out)
        return
    if mode != "quiet":
        made = "made before (skipped): " if report.get("skipped") else title
        caption = f"{made}{report['width']}x{report['height']} -> {report['path']}"
        render_table(stage_table(report, title=caption), mode)
    if json_out:
        emit_json(report)


def _run_one(
    mode: str,
    json_out: bool,
    make_job: Callable[[LinFusionPipeline], JobSpec],
    *,
    title: str = "",
    dry_run: bool = False,
    count: int = 1,
    gpus: int | None = None,
    **run: Any,
) -> None:
    """One job: resolved and checked (bad input: one line, before anything loads, and before `--gpus` starts its
    processes), then its image (`count` images, seeds counting up) made with progress on stderr, then the table or
    JSON of each."""
    if count < 1:
        raise UsageError(f"--batch-count: must be at least 1 (got {count})")
    with _pipeline(split=True, **run) as pipeline:  # split over torchrun's processes when it started us
        job = make_job(pipeline)
        if not dry_run:  # a dry run plans here, in one process
            pipeline.check(job, world=gpus)  # bad input: one line, before the engine's imports
            relaunch_for(gpus, run["device"])
            _import_engine()
        with progress(mode) as (reporter, cancel):
            pipeline.events = reporter
            for result in pipeline.runs(job, count, dry_run=dry_run, cancel=cancel):
                if first_process():
                    _render_result(result, mode, json_out, title)


def _make_one(
    make_job: Callable[[LinFusionPipeline], JobSpec],
    quiet: bool,
    json_out: bool,
    dry_run: bool,
    gpus: int | None,
    title: str = "",
    **run: Any,
) -> None:
    """`generate` and `upscale`: one job's images, over --gpus processes started for it unless it is a dry run."""
    mode = process_mode(quiet)
    setup_logging(mode)
    with boundary():
        _run_one(mode, json_out, make_job, title=title, dry_run=dry_run, gpus=gpus, **run)


def _run_options(
    out: Path, device: str, dtype: str, overwrite: bool, save_stages: bool, timeout: float
) -> dict[str, Any]:
    """The run-level options every rendering command has, by the pipeline's names."""
    return {
        "out": out,
        "device": device,
        "dtype": dtype,
        "overwrite": overwrite,
        "save_stages": save_stages,
        "timeout_s": timeout,
    }


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
@with_settings(GENERATE)
def generate(
    prompt: Annotated[str, typer.Argument(metavar="PROMPT", help=PROMPT_HELP, show_default=False)],
    settings: dict[str, Any],
    allow_pickle: AllowPickleOpt = False,
    out: OutOpt = Path("outputs"),
    overwrite: OverwriteOpt = False,
    save_stages: SaveStagesOpt = False,
    dry_run: DryRunOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    gpus: GpusOpt = None,
    timeout: TimeoutOpt = DEFAULT_TIMEOUT_S,
    batch_count: BatchCountOpt = 1,
) -> None:
    """Generate an image: a base image at the model's native size, then 2x upscale + refine up to --size."""
    run = _run_options(out, device, dtype, overwrite, save_stages, timeout)
    _make_one(
        lambda pipe: pipe.job(prompt, **settings),
        quiet,
        json_out,
        dry_run,
        gpus,
        count=batch_count,
        allow_pickle=allow_pickle,
        **run,
    )


@app.command(cls=Command, epilog=PLAN_EXAMPLES)
@with_settings(PLAN)
def plan(
    prompt: PlanPromptOpt = "",
    settings: dict[str, Any] | None = None,
    out: OutOpt = Path("outputs"),
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    world_size: PlanWorldSizeOpt = 1,
    simulate: PlanSimulateOpt = False,
    gpu: PlanGpuOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Show the stage plan (sizes, strengths, steps, memory, VAE tiling) without loading a model. On stdout."""
    setup_logging(output_mode(False))
    with boundary():
        refuse_flag_value_as_prompt(prompt)
        summary = _pipeline(out=out, device=device, dtype=dtype).plan(
            prompt, world_size=world_size, simulate=simulate, gpu=gpu, **(settings or {})
        )
        render_plan(summary, json_out)


@app.command(cls=Command, epilog=UPSCALE_EXAMPLES)
@with_settings(UPSCALE)
def upscale(
    image: UpscaleImageOpt,
    settings: dict[str, Any],
    prompt: UpscalePromptOpt = "",
    out: OutOpt = Path("outputs"),
    overwrite: OverwriteOpt = False,
    save_stages: SaveStagesOpt = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    allow_pickle: AllowPickleOpt = False,
    max_input_pixels: MaxPixelsOpt = DEFAULT_MAX_PIXELS,
    dry_run: DryRunOpt = False,
    gpus: GpusOpt = None,
    timeout: TimeoutOpt = DEFAULT_TIMEOUT_S,
    batch_count: BatchCountOpt = 1,
) -> None:
    """Upscale your own image to --size: 2x steps of upscale + refine, the last exactly the target, aspect kept."""
    run = _run_options(out, device, dtype, overwrite, save_stages, timeout)
    _make_one(
        lambda pipe: pipe.job(prompt, require_prompt=False, image=str(image), **settings),
        quiet,
        json_out,
        dry_run,
        gpus,
        title="upscaled: ",
        count=batch_count,
        allow_pickle=allow_pickle,
        max_input_pixels=max_input_pixels,
        **run,
    )


@app.command(cls=Command, epilog=BATCH_EXAMPLES)
@with_settings(BATCH)
def batch(
    file: BatchFileOpt,
    settings: dict[str, Any],
    seed: BatchSeedOpt = None,
    shard: BatchShardOpt = None,
    fail_fast: BatchFailFastOpt = False,
    out: OutOpt = Path("outputs"),
    overwrite: BatchOverwriteOpt = False,
    save_stages: SaveStagesOpt = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    json_out: BatchJsonOutOpt = False,
    quiet: QuietOpt = False,
    allow_pickle: AllowPickleOpt = False,
    split_image: SplitImageOpt = False,
    gpus: GpusOpt = None,
    timeout: TimeoutOpt = DEFAULT_TIMEOUT_S,
    dry_run: BatchDryRunOpt = False,
) -> None:
    """Run a prompt file: model loaded once, resumable, shardable (Slurm arrays, torchrun); exit 3 if some failed."""
    split = split_image or (gpus is not None and gpus > 1)
    mode = process_mode(quiet) if split else output_mode(quiet)  # a split batch speaks through its first process
    setup_logging(mode)
    with boundary():
        base_seed = coerce("seed", seed, where=FLAGS, from_text=True)  # batch's --seed BASE: checked as a seed
        run = _run_options(out, device, dtype, overwrite, save_stages, timeout)
        pipeline = _pipeline(allow_pickle=allow_pickle, split=split, **run, **settings)
        if dry_run:
            with pipeline:
                render_batch_plan(pipeline.plan_batch(file, base_seed=base_seed, shard=shard), json_out)
            return
        checked = pipeline.check_batch(file, base_seed=base_seed, shard=shard)  # the whole file, before the engine
        relaunch_for(gpus, device, "--split-image")  # --gpus N: one image at a time, split over them
        _import_engine()
        with pipeline, progress(mode) as (reporter, cancel):
            pipeline.events = reporter
            summary = pipeline.batch(
                file,
                base_seed=base_seed,
                shard=shard,
                checked=checked,
                fail_fast=fail_fast,
                on_line=emit_json if json_out and (first_process() or not split) else None,
                cancel=cancel,
            )
        if mode != "quiet":
            render_table(batch_table(summary), mode)
        raise typer.Exit(summary.exit_code)


@app.command(cls=Command, epilog=REPLAY_EXAMPLES)
@with_settings(REPLAY)
def replay(
    sidecar: ReplaySidecarOpt,
    settings: dict[str, Any],
    out: OutOpt = Path("outputs"),
    overwrite: OverwriteOpt = False,
    device: DeviceOpt = "auto",
    dtype: ReplayDtypeOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    allow_pickle: AllowPickleOpt = False,
    gpus: GpusOpt = None,
    timeout: TimeoutOpt = DEFAULT_TIMEOUT_S,
) -> None:
    """Regenerate an image from its sidecar: same settings, same seed (--model, --linfusion, --vae replace the
    recorded ones: a model folder that moved)."""
    mode = process_mode(quiet)
    setup_logging(mode)
    with boundary():
        job, recorded_dtype = job_from_sidecar(sidecar, settings)  # --model and the like replace the recorded
        run: dict[str, Any] = {"out": out, "device": device, "dtype": dtype or recorded_dtype, "overwrite": overwrite}
        run["timeout_s"] = timeout
        _run_one(mode, json_out, lambda pipe: job, title="replayed: ", gpus=gpus, allow_pickle=allow_pickle, **run)


@app.command(cls=Command, epilog=INFO_EXAMPLES)
def info(
    images: Annotated[
        list[Path],
        typer.Argument(
            metavar="IMAGE...",
            help="Images linfusion (or AUTOMATIC1111) wrote, or their sidecars (IMAGE.png.json).",
            show_default=False,
        ),
    ],
    json_out: JsonOpt = False,
    max_input_pixels: MaxPixelsOpt = DEFAULT_MAX_PIXELS,
) -> None:
    """Print the generation parameters stored in images or their sidecars (on stdout; a JSON line each with --json).
    One that cannot be read is said on stderr and the others are still printed (exit 2)."""
    failed = 0
    for number, image in enumerate(images):
        try:
            with boundary():
                meta = describe(image, max_input_pixels)
        except typer.Exit as exc:
            failed = failed or exc.exit_code
            continue
        if json_out:  # which file each line is, as given; its size in numbers
            with boundary():
                emit_json({"path": str(image), **meta})
            continue
        typer.echo(("\n" if number else "") + f"{image}: {meta['format']} {meta['width']}x{meta['height']}")
        typer.echo(meta["parameters"] or "no generation parameters found in this image")
    if failed:
        raise typer.Exit(failed)


def main() -> None:
    die_with_launcher()  # a process of a split image: not one second longer than the launcher that started it
    starting()
    stdout = PipeAwareStdout(ClosedStdout() if sys.stdout is None else sys.stdout)  # None: started with >&-
    sys.stdout = stdout  # type: ignore[assignment]
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(EXIT_SIGINT)
    except SystemExit as done:
        if stdout.broken and done.code in (1, EXIT_PIPE):  # click and rich end a broken pipe with 1
            sys.exit(EXIT_PIPE)
        raise
