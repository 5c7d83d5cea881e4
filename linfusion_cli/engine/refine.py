"""Structure-preserving refinement: the official LinFusion high-resolution pipeline's method, per refine stage.

`sdedit` (the default) refines an upscaled image as plain img2img: encode, re-noise, denoise the last steps.
`demofusion` (LinFusion's `pipeline_highres_sdxl.py`, in the DemoFusion manner) adds, at a stage r times the
base size, with cos_factor(t) = 0.5 (1 + cos(pi (T - t) / T)) and T the training timesteps:

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

The stage strengths and steps (linspace(0.32, 0, n + 1), ceil(steps s)) are planned in planning.py.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import JobSpec

STATS_EPS = 1e-6  # keeps a constant latent (std 0) from dividing by zero when statistics are re-matched


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
    def of(cls, job: JobSpec) -> DemoFusionParams:
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


def _match_stats(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """x with each channel's spatial mean/std set to `mean`/`std` (all fp32)."""
    return (x - x.mean(dim=(2, 3), keepdim=True)) / (x.std(dim=(2, 3), keepdim=True) + STATS_EPS) * std + mean


def blur_matched(latents: torch.Tensor, ratio: int, sigma: float) -> torch.Tensor:
    """Gaussian-filter latents (1, C, h, w) with a (2r - 1)-wide kernel, then give each channel back its mean
    and std. Computed in fp32 whatever the latents' dtype: a 16K latent's statistics overflow fp16 sums."""
    x = latents.float()
    size = 2 * ratio - 1
    if size <= 1:
        return latents
    channels = x.shape[1]
    kernel = gaussian_kernel(size, sigma).to(x.device)[None, None].repeat(channels, 1, 1, 1)  # (C, 1, k, k)
    blurred = F.conv2d(x, kernel, padding=size // 2, groups=channels)
    return _match_stats(blurred, *latent_stats(x)).to(latents.dtype)


def rematch(latents: torch.Tensor, anchor: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Latents with the anchor's per-channel mean and std (fp32)."""
    return _match_stats(latents.float(), *anchor).to(latents.dtype)


def latent_stats(latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = latents.float()
    return x.mean(dim=(2, 3), keepdim=True), x.std(dim=(2, 3), keepdim=True)


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


# --- the per-step guide the denoising loop calls ----------------------------------------------------------------

Predict = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (model input, t) -> guided prediction


class DemoFusionGuide:
    """Hooks for one refine stage's denoising loop (see `sampling.denoise`).

    encoded: the upscaled image's latents (fp32, before noise); noise: the stage's noise, the same draw that
    noised the starting latents. ratio: the stage's size over the base (or input) size, a whole number.
    """

    def __init__(
        self,
        params: DemoFusionParams,
        ratio: int,
        encoded: torch.Tensor,
        noise: torch.Tensor,
        train_steps: int,
        model: nn.Module,
    ) -> None:
        self.params = params
        self.ratio = max(1, ratio)
        self.encoded = encoded
        self.noise = noise
        self.train_steps = train_steps
        self.model = model

    def before_step(self, scheduler: object, t: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """Skip residual: pull the latents towards the upscaled image noised to timestep t."""
        c1 = self.params.c1(cos_factor(float(t), self.train_steps))
        if c1 == 0.0:
            return latents
        noised = scheduler.add_noise(self.encoded, self.noise, t.reshape(1))  # type: ignore[attr-defined]
        return latents * (1 - c1) + noised * c1

    def blend(
        self,
        local: torch.Tensor,
        latents: torch.Tensor,
        t: torch.Tensor,
        scale_input: Callable[[torch.Tensor], torch.Tensor],
        predict: Predict,
    ) -> torch.Tensor:
        """The local prediction blended with the global branch's (dilated UNet on blurred latents)."""
        factor = cos_factor(float(t), self.train_steps)
        c2 = self.params.c2(factor)
        if c2 == 0.0:
            return local
        blurred = blur_matched(latents, self.ratio, self.params.gaussian_sigma * self.params.c3(factor))
        with dilated(self.model, self.ratio):
            global_ = predict(scale_input(blurred), t)
        return local * (1 - c2) + global_ * c2
