"""`linfusion bench ...`: benchmarks with random weights (no download); JSON on stdout, a summary on stderr."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ..base.errors import UsageError
from ..base.settings import BENCH
from ..core.jobs import flags_layer
from ..core.plan_report import check_device
from ..models.archs import ARCHS
from .boundary import Command, Group, boundary, emit_json, setup_logging, stderr
from .options import FLAG, with_settings

# The benchmarks' modules are imported inside the commands: they import torch, which --help never needs.
BENCH_EXAMPLES = """[bold]Examples[/]
  linfusion bench unet --arch sd15 --sizes 1024,4096
  linfusion bench pipeline --arch sdxl --preset sdxl-16k > sdxl-16k.json
  linfusion bench pipeline --arch tiny --size 512 --steps 4 --lora tiny --controlnet tiny --control-image previous
  linfusion bench png --size 16384x8192"""
bench_app = typer.Typer(
    cls=Group,
    help="Benchmarks with random weights (no download); JSON on stdout.",
    no_args_is_help=True,
    epilog=BENCH_EXAMPLES,
)


# --- bench --------------------------------------------------------------------------------------------------
ArchOpt = Annotated[
    str, typer.Option(help="Architecture with random weights: tiny, tiny-sd2, tiny-sdxl, sd15, sd21, sdxl.")
]
BenchDeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N, mps.")]
BenchDtypeOpt = Annotated[str, typer.Option(help="auto (fp16 on GPUs, fp32 on the CPU), fp16, bf16, fp32.")]


def _whole_numbers(text: str, flag: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise UsageError(f"{flag} {text!r}: comma-separated whole numbers") from None


def _bench_setup(arch: str | None, device: str, dtype: str) -> tuple[Any, Any]:

    if arch is not None and arch not in ARCHS:
        raise UsageError(f"--arch {arch!r}: must be one of {', '.join(ARCHS)}")
    setup_logging("plain")
    return check_device(device, dtype)


@bench_app.command("unet", cls=Command, epilog=BENCH_EXAMPLES)
def bench_unet_cmd(
    arch: ArchOpt = "tiny",
    sizes: Annotated[
        str | None, typer.Option(help="Comma-separated sizes, N or WxH \\[default: per architecture].")
    ] = None,
    device: BenchDeviceOpt = "auto",
    dtype: BenchDtypeOpt = "auto",
    repeats: Annotated[int, typer.Option(min=1, help="Timed steps per measurement (median).")] = 3,
    sdpa: Annotated[
        bool, typer.Option("--sdpa/--no-sdpa", help="Also time ordinary attention (SDPA).", metavar="")
    ] = True,
) -> None:
    """Time one UNet step (batch 2, as with guidance) with LinFusion and with ordinary attention."""
    from ..bench.units import bench_unet, parse_size

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
                markup=False,
                highlight=False,
            )

        emit_json(bench_unet(arch, size_list, dev, dt, repeats=repeats, modes=modes, on_result=show))


@bench_app.command("attention", cls=Command, epilog=BENCH_EXAMPLES)
def bench_attention_cmd(
    tokens: Annotated[str, typer.Option(help="Comma-separated token counts.")] = "4096,16384,65536",
    dim: Annotated[int, typer.Option(help="Channels (SD-1.5's top level: 320).")] = 320,
    heads: Annotated[int, typer.Option(help="Heads (SD-1.5: 8).")] = 8,
    device: BenchDeviceOpt = "auto",
    dtype: BenchDtypeOpt = "auto",
    repeats: Annotated[int, typer.Option(min=1)] = 5,
) -> None:
    """Time the LinFusion layer against the straightforward batched-matmul form of the same formula."""
    from ..bench.units import bench_attention

    with boundary():
        dev, dt = _bench_setup(None, device, dtype)
        report = bench_attention(_whole_numbers(tokens, "--tokens"), dim, heads, dev, dt, repeats=repeats)
        for row in report["results"]:
            stderr.print(
                f"N={row['tokens']}: ours {row['ours']['seconds']:.4f} s, straightforward "
                f"{row['straightforward']['seconds']:.4f} s ({row['speedup']}x)",
                markup=False,
                highlight=False,
            )
        emit_json(report)


@bench_app.command("vae", cls=Command, epilog=BENCH_EXAMPLES)
def bench_vae_cmd(
    arch: Annotated[str, typer.Option(help="VAE shape: sd15 (SD-1.x/2.x VAE), sdxl, tiny.")] = "sd15",
    sizes: Annotated[str, typer.Option(help="Comma-separated output sizes, N or WxH.")] = "2048,4096",
    tile: Annotated[int | None, typer.Option(help="Tile side, px \\[default: automatic].")] = None,
    fidelity: Annotated[
        bool, typer.Option("--fidelity", help="Instead: PSNR of tiled vs untiled at --fidelity-size.", **FLAG)
    ] = False,
    fidelity_size: Annotated[int, typer.Option(help="Output side for --fidelity (untiled must fit).")] = 768,
    fidelity_tile: Annotated[int, typer.Option(help="Tile side for --fidelity.")] = 256,
    seeds: Annotated[str, typer.Option(help="Comma-separated seeds for --fidelity.")] = "0",
    diffusers: Annotated[
        bool,
        typer.Option(
            "--diffusers/--no-diffusers", help="Also time diffusers' built-in tiling (1024 px tiles).", metavar=""
        ),
    ] = True,
    device: BenchDeviceOpt = "auto",
    dtype: BenchDtypeOpt = "auto",
    repeats: Annotated[int, typer.Option(min=1)] = 1,
) -> None:
    """Tiled VAE decode/encode against the untiled per-pixel floor and diffusers' tiling; or --fidelity."""
    from ..bench.units import bench_vae, parse_size, vae_fidelity

    with boundary():
        dev, dt = _bench_setup(arch, device, dtype)
        if fidelity:
            report = vae_fidelity(arch, fidelity_size, fidelity_tile, _whole_numbers(seeds, "--seeds"), dev, dt)
            for row in report["results"]:
                stderr.print(
                    f"seed {row['seed']}: decode {row['decode_psnr']} dB (diffusers "
                    f"{row['diffusers_decode_psnr']}), encode {row['encode_psnr']} dB (diffusers "
                    f"{row['diffusers_encode_psnr']})",
                    markup=False,
                    highlight=False,
                )
            emit_json(report)
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
                markup=False,
                highlight=False,
            )
        emit_json(report)


