"""`linfusion bench parallel`: one UNet step (batch 2, as with guidance) on an image split over N processes,
against one process with all their threads; time per step and what each process sent and received. With
`--stages`, the whole job instead: per stage the seconds of the UNet steps, the hand-off's upscale, the VAE's
encode and decode and their statistics passes, split against one process, and the bytes each process sent.

The processes are started with torch's launcher (as `--gpus` does), each with `threads` torch threads; the
one-process reference runs here with `nproc x threads` threads, so both use the same cores.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ..core.jobs import resolve_job
from ..core.prepare import RunOptions, prepare
from ..core.run import build_metadata, save_outputs
from ..engine.parallel import Bands, downsampling, joined, split_image, unet_comm_plan
from ..engine.parallel.launch import launch_here
from ..engine.pipeline import Engine
from ..linfusion.patching import apply_linfusion
from ..models.loading import build_random
from .measure import environment
from .pipeline import BENCH_PROMPT

TEXT_TOKENS = 77
WARMUP = 1


def _unet_inputs(comps: Any, width: int, height: int, device: torch.device) -> tuple[Any, ...]:
    """Seeded latents (1, 4, h, w) for batch 2, a timestep, text states and SDXL's added conditioning."""
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, height // 8, width // 8, generator=generator).to(device)
    width_text = int(comps.unet.config["cross_attention_dim"])
    text = torch.randn(2, TEXT_TOKENS, width_text, generator=generator).to(device)
    added = None
    if comps.unet.config.get("addition_embed_type") == "text_time":
        pooled = int(comps.text_encoders[-1].config.projection_dim)
        added = {
            "text_embeds": torch.randn(2, pooled, generator=generator).to(device),
            "time_ids": torch.tensor([[height, width, 0, 0, height, width]] * 2, dtype=torch.float32).to(device),
        }
    return latents, torch.tensor(500, device=device), text, added


def _time_steps(unet: Any, inputs: tuple[Any, ...], repeats: int, device: torch.device) -> list[float]:
    latents, t, text, added = inputs
    times = []
    with torch.no_grad():
        for i in range(WARMUP + repeats):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            unet(latents.to(unet.dtype), t, encoder_hidden_states=text.to(unet.dtype), added_cond_kwargs=added)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i >= WARMUP:
                times.append(time.perf_counter() - start)
    return times


