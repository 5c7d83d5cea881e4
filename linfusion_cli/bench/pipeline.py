"""`linfusion bench pipeline`: the whole generate path with random weights, and the published recipe built
the way its notebooks build it (diffusers pipelines per stage, PIL resizes, diffusers' VAE tiling) as a
baseline in the same run."""

from __future__ import annotations

import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import diffusers
import torch
from PIL import Image

from ..base.plan import Plan, StagePlan
from ..core.jobs import resolve_job
from ..core.prepare import RunOptions, prepare
from ..core.run import build_metadata, save_outputs
from ..engine import memory
from ..engine.memory_plan import settings_ladder
from ..engine.meter import Meter
from ..engine.pipeline import Engine
from ..engine.schedulers import make_scheduler
from ..models.adapters import engine_spec, preflight
from ..models.devices import free_cached
from ..models.loading import build_random
from .measure import environment

BENCH_PROMPT = "a lighthouse at dusk, highly detailed"
BASELINE_VAE_TILE = 2048  # the notebooks' VAE tiling from 4K up
BASELINE_TILING_FROM = 4096


def bench_pipeline(
    arch: str,
    flags: dict[str, Any],
    device: torch.device,
    dtype: torch.dtype,
    out: Path | None = None,
    baseline: bool = False,
) -> dict[str, Any]:
    """Model load, every stage (seconds, peak VRAM, memory settings) and the file write, listed separately."""
    job = resolve_job({"prompt": BENCH_PROMPT, **flags})
    with Meter(device) as load:
        comps = build_random(arch, device=device, dtype=dtype)
        preflight(job, comps.family)  # the adapters' inputs (control images, one IP image) as a run checks them
        engine = Engine.from_components(comps, "random", device, dtype)
        # the job's adapters on the random-weight model (tiny ones are random too), as a run would load them
        engine.use(replace(engine.spec, adapters=engine_spec(job).adapters))
    with tempfile.TemporaryDirectory() as scratch:
        folder = out or Path(scratch)
        folder.mkdir(parents=True, exist_ok=True)
        prep = prepare(job, RunOptions(out=folder, overwrite=True), native=comps.native_size, seed=0)
        result = engine.run_plan(job, prep.plan, prep.seed)
        meta = build_metadata(prep, engine, result)
        start = time.perf_counter()
        assert result.image is not None  # one process: it has the image
        save_outputs(prep, result.image, meta)
        write_seconds = time.perf_counter() - start
    stages = [r.as_dict() for r in result.stages]
    report: dict[str, Any] = {
        "bench": "pipeline",
        "arch": arch,
        "size": f"{prep.target.width}x{prep.target.height}",
        "preset": job.preset,
        "scheduler": job.scheduler,
        "steps": job.steps,
        "low_vram": job.low_vram,
        "max_vram_gib": job.max_vram,
        "refine": job.refine,
        "size_cond": job.size_cond,
        "adapters": meta["adapters"],
        **environment(device, dtype),
        "seconds": {  # the sidecar's layout; generate: prompt to decoded uint8 image
            "model_load": round(load.usage.seconds, 3),
            "generate": round(result.seconds, 3),
            "write": round(write_seconds, 3),
        },
        "peak_vram_allocated_gib": _max(stages, "peak_vram_allocated_gib"),
        "peak_vram_reserved_gib": _max(stages, "peak_vram_reserved_gib"),
        "stages": stages,
    }
    del result, engine
    free_cached(device)
    if baseline:
        report["baseline"] = published_recipe(comps, job, prep.plan, device)
        report["speedup_over_baseline"] = round(report["baseline"]["seconds"] / report["seconds"]["generate"], 2)
    return report


def _max(stages: list[dict[str, Any]], key: str) -> float | None:
    values = [s[key] for s in stages if s.get(key) is not None]
    return max(values) if values else None


def published_recipe(comps: Any, job: Any, plan: Plan, device: torch.device) -> dict[str, Any]:
    """The reference: diffusers txt2img + img2img pipelines per stage, PIL resizes between stages, diffusers'
    VAE tiling (2048 px tiles) from 4K up, no feed-forward chunking; same components, same LinFusion layers."""
    pipes = baseline_pipelines(comps, job)
    memory.apply_settings(comps.unet, settings_ladder()[0])  # the notebooks chunk nothing
    stages = []
    generator = torch.Generator("cpu").manual_seed(0)
    image: Any = None
    total = time.perf_counter()
    for stage in plan.stages:
        use_tiling = baseline_vae_tiling(comps.vae, stage)
        with Meter(device) as meter:
            image = baseline_stage(pipes, job, plan, stage, image, generator)
        stages.append({"size": stage.size_text, "vae_tiling": use_tiling, **meter.usage.as_dict()})
    comps.vae.disable_tiling()
    return {
        "seconds": round(time.perf_counter() - total, 3),
        "stages": stages,
        "peak_vram_allocated_gib": _max(stages, "peak_vram_allocated_gib"),
    }


def baseline_pipelines(comps: Any, job: Any) -> tuple[Any, Any]:
    """diffusers' (txt2img, img2img) pipelines of the family over our components, progress bars off."""
    scheduler = make_scheduler(job.scheduler, comps.scheduler_config)
    parts: dict[str, Any] = {
        "vae": comps.vae,
        "unet": comps.unet,
        "scheduler": scheduler,
        "text_encoder": comps.text_encoders[0],
        "tokenizer": comps.tokenizers[0],
    }
    txt2img: Any
    img2img: Any
    if comps.is_sdxl:
        parts.update(text_encoder_2=comps.text_encoders[1], tokenizer_2=comps.tokenizers[1])
        txt2img = diffusers.StableDiffusionXLPipeline(**parts)
        img2img = diffusers.StableDiffusionXLImg2ImgPipeline(**parts)
    else:
        parts.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        txt2img = diffusers.StableDiffusionPipeline(**parts)
        img2img = diffusers.StableDiffusionImg2ImgPipeline(**parts)
    for pipe in (txt2img, img2img):
        pipe.set_progress_bar_config(disable=True)
    return txt2img, img2img


def baseline_vae_tiling(vae: Any, stage: StagePlan) -> bool:
    """The notebooks' VAE tiling for a stage: BASELINE_VAE_TILE px tiles from BASELINE_TILING_FROM px up."""
    use_tiling = max(stage.width, stage.height) >= BASELINE_TILING_FROM
    if use_tiling:
        vae.enable_tiling()
        vae.tile_sample_min_size = BASELINE_VAE_TILE
        vae.tile_latent_min_size = BASELINE_VAE_TILE // 8
    else:
        vae.disable_tiling()
    return use_tiling


def baseline_stage(
    pipes: tuple[Any, Any], job: Any, plan: Plan, stage: StagePlan, image: Any, generator: torch.Generator
) -> Any:
    """One stage the notebooks' way: txt2img for the first; a PIL Lanczos resize of `image` and img2img after."""
    txt2img, img2img = pipes
    if stage.strength is None:
        return txt2img(
            job.prompt,
            negative_prompt=job.negative,
            height=stage.height,
            width=stage.width,
            num_inference_steps=plan.schedule_steps,
            guidance_scale=job.guidance,
            generator=generator,
        ).images[0]
    image = image.resize((stage.width, stage.height), Image.Resampling.LANCZOS)
    return img2img(
        job.prompt,
        negative_prompt=job.negative,
        image=image,
        strength=stage.strength,
        num_inference_steps=plan.schedule_steps,
        guidance_scale=job.guidance,
        generator=generator,
    ).images[0]
