"""Run a stage plan: base image, then upscale + img2img refine at each 2x step, tiled VAE, uint8 out.

The model is loaded once (`Engine.load`) and reused by every stage and every job. Nothing leaves the device
between stages: decoded images are upscaled there (bicubic, antialiased) and re-encoded; only the final image
comes back, as uint8, tile by tile. Progress goes out as events; nothing here prints.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..base.errors import NumericalError, OutOfMemoryError, UsageError
from ..base.events import (
    CancelToken,
    EventSink,
    Note,
    StageFinished,
    StageStarted,
    StepDone,
    TilesDone,
    Working,
    ignore,
)
from ..base.plan import Plan, StagePlan
from ..base.text import plural
from ..core.config import EngineSpec, JobSpec
from ..linfusion.patching import LinFusionPatch, apply_linfusion
from ..models.adapters import ADAPTER_KINDS, Adapter, load_adapter
from ..models.controlnet import activation_channels
from ..models.loading import Components, load_components
from . import memory
from .memory import Meter
from .refine import DemoFusionGuide, DemoFusionParams, latent_stats, rematch
from .sampling import StageInputs, UNetExtra, denoise, initial_noise, make_scheduler, stage_timesteps
from .text import Conditioning, encode_prompt
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
    stages: list[StageRecord]
    seconds: float
    stage_images: list[tuple[StagePlan, np.ndarray]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


class Engine:
    """Loaded components, the LinFusion patch and the adapters a spec asks for: load once, generate many."""

    def __init__(
        self,
        comps: Components,
        patch: LinFusionPatch | None,
        device: torch.device,
        dtype: torch.dtype,
        load_seconds: float,
        spec: EngineSpec | None = None,
    ) -> None:
        self.comps = comps
        self.patch = patch
        self.device = device
        self.dtype = dtype
        self.load_seconds = load_seconds
        self.spec = (spec or EngineSpec(comps.model_id)).base()  # adapters join it in `use`
        self.adapters: list[Adapter] = []
        self._fp32_vae_copy: torch.nn.Module | None = None

    @classmethod
    def load(
        cls,
        spec: EngineSpec,
        *,
        device: torch.device,
        dtype: torch.dtype,
        allow_pickle: bool = False,
        events: EventSink = ignore,
    ) -> Engine:
        """Load the spec's model (its VAE, LinFusion weights), then its adapters."""
        start = time.perf_counter()
        comps = load_components(spec.model, device=device, dtype=dtype, allow_pickle=allow_pickle, vae=spec.vae)
        engine = cls.from_components(comps, spec.linfusion, device, dtype, events, start, spec=spec)
        engine.use(spec, events)
        return engine

    @classmethod
    def for_job(
        cls, job: JobSpec, device: torch.device, dtype: torch.dtype, allow_pickle: bool, events: EventSink = ignore
    ) -> Engine:
        """The engine a job asks for: its model, LinFusion weights, VAE and adapters."""
        events(Working(f"loading {job.model}"))
        return cls.load(EngineSpec.of(job), device=device, dtype=dtype, allow_pickle=allow_pickle, events=events)

    @classmethod
    def from_components(
        cls,
        comps: Components,
        linfusion: str,
        device: torch.device,
        dtype: torch.dtype,
        events: EventSink = ignore,
        start: float | None = None,
        spec: EngineSpec | None = None,
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
        comps.linfusion = patch
        spec = spec or EngineSpec(comps.model_id, linfusion)
        return cls(comps, patch, device, dtype, time.perf_counter() - start, spec)

    def can_serve(self, spec: EngineSpec) -> bool:
        """Whether this engine's loaded model is the one `spec` asks for (adapters aside)."""
        return self.spec.base() == spec.base()

    def use(self, spec: EngineSpec, events: EventSink = ignore) -> None:
        """Switch to the adapters `spec` asks for on the loaded model, without reloading it. Adapters are
        stacked: the ones after the first difference come off last-in first-out (so each restores exactly what
        it found), then the rest of the spec's go on in order."""
        if not self.can_serve(spec):
            raise ValueError(f"this engine holds {self.spec.model}, not {spec.model}")
        wanted = [(kind, ref) for kind in ADAPTER_KINDS for ref in getattr(spec, kind)]
        keep = 0
        while keep < min(len(wanted), len(self.adapters)) and (
            (self.adapters[keep].kind, self.adapters[keep].ref) == wanted[keep]
        ):
            keep += 1
        for adapter in reversed(self.adapters[keep:]):
            adapter.remove()
            events(Note("info", f"{adapter.kind[:-1]} removed: {adapter.ref}"))
        del self.adapters[keep:]
        for kind, ref in wanted[keep:]:
            adapter = load_adapter(kind, self.comps, ref)
            self.adapters.append(adapter)
            events(Note("info", f"{kind[:-1]} loaded: {_describe_line(adapter)}"))
        self.spec = spec

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
        start = time.perf_counter()
        if plan.from_image and init_image is None:
            raise UsageError("this plan upscales an input image, but none was given")
        cond = self._conditioning(job, events)
        for adapter in self.adapters:
            adapter.begin_job(job, self.device)
        base_width = plan.stages[0].width if init_image is None else init_image.shape[1]
        run = _JobRun(job, plan, seed, cond, self.memory_planner(job), events, cancel or CancelToken(), base_width)
        image = None if init_image is None else _to_device_image(init_image, self.device, self._vae_dtype())
        records: list[StageRecord] = []
        stage_images: list[tuple[StagePlan, np.ndarray]] = []
        final: np.ndarray | None = None
        for stage in plan.stages:
            run.cancel.check()
            image, out, record = self._stage_with_fallback(run, stage, image)
            records.append(record)
            if out is not None:
                final = out
            elif keep_stages and image is not None:
                stage_images.append((stage, to_uint8(image)[0].permute(1, 2, 0).cpu().numpy()))
        if final is None:  # the last stage always decodes to uint8; an empty plan is a planner bug
            raise RuntimeError("the plan has no stages")
        if run.fp32_retries:
            events(
                Note(
                    "warning",
                    f"VAE overflowed in {self._vae_dtype()} {plural(run.fp32_retries, 'time')}; "
                    "those tiles were redone in fp32",
                )
            )
        _check_image(final)
        return GenerateResult(final, records, time.perf_counter() - start, stage_images, run.cond.warnings)

    def memory_planner(self, job: JobSpec) -> memory.MemoryPlanner:
        """The memory settings chooser for a job on this engine (`plan` builds the same from the family)."""
        return memory.MemoryPlanner.for_job(
            low_vram=job.low_vram,
            max_vram=job.max_vram,
            guidance=job.guidance,
            device=self.device,
            top_width=int(self.comps.unet.config["block_out_channels"][0]),
            dtype=self.dtype,
            weights=memory.module_bytes(
                self.comps.unet, self.comps.vae, *self.comps.text_encoders, *self._adapter_modules()
            ),
            refine=job.refine,
            control_channels=activation_channels(
                self.comps.unet.config, sum(adapter.kind == "controlnets" for adapter in self.adapters)
            ),
        )

    def _conditioning(self, job: JobSpec, events: EventSink) -> Conditioning:
        """Text conditioning, once for all stages. With --low-vram the text encoders sit in CPU memory while
        the UNet and VAE work (SDXL's two encoders hold 1.6 GB in fp16)."""
        encoders = self.comps.text_encoders
        memory.place_text_encoders(encoders, self.device, on_device=True)
        cond = encode_prompt(self.comps, job.prompt, job.negative, job.guidance, self.device)
        if job.low_vram:
            memory.place_text_encoders(encoders, self.device, on_device=False)
        for note in cond.notes:
            events(Note("info", note))
        for warning in cond.warnings:
            events(Note("warning", warning))
        return cond

    def _stage_with_fallback(
        self, run: _JobRun, stage: StagePlan, image: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, np.ndarray | None, StageRecord]:
        """Run a stage with the settings the planner picks; out of memory, free what is cached and retry once
        with the next more frugal settings. A second failure is an OutOfMemoryError naming the stage."""
        ladder, level, retried = run.planner.ladder, run.planner.choose(stage.width, stage.height).level, None
        while True:
            settings = ladder[level]
            run.events(
                StageStarted(
                    stage.index,
                    len(run.plan.stages),
                    stage.kind,
                    stage.size_text,
                    stage.steps,
                    stage.strength,
                    settings.as_dict(),
                )
            )
            try:
                with Meter(self.device) as meter:
                    memory.maybe_inject_oom(stage.index, first_attempt=retried is None)
                    image, out = self._run_stage(run, stage, image, settings)
                break
            except torch.OutOfMemoryError as exc:
                memory.free_cached(self.device)
                if retried is not None or level + 1 >= len(ladder):
                    raise OutOfMemoryError(
                        f"stage {stage.index + 1} ({stage.size_text}) ran out of device memory even with the "
                        f"most frugal settings ({settings.describe()}); try --low-vram, a smaller --size, or "
                        "a GPU with more memory"
                    ) from exc
                level += 1
                retried = f"out of memory with {settings.describe()}; retried with {ladder[level].describe()}"
                run.events(Note("warning", f"stage {stage.index + 1}: {retried}"))
        usage = meter.usage
        run.events(StageFinished(stage.index, usage.seconds, usage.as_dict()))
        record = StageRecord(
            stage.index,
            stage.kind,
            stage.size_text,
            stage.strength,
            stage.steps,
            usage.seconds,
            usage.as_dict(),
            settings.as_dict(),
            retried,
        )
        return image, out, record

    def _stage_extras(self, stage: StagePlan, control: torch.Tensor | None) -> tuple[UNetExtra, ...]:
        extras = (adapter.stage_extra(stage, control) for adapter in self.adapters)
        return tuple(extra for extra in extras if extra is not None)

    def _adapter_modules(self) -> list[torch.nn.Module]:
        """Models adapters bring (a ControlNet), chunked like the UNet."""
        return [module for adapter in self.adapters for module in getattr(adapter, "modules", ())]

    def _vae_dtype(self) -> torch.dtype:
        return next(self.comps.vae.parameters()).dtype

    def _fp32_vae(self) -> torch.nn.Module:
        """One fp32 copy of the VAE for tiles that overflow in half precision, made on first need."""
        if self._fp32_vae_copy is None:
            self._fp32_vae_copy = copy.deepcopy(self.comps.vae).float()
        return self._fp32_vae_copy

    def _tiler(self, run: _JobRun, stage: StagePlan, settings: memory.MemorySettings) -> TiledVAE:
        """This stage's tiled VAE: its tile size and memory budget, progress as TilesDone events."""

        def on_tile(kind: str, done: int, total: int) -> None:
            run.cancel.check()
            run.events(TilesDone(stage.index, kind, done, total))

        return TiledVAE(
            self.comps.vae,
            tile=settings.vae_tile or run.job.vae_tile,
            on_tile=on_tile,
            memory_budget=settings.vae_budget,
            fp32_vae=self._fp32_vae,
        )

    def _run_stage(
        self, run: _JobRun, stage: StagePlan, image: torch.Tensor | None, settings: memory.MemorySettings
    ) -> tuple[torch.Tensor | None, np.ndarray | None]:
        """One stage: (upscaled, encoded, re-noised) latents, denoised, then decoded. Returns the device image
        for the next stage, or for the last stage the CPU uint8 image."""
        comps, device, job, seed = self.comps, self.device, run.job, run.seed
        memory.apply_settings(comps.unet, settings, *self._adapter_modules())
        tiler = self._tiler(run, stage, settings)
        scheduler = make_scheduler(job.scheduler, comps.scheduler_config)
        latent_shape = (1, 4, stage.height // LATENT_SCALE, stage.width // LATENT_SCALE)
        generator = torch.Generator("cpu").manual_seed(seed + stage.index)
        try:
            # 1. Starting latents: pure noise (base), or the upscaled previous image encoded and re-noised.
            guide: DemoFusionGuide | None = None
            extras: tuple[UNetExtra, ...] = ()
            if stage.strength is None:
                extras = self._stage_extras(stage, None)
                timesteps = stage_timesteps(scheduler, run.plan.schedule_steps, stage.steps, device, img2img=False)
                latents = initial_noise(latent_shape, seed, device) * scheduler.init_noise_sigma
            else:
                if image is None:
                    raise RuntimeError(f"refine stage {stage.index} has no image to start from")
                image = upscale(image, stage.width, stage.height)
                extras = self._stage_extras(stage, image)  # a tile ControlNet conditions on the upscaled image
                encoded = tiler.encode(image).float()
                del image
                if run.plan.refine == "demofusion" and run.anchor is None:
                    run.anchor = latent_stats(encoded)  # upscaling an input: its statistics are the anchor
                timesteps = stage_timesteps(scheduler, run.plan.schedule_steps, stage.steps, device, img2img=True)
                latents = encoded
                if stage.steps > 0:
                    noise = initial_noise(latent_shape, seed + stage.index, device)
                    latents = scheduler.add_noise(encoded, noise, timesteps[:1])
                    if run.plan.refine == "demofusion":
                        guide = DemoFusionGuide(
                            DemoFusionParams.of(job),
                            max(1, round(stage.width / run.base_width)),
                            encoded,
                            noise,
                            int(scheduler.config.num_train_timesteps),
                            # the global pass dilates ControlNets with the UNet: their residuals must match it
                            torch.nn.ModuleList([comps.unet, *self._adapter_modules()]),
                        )
                else:
                    timesteps = timesteps[:0]

            # 2. Denoise.
            inputs = StageInputs(
                run.cond, job.guidance, (stage.width, stage.height), cfg_split=settings.cfg_split, extras=extras
            )

            def on_step(step: int, total: int) -> None:
                run.events(StepDone(stage.index, step, total, memory.peak_vram_gib(device)))
                run.cancel.check()

            latents = denoise(comps.unet, scheduler, latents, timesteps, inputs, generator, on_step, guide)
            if not bool(torch.isfinite(latents).all()):
                raise NumericalError(f"stage {stage.index + 1} produced NaN/inf latents (try --dtype fp32 or bf16)")
            if run.plan.refine == "demofusion":
                # The official pipeline keeps every scale's latents at the base image's per-channel statistics.
                if run.anchor is None:
                    run.anchor = latent_stats(latents)
                else:
                    latents = rematch(latents, run.anchor)

            # 3. Decode: back to a device image for the next stage, or straight to CPU uint8 for the last.
            latents = latents.to(self._vae_dtype())
            if stage is run.plan.stages[-1]:
                return None, tiler.decode_to_uint8(latents).numpy()
            return tiler.decode(latents), None
        finally:
            run.fp32_retries += tiler.fp32_retries


@dataclass
class _JobRun:
    """What every stage of one job's run shares."""

    job: JobSpec
    plan: Plan
    seed: int
    cond: Conditioning
    planner: memory.MemoryPlanner
    events: EventSink
    cancel: CancelToken
    base_width: int  # px of the base stage, or of the input image when upscaling: refine ratios count from it
    fp32_retries: int = 0  # VAE tiles redone in fp32, over all stages
    anchor: tuple[torch.Tensor, torch.Tensor] | None = None  # demofusion: per-channel latent mean/std to keep


def _describe_line(adapter: Adapter) -> str:
    """`SOURCE at scale S (k v, ...)` from the adapter's short numeric/name facts (notes and hashes stay in JSON)."""
    info = adapter.describe()
    facts = [f"{k.replace('_', ' ')} {v}" for k, v in info.items() if isinstance(v, int) and not isinstance(v, bool)]
    return f"{info['source']} at scale {info['scale']:g}" + (f" ({', '.join(facts)})" if facts else "")


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
