"""Run a stage plan: base image, then upscale + img2img refine at each 2x step, tiled VAE, uint8 out.

The model is loaded once (`Engine.load`) and reused by every stage and every job. Nothing leaves the device
between stages: decoded images are upscaled there (bicubic, antialiased) and re-encoded; only the final image
comes back, as uint8, tile by tile. Progress goes out as events; nothing here prints.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from . import memory
from .config import JobSpec
from .errors import NumericalError, OutOfMemoryError, UsageError
from .events import CancelToken, EventSink, Note, StageFinished, StageStarted, StepDone, TilesDone, ignore
from .memory import Meter
from .models import Components, load_components
from .patching import LinFusionPatch, apply_linfusion
from .planning import Plan, StagePlan
from .sampling import StageInputs, denoise, initial_noise, make_scheduler, stage_timesteps
from .text import encode_prompt
from .vae import LATENT_SCALE, TiledVAE, to_uint8

log = logging.getLogger(__name__)

BLACK_LEVEL = 2  # an output whose every pixel is at most this (of 255) is treated as a failed, black image


@dataclass
class StageRecord:
    index: int
    kind: str
    size: str
    strength: float | None
    steps: int
    seconds: float
    usage: dict[str, Any]
    settings: dict[str, Any]
    retried: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "kind": self.kind,
            "size": self.size,
            "strength": self.strength,
            "steps": self.steps,
            **self.usage,
            "memory_settings": self.settings,
            "retried": self.retried,
        }


@dataclass
class GenerateResult:
    image: np.ndarray  # (H, W, 3) uint8
    seed: int
    stages: list[StageRecord]
    seconds: float
    stage_images: list[tuple[StagePlan, np.ndarray]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


class Engine:
    """Loaded components plus the LinFusion patch: load once, generate many."""

    def __init__(
        self,
        comps: Components,
        patch: LinFusionPatch | None,
        device: torch.device,
        dtype: torch.dtype,
        linfusion: str,
        load_seconds: float,
    ) -> None:
        self.comps = comps
        self.patch = patch
        self.device = device
        self.dtype = dtype
        self.linfusion = linfusion
        self.load_seconds = load_seconds

    @classmethod
    def load(
        cls,
        model: str,
        *,
        linfusion: str = "auto",
        vae: str | None = None,
        device: torch.device,
        dtype: torch.dtype,
        allow_pickle: bool = False,
        events: EventSink = ignore,
    ) -> Engine:
        start = time.perf_counter()
        comps = load_components(model, device=device, dtype=dtype, allow_pickle=allow_pickle, vae=vae)
        return cls.from_components(comps, linfusion, device, dtype, events, start)

    @classmethod
    def for_job(
        cls, job: JobSpec, device: torch.device, dtype: torch.dtype, allow_pickle: bool, events: EventSink = ignore
    ) -> Engine:
        """The engine a job asks for: its model, LinFusion weights and VAE."""
        return cls.load(
            job.model,
            linfusion=job.linfusion,
            vae=job.vae,
            device=device,
            dtype=dtype,
            allow_pickle=allow_pickle,
            events=events,
        )

    @classmethod
    def from_components(
        cls,
        comps: Components,
        linfusion: str,
        device: torch.device,
        dtype: torch.dtype,
        events: EventSink = ignore,
        start: float | None = None,
    ) -> Engine:
        """An engine around components already on the device (benchmarks build random ones)."""
        start = time.perf_counter() if start is None else start
        patch = None
        if linfusion != "none":
            patch = apply_linfusion(comps.unet, linfusion)
            events(
                Note(
                    "info",
                    f"LinFusion: {len(patch.layers)} self-attention layers patched "
                    f"({comps.family_label}, weights: {patch.source})",
                )
            )
        else:
            events(Note("info", "LinFusion off: ordinary attention (quadratic in pixels)"))
        return cls(comps, patch, device, dtype, linfusion, time.perf_counter() - start)

    @property
    def linfusion_source(self) -> str:
        return self.patch.source if self.patch else "none"

    # --------------------------------------------------------------------------------------------------------
    def generate(
        self,
        job: JobSpec,
        plan: Plan,
        seed: int,
        *,
        events: EventSink = ignore,
        cancel: CancelToken | None = None,
        init_image: np.ndarray | None = None,
        keep_stages: bool = False,
    ) -> GenerateResult:
        """Run every stage of `plan` for one job and return the final image as uint8."""
        cancel = cancel or CancelToken()
        start = time.perf_counter()
        comps, device = self.comps, self.device
        if plan.from_image and init_image is None:
            raise UsageError("this plan upscales an input image, but none was given")

        # 1. Text conditioning, once for all stages. With --low-vram the text encoders sit in CPU memory
        #    while the UNet and VAE work (SDXL's two encoders hold 1.6 GB in fp16).
        memory.place_text_encoders(comps.text_encoders, device, on_device=True)
        cond = encode_prompt(comps, job.prompt, job.negative, job.guidance, device)
        if job.low_vram:
            memory.place_text_encoders(comps.text_encoders, device, on_device=False)
        for warning in cond.warnings:
            events(Note("warning", warning))

        vae_tiler = TiledVAE(comps.vae, tile=job.vae_tile)
        image: torch.Tensor | None = (
            None if init_image is None else _to_device_image(init_image, device, self._vae_dtype())
        )
        records: list[StageRecord] = []
        stage_images: list[tuple[StagePlan, np.ndarray]] = []
        final: np.ndarray | None = None
        ladder = memory.settings_ladder(job.low_vram, job.max_vram)
        budget = memory.device_budget(device, job.max_vram)
        weights = memory.module_bytes(comps.unet, comps.vae, *comps.text_encoders)
        for stage in plan.stages:
            cancel.check()
            last = stage is plan.stages[-1]
            chosen, _ = memory.choose_settings(
                ladder,
                budget,
                width=stage.width,
                height=stage.height,
                top_width=int(comps.unet.config["block_out_channels"][0]),
                dtype_bytes=torch.finfo(self.dtype).bits // 8,
                weights=weights,
                guidance=job.guidance > 1.0,
            )
            level, retried = ladder.index(chosen), None
            while True:
                settings = ladder[level]
                events(
                    StageStarted(
                        stage.index,
                        len(plan.stages),
                        stage.kind,
                        stage.size_text,
                        stage.steps,
                        stage.strength,
                        settings.as_dict(),
                    )
                )
                try:
                    with Meter(device) as meter:
                        memory.maybe_inject_oom(stage.index, first_attempt=retried is None)
                        image, out = self._run_stage(
                            stage, plan, job, seed, cond, image, vae_tiler, settings, last, events, cancel
                        )
                    break
                except torch.OutOfMemoryError as exc:
                    memory.free_cached(device)
                    if retried is not None or level + 1 >= len(ladder):
                        raise OutOfMemoryError(
                            f"stage {stage.index + 1} ({stage.size_text}) ran out of device memory even with the "
                            f"most frugal settings ({settings.describe()}); try --low-vram, a smaller --size, or "
                            "a GPU with more memory"
                        ) from exc
                    level = len(ladder) - 1 if job.low_vram else level + 1
                    retried = f"out of memory with {settings.describe()}; retried with {ladder[level].describe()}"
                    events(Note("warning", f"stage {stage.index + 1}: {retried}"))
            if out is not None:
                final = out
            if keep_stages and not last and image is not None:
                stage_images.append((stage, to_uint8(image)[0].permute(1, 2, 0).cpu().numpy()))
            record = StageRecord(
                stage.index,
                stage.kind,
                stage.size_text,
                stage.strength,
                stage.steps,
                meter.usage.seconds,
                meter.usage.as_dict(),
                settings.as_dict(),
                retried,
            )
            records.append(record)
            events(StageFinished(stage.index, meter.usage.seconds, meter.usage.as_dict()))
        assert final is not None
        if vae_tiler.fp32_retries:
            events(
                Note(
                    "warning",
                    f"VAE overflowed in {self._vae_dtype()} {vae_tiler.fp32_retries} time(s); "
                    "those tiles were redone in fp32",
                )
            )
        _check_image(final)
        return GenerateResult(final, seed, records, time.perf_counter() - start, stage_images, cond.warnings)

    def _vae_dtype(self) -> torch.dtype:
        return next(self.comps.vae.parameters()).dtype

    def _run_stage(
        self,
        stage: StagePlan,
        plan: Plan,
        job: JobSpec,
        seed: int,
        cond: Any,
        image: torch.Tensor | None,
        vae_tiler: TiledVAE,
        settings: memory.MemorySettings,
        last: bool,
        events: EventSink,
        cancel: CancelToken,
    ) -> tuple[torch.Tensor | None, np.ndarray | None]:
        comps, device = self.comps, self.device
        memory.apply_settings(comps.unet, settings)
        vae_tiler.tile = settings.vae_tile or job.vae_tile
        vae_tiler.memory_budget = settings.vae_budget

        def on_tile(kind: str, done: int, total: int) -> None:
            cancel.check()
            events(TilesDone(stage.index, kind, done, total))

        vae_tiler.on_tile = on_tile
        scheduler = make_scheduler(job.scheduler, comps.scheduler_config)
        latent_shape = (1, 4, stage.height // LATENT_SCALE, stage.width // LATENT_SCALE)
        generator = torch.Generator("cpu").manual_seed(seed + stage.index)

        # 2. Starting latents: pure noise (base), or the upscaled previous image encoded and re-noised.
        if stage.strength is None:
            timesteps = stage_timesteps(scheduler, plan.schedule_steps, stage.steps, device, img2img=False)
            latents = initial_noise(latent_shape, seed, device) * scheduler.init_noise_sigma
        else:
            assert image is not None
            image = upscale(image, stage.width, stage.height)
            latents = vae_tiler.encode(image).float()
            del image
            timesteps = stage_timesteps(scheduler, plan.schedule_steps, stage.steps, device, img2img=True)
            if stage.steps > 0:
                noise = initial_noise(latent_shape, seed + stage.index, device)
                latents = scheduler.add_noise(latents, noise, timesteps[:1])
            else:
                timesteps = timesteps[:0]

        # 3. Denoise.
        inputs = StageInputs(cond, job.guidance, (stage.width, stage.height), cfg_split=settings.cfg_split)

        def on_step(step: int, total: int) -> None:
            events(StepDone(stage.index, step, total))
            cancel.check()

        latents = denoise(comps.unet, scheduler, latents, timesteps, inputs, generator, on_step)
        if not bool(torch.isfinite(latents).all()):
            raise NumericalError(f"stage {stage.index + 1} produced NaN/inf latents (try --dtype fp32 or bf16)")

        # 4. Decode: back to a device image for the next stage, or straight to CPU uint8 for the last.
        latents = latents.to(self._vae_dtype())
        if last:
            return None, vae_tiler.decode_to_uint8(latents).numpy()
        return vae_tiler.decode(latents), None


def upscale(image: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Bicubic resize on the device (antialiased, so it also works downwards), clamped to [-1, 1]."""
    if image.shape[-1] == width and image.shape[-2] == height:
        return image
    work = image if image.device.type == "cuda" else image.float()
    out = F.interpolate(work, size=(height, width), mode="bicubic", align_corners=False, antialias=True)
    return out.clamp_(-1, 1).to(image.dtype)


def _to_device_image(array: np.ndarray, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, H, W) in [-1, 1] on the device."""
    tensor = torch.from_numpy(np.ascontiguousarray(array)).to(device)
    return (tensor.permute(2, 0, 1)[None].to(dtype) / 127.5 - 1.0).to(dtype)


def _check_image(image: np.ndarray) -> None:
    if int(image.max()) <= BLACK_LEVEL:
        raise NumericalError(
            "the output is all black (a NaN/overflow in the model); try --dtype fp32, or for SDXL an fp16-fixed "
            "VAE via --vae"
        )
