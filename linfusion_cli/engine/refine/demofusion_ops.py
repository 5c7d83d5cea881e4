"""demofusion's per-step math (the method is declared in demofusion.py): the official high-resolution
pipeline's skip residual, global branch and statistics matching, at a stage r times the base size, with
cos_factor(t) = 0.5 (1 + cos(pi (T - t) / T)) and T the training timesteps:

1. Skip residual: before each step, latents = latents (1 - c1) + noised_upscaled(t) c1, c1 = cos_factor^cs1;
   the upscaled image's latents noised to the current timestep keep the layout early on.
2. Local branch: the UNet as usual.
3. Global branch: every Conv2d's dilation and padding times r, the UNet on the latents Gaussian-filtered
   (kernel 2r - 1, sigma = gaussian_sigma c3, c3 = 0.99 cos_factor^cs3 + 0.01, then mean/std re-matched to the
   unfiltered latents), convolutions restored. With linear attention this pass sees the whole image at once.
4. The two predictions blend by c2 = cos_factor^cs2 (local (1 - c2) + global c2) before one scheduler step.
   The official code steps twice and blends the results; every scheduler update here is affine in the model
   output, so that is the same update for deterministic samplers, and keeps multistep samplers' history
   consistent (ancestral samplers draw one noise instead of two).
5. After the stage, the latents' per-channel mean/std are re-matched to the anchor (the base stage's final
   latents, or an upscaled input's), as the official pipeline does before each decode.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..latent_ops import LatentOps
from .method import Denoiser, JobRefiner, RefineStage

if TYPE_CHECKING:
    from ...base.job import Job


# --- schedules ----------------------------------------------------------------------------------------------


def cos_factor(t: float, train_steps: int) -> float:
    """0.5 (1 + cos(pi (T - t) / T)): 1 at the noisiest timestep T, falling to 0 at t = 0."""
    return 0.5 * (1.0 + math.cos(math.pi * (train_steps - float(t)) / train_steps))


@dataclass(frozen=True)
class DemoFusionParams:
    cosine_scale_1: float = 3.0  # skip residual: c1 = cos_factor^cs1
    cosine_scale_2: float = 1.0  # branch blend: c2 = cos_factor^cs2
    cosine_scale_3: float = 1.0  # blur: c3 = 0.99 cos_factor^cs3 + 0.01
    gaussian_sigma: float = 1.0

    @classmethod
    def of(cls, job: Job) -> DemoFusionParams:
        return cls(job.cosine_scale_1, job.cosine_scale_2, job.cosine_scale_3, job.gaussian_sigma)

    def c1(self, factor: float) -> float:
        return factor**self.cosine_scale_1

    def c2(self, factor: float) -> float:
        return factor**self.cosine_scale_2

    def c3(self, factor: float) -> float:
        return 0.99 * factor**self.cosine_scale_3 + 0.01


# --- the global branch's pieces -------------------------------------------------------------------------------


def gaussian_kernel(size: int, sigma: float) -> torch.Tensor:
    """A normalised (size, size) Gaussian, fp32."""
    coords = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def blur_matched(ops: LatentOps, latents: torch.Tensor, ratio: int, sigma: float) -> torch.Tensor:
    """Gaussian-filter latents (1, C, h, w) with a (2r - 1)-wide kernel, then give each channel back its mean
    and std. Computed in fp32 whatever the latents' dtype: a 16K latent's statistics overflow fp16 sums. `ops`
    filter and measure the whole image, also when the latents are one band of it."""
    x = latents.float()
    size = 2 * ratio - 1
    if size <= 1:
        return latents
    blurred = ops.filter2d(x, gaussian_kernel(size, sigma))
    return ops.match_stats(blurred, *ops.channel_stats(x)).to(latents.dtype)


@contextlib.contextmanager
def dilated(model: nn.Module, ratio: int) -> Iterator[None]:
    """Every Conv2d of `model` with dilation and padding times `ratio` inside the block; restored on leaving,
    whatever happens (an exception, a cancel, Ctrl-C), so the model is exactly as before."""
    saved = [(m, m.dilation, m.padding) for m in model.modules() if isinstance(m, nn.Conv2d)]
    try:
        for conv, dilation, padding in saved:
            conv.dilation = (dilation[0] * ratio, dilation[1] * ratio)
            if not isinstance(padding, str):  # "same"/"valid" keep their meaning under dilation
                conv.padding = (padding[0] * ratio, padding[1] * ratio)
        yield
    finally:
        for conv, dilation, padding in saved:
            conv.dilation, conv.padding = dilation, padding


# --- the per-step guide and the global branch ---------------------------------------------------------------


class DemoFusionGuide:
    """One refine stage's guide (see `method.StageGuide`): the skip residual before each step, and the global
    branch as a wrapper around the stage's denoiser.

    `stage` (method.RefineStage): its upscaled latents and their noise, its ratio r, what a UNet pass runs (the
    UNet and any ControlNet beside it, dilated together) and the ops that blur and measure the whole image, also
    while these latents are one band of it.
    """

    def __init__(self, params: DemoFusionParams, stage: RefineStage) -> None:
        self.params = params
        self.ops = stage.ops
        self.ratio = max(1, stage.ratio)
        self.encoded = stage.keep(stage.encoded)  # the skip residual's two halves, read back each step
        self.noise = stage.keep(stage.noise)
        self.train_steps = stage.train_steps
        self.model = stage.models

    def before_step(self, scheduler: Any, t: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """Skip residual: pull the latents towards the upscaled image noised to timestep t."""
        c1 = self.params.c1(cos_factor(float(t), self.train_steps))
        if c1 == 0.0:
            return latents
        noised = scheduler.add_noise(self.encoded(), self.noise(), t.reshape(1))
        return latents * (1 - c1) + noised * c1

    def wrap(self, denoiser: Denoiser) -> Denoiser:
        return GlobalBranch(denoiser, self)


class GlobalBranch:
    """A denoiser (latents, t) -> prediction with the global branch blended in: the same denoiser run again on
    the blurred latents with every convolution of the guide's model dilated."""

    def __init__(self, inner: Denoiser, guide: DemoFusionGuide) -> None:
        self.inner = inner
        self.guide = guide

    def __call__(self, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        local: torch.Tensor = self.inner(latents, t)
        guide, params = self.guide, self.guide.params
        factor = cos_factor(float(t), guide.train_steps)
        c2 = params.c2(factor)
        if c2 == 0.0:
            return local
        blurred = blur_matched(guide.ops, latents, guide.ratio, params.gaussian_sigma * params.c3(factor))
        with dilated(guide.model, guide.ratio):
            global_: torch.Tensor = self.inner(blurred, t)
        return local * (1 - c2) + global_ * c2


class DemoFusionRefiner(JobRefiner):
    """A job's demofusion state: the anchor statistics every stage's latents are matched to."""

    def __init__(self, params: DemoFusionParams) -> None:
        self.params = params
        self.anchor: tuple[torch.Tensor, torch.Tensor] | None = None

    def encoded(self, latents: torch.Tensor, ops: LatentOps) -> None:
        if self.anchor is None:  # upscaling an input image: its statistics are the anchor
            self.anchor = ops.channel_stats(latents)

    def guide(self, stage: RefineStage) -> DemoFusionGuide:
        return DemoFusionGuide(self.params, stage)

    def finished(self, latents: torch.Tensor, ops: LatentOps) -> torch.Tensor:
        # The official pipeline keeps every scale's latents at the base image's per-channel statistics.
        if self.anchor is None:
            self.anchor = ops.channel_stats(latents)
            return latents
        return ops.match_stats(latents.float(), *self.anchor).to(latents.dtype)