@bench_app.command("png", cls=Command, epilog=BENCH_EXAMPLES)
def bench_png_cmd(
    size: Annotated[str, typer.Option(help="Image size, WxH.")] = "16384x8192",
    repeats: Annotated[int, typer.Option(min=1)] = 3,
    pillow: Annotated[
        bool, typer.Option("--pillow/--no-pillow", help="Also time Pillow's fastest PNG level (slow).", metavar="")
    ] = True,
) -> None:
    """Time writing a big PNG (fsynced) with our encoder and with Pillow."""
    from ..bench.units import bench_png, parse_size

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
            markup=False,
            highlight=False,
        )
        emit_json(report)


@bench_app.command("parallel", cls=Command)
def bench_parallel_cmd(
    arch: ArchOpt = "tiny",
    size: Annotated[str, typer.Option(help="Image size, N or WxH.")] = "1024",
    nproc: Annotated[int, typer.Option(min=2, help="Processes to split the image over.")] = 2,
    threads: Annotated[int, typer.Option(min=1, help="Torch threads per process (the reference gets N x this).")] = 1,
    repeats: Annotated[int, typer.Option(min=1, help="Timed steps (median).")] = 3,
    stages: Annotated[
        bool, typer.Option("--stages", help="Time the whole job per stage, not one UNet step.", **FLAG)
    ] = False,
    steps: Annotated[int, typer.Option(min=1, help="With --stages: the job's steps.")] = 8,
    vae_tile: Annotated[int | None, typer.Option(min=64, help="With --stages: the VAE's tile size, px.")] = None,
    reference_threads: Annotated[
        int | None, typer.Option(min=1, help="Threads of the one-process reference (default: N x --threads).")
    ] = None,
    device: BenchDeviceOpt = "auto",
    dtype: BenchDtypeOpt = "auto",
) -> None:
    """One UNet step split over N processes (gloo on CPUs, NCCL on GPUs) against one process: seconds per step
    and bytes each process sends; with --stages the whole job, per stage: seconds of the UNet steps, the
    hand-off's upscale, VAE encode and decode and their statistics passes. JSON on stdout."""
    from ..bench.parallel import bench_parallel, bench_parallel_stages
    from ..bench.units import parse_size

    with boundary():
        dev, dt = _bench_setup(arch, device, dtype)
        try:
            width, height = parse_size(size)
        except ValueError as exc:
            raise UsageError(f"--size: {exc}") from None
        reference = reference_threads or nproc * threads
        if stages:
            job = {"width": width, "height": height, "steps": steps, "vae_tile": vae_tile, "seed": 0}
            report = bench_parallel_stages(arch, job, nproc, threads, reference, dev, dt)
            _print_stage_times(report, nproc, threads, reference)
            emit_json(report)
            return
        report = bench_parallel(arch, width, height, nproc, threads, repeats, dev, dt)
        stderr.print(
            f"{report['size']} ({arch}): one process x{nproc * threads} threads {report['one_process']['seconds']} s, "
            f"{nproc} processes x{threads} {report['split']['seconds']} s ({report['speedup']}x); sent per step "
            f"{[r['sent_bytes_per_step'] for r in report['split']['ranks']]} bytes",
            markup=False,
            highlight=False,
        )
        emit_json(report)


