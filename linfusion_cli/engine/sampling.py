"""The denoising loop of one stage (text-to-image or SDEdit img2img), and the model it calls, composed per stage
from small wrappers in the manner of k-diffusion (`CFGDenoiser`): the scheduler's input scaling around
classifier-free guidance around the one UNet call (adapters' extras merged in); a refine method's guide adds one
more wrapper (a second, dilated pass, say) and adjusts the latents before each step."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..base.job import Job
from ..base.plan import Plan, StagePlan
from ..models.adapter_kind import UNetCall, UNetExtra
from .noise import NoiseSource
from .refine import StageGuide
from .text import Conditioning


@dataclass
class StageInputs:
    """What one stage's denoising loop needs besides the UNet."""

    cond: Conditioning
    guidance: float
    size: tuple[int, int]  # (width, height) px SDXL's size conditioning names: conditioning_size
    cfg_split: bool = False  # guidance as two batch-1 UNet calls instead of one batch of 2
    extras: tuple[UNetExtra, ...] = ()  # adapters' per-call conditioning, see UNetExtra
    per_step: list[Conditioning] | None = None  # A1111's prompt editing: each sampler step's (prompts.py)

    def at_step(self, index: int, total: int) -> None:
        """The conditioning of the sampler step that model call `index` of `total` belongs to (second-order
        samplers call the model about twice per step)."""
        if self.per_step:
            self.cond = self.per_step[min(index * len(self.per_step) // total, len(self.per_step) - 1)]


def conditioning_size(job: Job, stage: StagePlan, plan: Plan) -> tuple[int, int]:
    """The (width, height) SDXL's size conditioning names at a stage (`size_cond`):
    - stage (the default): the stage's own size, what diffusers' SDXL pipelines pass for a generation of that
      size; it is what every image made before the setting existed was made with, so it keeps their pixels;
    - target: the final output's size at every stage, base included: LinFusion's official high-resolution SDXL
      pipeline passes original_size = target_size = the output's size (and its super-resolution pipeline the
      same), so the base image is laid out as the 16K picture it will become. The sdxl-16k preset uses it."""
    last = plan.stages[-1]
    return (last.width, last.height) if job.size_cond == "target" else (stage.width, stage.height)


def _added_cond(inputs: StageInputs, rows: slice, device: torch.device, dtype: torch.dtype) -> dict[str, Any] | None:
    if inputs.cond.pooled is None:
        return None
    width, height = inputs.size
    # SDXL micro-conditioning: original_size = target_size = `inputs.size` (conditioning_size), crop (0, 0), as
    # (h, w, top, left, h, w). Claiming an "original" size smaller than the target at 8K-16K makes SDXL paint blur.
    time_ids = torch.tensor([[height, width, 0, 0, height, width]], device=device, dtype=dtype)
    pooled = inputs.cond.pooled[rows]
    return {"text_embeds": pooled.to(device, dtype), "time_ids": time_ids.repeat(pooled.shape[0], 1)}


class Guided:
    """Classifier-free guidance around the UNet: (model input x (1, 4, h, w), t) -> the guided noise (or v)
    prediction in fp32; the two halves as one batch of 2, or as two batch-1 calls (`cfg_split`)."""

    def __init__(self, unet: nn.Module, inputs: StageInputs) -> None:
        self.unet = unet
        self.inputs = inputs

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        unet, inputs = self.unet, self.inputs
        dtype = next(unet.parameters()).dtype
        embeds = inputs.cond.embeds.to(x.device, dtype)
        rows = embeds.shape[0]

        def call(sample: torch.Tensor, sl: slice) -> torch.Tensor:
            added = _added_cond(inputs, sl, x.device, dtype)
            return unet_call(unet, sample.to(dtype), t, embeds[sl], added, inputs.extras, sl)

        if rows == 1:
            return call(x, slice(0, 1))
        if inputs.cfg_split:
            uncond, text = call(x, slice(0, 1)), call(x, slice(1, 2))
        else:
            uncond, text = call(torch.cat([x, x]), slice(0, 2)).chunk(2)
        return uncond + inputs.guidance * (text - uncond)


class Scaled:
    """The scheduler's input scaling around a denoiser: (latents, t) -> prediction."""

    def __init__(self, inner: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], scheduler: Any) -> None:
        self.inner = inner
        self.scheduler = scheduler

    def __call__(self, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.inner(self.scheduler.scale_model_input(latents, t), t)


def unet_call(
    unet: nn.Module,
    sample: torch.Tensor,
    t: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    added_cond_kwargs: dict[str, Any] | None,
    extras: tuple[UNetExtra, ...],
    rows: slice,
) -> torch.Tensor:
    """The one place the UNet is called: adapters' extras are merged in (their `added_cond_kwargs` into the
    family's; residual tensors from several adapters summed), and the prediction comes back in fp32."""
    kwargs: dict[str, Any] = {}
    added = dict(added_cond_kwargs or {})
    for extra in extras:
        for key, value in extra(UNetCall(sample, t, encoder_hidden_states, added_cond_kwargs, rows)).items():
            if key == "added_cond_kwargs":
                added.update(value)
            elif key in kwargs:
                kwargs[key] = _add_residuals(kwargs[key], value)
            else:
                kwargs[key] = value
    return unet(
        sample,
        t,
        encoder_hidden_states=encoder_hidden_states,
        added_cond_kwargs=added or None,
        return_dict=False,
        **kwargs,
    )[0].float()


def _add_residuals(a: Any, b: Any) -> Any:
    """Sum two adapters' residuals (a tensor, or a tuple of tensors, one per UNet block)."""
    if isinstance(a, torch.Tensor):
        return a + b
    return tuple(x + y for x, y in zip(a, b, strict=True))


def stage_timesteps(
    scheduler: Any, schedule_steps: int, run_steps: int, device: torch.device, img2img: bool
) -> torch.Tensor:
    """The timesteps this stage runs: all of them, or the last `run_steps` (img2img) of the full schedule."""
    scheduler.set_timesteps(schedule_steps, device=device)
    if not img2img:
        return scheduler.timesteps
    start = max(schedule_steps - run_steps, 0) * scheduler.order
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)
    return scheduler.timesteps[start:]


@torch.no_grad()
def denoise(
    unet: nn.Module,
    scheduler: Any,
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    inputs: StageInputs,
    noise: NoiseSource,
    on_step: Callable[[int, int], None],
    guide: StageGuide | None = None,
) -> torch.Tensor:
    """Run the scheduler over `timesteps`; latents are kept in fp32, the UNet runs in its own dtype.

    The stage's model is composed here: input scaling around guidance around the UNet, and the guide's wrapper
    around that. A stochastic sampler's noise comes from `noise`. on_step(done, total) counts steps; a step
    with a guide includes all of its UNet passes (a method's second pass included), so a step's time in the
    progress bar is what a step costs.
    """
    total = len(timesteps)
    model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = Scaled(Guided(unet, inputs), scheduler)
    if guide is not None:
        model = guide.wrap(model)
    for i, t in enumerate(timesteps):
        inputs.at_step(i, total)
        if guide is not None:
            latents = guide.before_step(scheduler, t, latents)
        prediction = model(latents, t)
        latents = noise.step(scheduler, prediction, t, latents)
        on_step(i + 1, total)
    return latents


def initial_noise(shape: tuple[int, ...], seed: int, device: torch.device) -> torch.Tensor:
    """Gaussian noise drawn on the CPU from the seed, so a seed gives the same image on every device."""
    generator = torch.Generator("cpu").manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(device)
