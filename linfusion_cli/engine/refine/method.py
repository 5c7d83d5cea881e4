"""What a refine method is: how refine stages (upscale, re-noise, denoise the last steps) are scheduled and what
they do besides plain img2img. A method is one module with a `RefineMethod` registered in `REFINE_METHODS`
(refine/__init__.py); it owns its settings, its schedule, its cost (UNet passes per step, latents it keeps), its
plan caption and metadata, and the per-stage hooks the engine calls. No torch at import: plans, settings and
help are made before any model loads; a method's torch side is imported when a job starts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias

from ...base.plan import Plan, StagePlan
from ...base.settings import Setting

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ...base.job import Job
    from ..latent_ops import LatentOps

Denoiser: TypeAlias = "Callable[[torch.Tensor, torch.Tensor], torch.Tensor]"  # (latents, t) -> prediction
Keep: TypeAlias = "Callable[[torch.Tensor], Callable[[], torch.Tensor]]"  # a tensor -> how to read it back


def refine_ratio(stage: StagePlan, plan: Plan, base_width: int, native: int) -> int:
    """How many times the scale the model works at a refine stage is (demofusion dilates its global pass that
    much). A generated image counts from its base stage: r = 2, 4, 8..., as the official high-resolution
    pipeline. An upscaled one counts from the model's native size, as the official super-resolution pipeline
    takes r = output size / native size, rounded up: an input of any size is seen at the scale the model was
    trained at, not at its own."""
    if plan.from_image:
        return max(1, math.ceil(max(stage.width, stage.height) / native))
    return max(1, round(stage.width / base_width))


@dataclass(frozen=True)
class RefineStage:
    """What the engine hands a method's guide for one refine stage. `encoded` (the upscaled image's latents, fp32,
    before noise), `noise` (the draw that noised the starting latents) and the latents the guide sees are this
    process's band while a split image's stage runs split: whatever reads across rows (a blur, the image's
    statistics) goes through `ops`, which give the whole image's result either way."""

    ratio: int  # the stage's size over the base (or input) size: refine_ratio
    encoded: torch.Tensor
    noise: torch.Tensor
    train_steps: int  # the scheduler's training timesteps, T
    models: nn.Module  # what a UNet pass runs: the UNet and the models adapters run beside it
    ops: LatentOps
    # How a guide keeps a tensor through the stage's steps: on the device, or (a memory setting that parks, at
    # the sizes where it runs) in CPU memory, brought back each time it is read.
    keep: Keep = field(default=lambda tensor: lambda: tensor)


class StageGuide(Protocol):
    """A refine stage's per-step additions: adjust the latents before each step, and wrap the stage's denoiser
    (one more wrapper around guidance around the UNet, as k-diffusion composes them)."""

    def before_step(self, scheduler: Any, t: torch.Tensor, latents: torch.Tensor) -> torch.Tensor: ...

    def wrap(self, denoiser: Denoiser) -> Denoiser: ...


class JobRefiner:
    """One job's state for its method across stages; the default does nothing beyond plain img2img."""

    def encoded(self, latents: torch.Tensor, ops: LatentOps) -> None:
        """A refine stage encoded its upscaled image (before noise). `latents` are this process's band while a
        split image's stage runs split: the whole image's statistics come from `ops`, as in `guide`."""

    def guide(self, stage: RefineStage) -> StageGuide | None:
        """This refine stage's guide (see RefineStage), or None: plain img2img."""
        return None

    def finished(self, latents: torch.Tensor, ops: LatentOps) -> torch.Tensor:
        """A stage's final latents, before they are decoded (this process's band while the stage runs split)."""
        return latents


class RefineMethod:
    """A refine method's declaration (subclass it; see the module docstring)."""

    name = ""
    summary = ""  # what it does, in a few words for --help
    settings: tuple[Setting, ...] = ()  # its own parameters: flags, job fields, preset keys
    first_strength = 0.4  # the first refine stage's strength unless --strength says otherwise
    passes_per_step = 1  # UNet passes per refine step and guidance half
    extra_bytes_per_token = 0  # device bytes per latent token it keeps beside the UNet's activations
    kept_bytes_per_token = 0  # of those, what its guide holds through RefineStage.keep (parked with the skips)
    caption: str | None = None  # the plan table's caption when a job uses it

    def strengths(self, count: int, first: float) -> list[float]:
        """Default strengths of `count` refine stages, the first one `first`."""
        raise NotImplementedError

    def steps(self, schedule_steps: int, strength: float) -> int:
        """How many of the schedule's steps a refine stage at `strength` runs."""
        raise NotImplementedError

    def a1111_fields(self, settings: Mapping[str, Any]) -> list[tuple[str, str]]:
        """What the image's `parameters` text says about the method."""
        return [("Refine", self.name)]

    def start_job(self, job: Job) -> JobRefiner:
        """The per-job state the engine keeps across the job's stages."""
        return JobRefiner()