def split_step(arch: str, width: int, height: int, repeats: int, threads: int, dtype_name: str) -> dict[str, Any]:
    """In a launched process: its band of one UNet step, timed, with what it sent (the launcher collects it)."""
    torch.set_num_threads(threads)
    with joined() as comm:
        device = comm.device
        dtype = getattr(torch, dtype_name)
        comps = build_random(arch, device=device, dtype=dtype)
        apply_linfusion(comps.unet, "random")
        multiple = downsampling(list(comps.unet.config["block_out_channels"]))
        comm.bands = Bands.split(height // 8, comm.world, multiple, width // 8)
        latents, t, text, added = _unet_inputs(comps, width, height, device)
        band = comm.band(latents).contiguous()
        with split_image(comm, comps.unet):
            comm.barrier()
            times = _time_steps(comps.unet, (band, t, text, added), repeats, device)
        sent, received = sum(comm.stats.sent.values()), sum(comm.stats.received.values())
        steps = WARMUP + repeats
        return {
            "rank": comm.rank,
            "band_rows": comm.bands.heights()[comm.rank],
            "seconds": round(statistics.median(times), 4),
            "sent_bytes_per_step": sent // steps,
            "received_bytes_per_step": received // steps,
            "comm_seconds_per_step": round(comm.stats.seconds / steps, 4),
            "calls_per_step": {k: v // steps for k, v in comm.stats.calls.items()},
        }


def bench_parallel(
    arch: str, width: int, height: int, nproc: int, threads: int, repeats: int, device: torch.device, dtype: torch.dtype
) -> dict[str, Any]:
    """One process with nproc x threads threads, then nproc launched processes; both on this machine."""
    torch.set_num_threads(nproc * threads)
    comps = build_random(arch, device=device, dtype=dtype)
    apply_linfusion(comps.unet, "random")
    one = _time_steps(comps.unet, _unet_inputs(comps, width, height, device), repeats, device)
    plan = unet_comm_plan(comps.unet.config, height // 8, width // 8, nproc, batch=2, dtype_bytes=dtype.itemsize)
    del comps
    dtype_name = str(dtype).removeprefix("torch.")
    ranks = launch_here(nproc, split_step, arch, width, height, repeats, threads, dtype_name)
    per_rank = [ranks[r] for r in sorted(ranks)]
    split_seconds = max(r["seconds"] for r in per_rank)
    return {
        "bench": "parallel",
        "arch": arch,
        "size": f"{width}x{height}",
        "nproc": nproc,
        "threads_per_process": threads,
        **environment(device, dtype),
        "one_process": {"threads": nproc * threads, "seconds": round(statistics.median(one), 4)},
        "split": {"seconds": split_seconds, "ranks": per_rank},
        "speedup": round(statistics.median(one) / split_seconds, 3),
        "planned": plan.as_dict(),  # the communication model of parallel/plan.py, for the same split
    }


def job_stages(arch: str, flags: dict[str, Any], threads: int, dtype_name: str, device_type: str) -> dict[str, Any]:
    """One job with random weights (`flags`: its size, steps, VAE tile...) in this process, split over the
    launcher's processes when it started several: each stage's seconds, its phases (host.Host.phase) and the bytes
    this process sent in it, and the seconds of writing the image (a split image's rows streamed to the first)."""
    torch.set_num_threads(threads)
    dtype = getattr(torch, dtype_name)
    with joined(device=torch.device(device_type)) as comm, tempfile.TemporaryDirectory() as scratch:
        job = resolve_job({"prompt": BENCH_PROMPT, **flags})
        comps = build_random(arch, device=comm.device, dtype=dtype)
        engine = Engine.from_components(comps, "random", comm.device, dtype)
        prep = prepare(job, RunOptions(out=Path(scratch), overwrite=True), native=comps.native_size, seed=0)
        result = engine.run_plan(job, prep.plan, prep.seed, group=comm if comm.world > 1 else None)
        start = time.perf_counter()
        if result.rows is not None and not result.rows.takes:
            result.rows.deliver()
        else:
            save_outputs(prep, result.rows or result.image, build_metadata(prep, engine, result))  # type: ignore[arg-type]
        write = time.perf_counter() - start
    stages = [r.as_dict() for r in result.stages]
    return {
        "rank": comm.rank,
        "stages": [
            {k: s.get(k) for k in ("size", "seconds", "cpu_seconds", "phases", "sent_bytes_per_rank")} for s in stages
        ],
        "write_seconds": round(write, 3),
    }


def bench_parallel_stages(
    arch: str,
    flags: dict[str, Any],
    nproc: int,
    threads: int,
    reference_threads: int,
    device: torch.device,
    dtype: torch.dtype,
) -> dict[str, Any]:
    """The whole job, one process (`reference_threads` threads, here) against `nproc` launched processes: per
    stage the seconds of each (the slowest process's), its phases and what each process sent."""
    dtype_name = str(dtype).removeprefix("torch.")
    one = job_stages(arch, flags, reference_threads, dtype_name, device.type)
    ranks = launch_here(nproc, job_stages, arch, flags, threads, dtype_name, device.type)
    per_rank = [ranks[r] for r in sorted(ranks)]
    stages = []
    for index, whole in enumerate(one["stages"]):
        split = [r["stages"][index] for r in per_rank]
        names = sorted({name for s in split for name in s["phases"]} | set(whole["phases"]))
        seconds = max(s["seconds"] for s in split)
        stages.append(
            {
                "size": whole["size"],
                "one_process": {
                    "seconds": round(whole["seconds"], 3),
                    "cpu_seconds": whole["cpu_seconds"],
                    "phases": whole["phases"],
                },
                "split": {
                    "seconds": round(seconds, 3),
                    "cpu_seconds_per_rank": [s["cpu_seconds"] for s in split],
                    "phases": {n: max(s["phases"].get(n, 0.0) for s in split) for n in names},  # the slowest's
                },
                "ratio": round(seconds / whole["seconds"], 3),
                "sent_bytes_per_rank": split[0]["sent_bytes_per_rank"],
            }
        )
    return {
        "bench": "parallel",
        "arch": arch,
        "job": flags,
        "nproc": nproc,
        "threads_per_process": threads,
        **environment(device, dtype),
        "one_process": {"threads": reference_threads, "write_seconds": one["write_seconds"]},
        "split": {"write_seconds": max(r["write_seconds"] for r in per_rank)},
        "stages": stages,
    }