def _print_stage_times(report: dict[str, Any], nproc: int, threads: int, reference: int) -> None:
    """One line per stage: one process against the split, and the phases that make each."""
    stderr.print(f"one process x{reference} threads against {nproc} processes x{threads}:", markup=False)
    for stage in report["stages"]:
        one, split = stage["one_process"], stage["split"]
        phases = ", ".join(
            f"{name} {one['phases'].get(name, 0.0):.2f}/{split['phases'][name]:.2f}" for name in split["phases"]
        )
        sent = "/".join(f"{b / 2**20:.1f}" for b in stage["sent_bytes_per_rank"] or [])
        cpu = "/".join(f"{c:.1f}" for c in split["cpu_seconds_per_rank"])
        stderr.print(
            f"  {stage['size']}: {one['seconds']:.2f} s / {split['seconds']:.2f} s ({stage['ratio']}x), CPU "
            f"{one['cpu_seconds']:.1f} s / {cpu} s; "
            f"{phases} s; sent {sent} MiB",
            markup=False,
            highlight=False,
        )


@bench_app.command("planner", cls=Command)
def bench_planner_cmd(
    fit: Annotated[
        bool,
        typer.Option(
            "--fit",
            help="Fit the planner's coefficients instead (each architecture's UNet, ControlNet and VAE traced on "
            "the meta device): what engine/memory_model.py's tables hold.",
        ),
    ] = False,
    family: Annotated[
        str | None, typer.Option(help="Only this family's cases: sd1, sd2 or sdxl \\[default: all three].")
    ] = None,
) -> None:
    """The memory planner against the simulator (no GPU, nothing downloaded): every stage of a grid of jobs (three
    families at 16K in three shapes on every memory setting; guidance off, demofusion, a ControlNet, an
    IP-Adapter, a split over 2, 4 and 8 processes), its estimate beside its simulated peak; JSON on stdout."""
    from ..bench.planner import GRID_MODELS, default_grid, grid
    from ..bench.planner import fit as fit_coefficients

    with boundary():
        setup_logging("plain")
        if fit:
            emit_json(fit_coefficients())
            return
        if family is not None and family not in GRID_MODELS:
            raise UsageError(f"--family {family!r}: must be one of {', '.join(GRID_MODELS)}")
        cases = [c for c in default_grid() if family is None or c.model == GRID_MODELS[family]]

        def progress(row: dict[str, Any]) -> None:
            stderr.print(
                f"{row['family']} {row['memory']} {row['aspect']} world {row['world']} {row['refine']} "
                f"{row['adapter'] or '-'} stage {row['stage']} {row['size']}: estimate {row['estimate_gib']} GiB, "
                f"simulated {row['simulated_gib']} GiB ({row['ratio']})",
                markup=False,
                highlight=False,
            )

        emit_json(grid(cases, progress))


@bench_app.command("pipeline", cls=Command, epilog=BENCH_EXAMPLES)
@with_settings(BENCH)
def bench_pipeline_cmd(
    settings: dict[str, Any],
    arch: ArchOpt = "sd15",
    baseline: Annotated[
        bool, typer.Option("--baseline", help="Also run the published recipe as its notebooks build it.", **FLAG)
    ] = False,
    keep: Annotated[Path | None, typer.Option(help="Keep the output image in this folder.")] = None,
    device: BenchDeviceOpt = "auto",
    dtype: BenchDtypeOpt = "auto",
) -> None:
    """The whole generate path with random weights: model load, each stage, file writing; JSON on stdout."""
    from ..bench.pipeline import bench_pipeline

    with boundary():
        flags = flags_layer(settings)
        dev, dt = _bench_setup(arch, device, dtype)
        report = bench_pipeline(arch, flags, dev, dt, out=keep, baseline=baseline)
        stderr.print(
            f"{report['size']} ({arch}, {report['device']}): load {report['seconds']['model_load']} s, "
            f"generate {report['seconds']['generate']} s, write {report['seconds']['write']} s, peak VRAM "
            f"{report['peak_vram_allocated_gib']} GiB",
            markup=False,
            highlight=False,
        )
        for s in report["stages"]:
            stderr.print(
                f"  stage {s['index'] + 1} {s['size']}: {s['seconds']:.2f} s, "
                f"{s['memory_settings']['name']}, VRAM {s['peak_vram_allocated_gib']} GiB",
                markup=False,
                highlight=False,
            )
        if "baseline" in report:
            stderr.print(
                f"published recipe: {report['baseline']['seconds']} s "
                f"({report['speedup_over_baseline']}x slower than ours)",
                markup=False,
                highlight=False,
            )
        emit_json(report)
