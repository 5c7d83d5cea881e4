"""A loaded ControlNet as an adapter: per job its control image and step window, per stage a UNet extra that adds
its residuals to every UNet call of the stage's steps in [start, end]."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from ...base.errors import UsageError
from ...base.job import Job
from ...base.settings import AdapterRef, adapter_refs
from ...io.images import load_rgb
from ..adapter_kind import UNetCall
from ..tensors import to_device_image, upscale
from .kind import KIND, PREVIOUS
from .patch import ControlNetPatch

if TYPE_CHECKING:
    from ...base.plan import StagePlan


@dataclass(frozen=True)
class JobControl:
    """One job's settings for one ControlNet."""

    image: str  # a file, or PREVIOUS
    pixels: np.ndarray | None  # (H, W, 3) uint8 for a file
    start: float
    end: float
    stage_scales: tuple[float, ...]  # multiplier per stage, the last repeating

    def stage_scale(self, index: int) -> float:
        return self.stage_scales[min(index, len(self.stage_scales) - 1)] if self.stage_scales else 1.0


class ControlNetAdapter:
    """A loaded ControlNet (see the module docstring); `modules` are chunked by memory settings like the UNet."""

    kind = KIND

    def __init__(self, ref: AdapterRef, model: Any, name: str, patch: ControlNetPatch) -> None:
        self.ref = ref
        self.model = model
        self.name = name
        self.patch = patch
        self.job: JobControl | None = None

    @property
    def modules(self) -> tuple[nn.Module, ...]:
        return (self.model,)

    def begin_job(self, job: Job, device: torch.device) -> None:
        refs, images = adapter_refs(job.controlnet), list(job.control_image or ())
        sources = [r.source for r in refs]
        if self.ref.source not in sources or len(images) != len(refs):
            raise UsageError(f"ControlNet '{self.ref.source}' has no control image in this job")
        image = images[sources.index(self.ref.source)]
        pixels = None if image == PREVIOUS else load_rgb(image)
        self.job = JobControl(image, pixels, job.control_start, job.control_end, tuple(job.control_stages or ()))

    def stage_extra(self, stage: StagePlan, control: torch.Tensor | None) -> ControlExtra | None:
        job = self.job
        if job is None:
            raise RuntimeError("ControlNet used before begin_job")
        scale = self.ref.scale * job.stage_scale(stage.index)
        if scale == 0.0 or job.start >= job.end:
            return None
        param = next(self.model.parameters())
        if job.pixels is not None:
            control = upscale(to_device_image(job.pixels, param.device, param.dtype), stage.width, stage.height)
        elif control is None:
            return None  # `previous` in a base stage: nothing to condition on yet
        cond = ((control.to(param.device, param.dtype) + 1) / 2).clamp_(0, 1)  # (1, 3, H, W), [0, 1] as trained
        return ControlExtra(self.model, cond, scale, job.start, job.end, stage.steps)

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "kind": "controlnet",
            "source": self.ref.source,
            "scale": self.ref.scale,
            "model": self.name,
            "linfusion_layers": len(self.patch.layers),
            "linfusion_weights": self.patch.source or "none (LinFusion off)",
            "quadratic_layers": len(self.patch.kept),
        }
        if self.job is not None:
            info.update(
                image=self.job.image,
                guidance_start=self.job.start,
                guidance_end=self.job.end,
                stage_scales=list(self.job.stage_scales) or None,
            )
        return info

    def remove(self) -> None:
        self.patch.remove()
        self.model = None
        self.job = None


@dataclass
class ControlExtra:
    """One stage's ControlNet call for every UNet call; active for the steps whose fraction of the stage lies in
    [start, end] (diffusers' control_guidance_start/end rule). Steps are counted by distinct timesteps: guidance
    halves and a refine method's extra passes of one step share its timestep."""

    model: Any
    cond: torch.Tensor  # (1, 3, H, W) in [0, 1]
    scale: float
    start: float
    end: float
    steps: int
    _step: int = -1
    _last_t: float | None = None

    def band(self, rows: slice, height: int) -> ControlExtra:
        """The same call for one band of a split image: the control image's rows `rows` (px) of the image,
        `height` px tall. A control image made of those rows alone (the previous stage's image, upscaled on each
        process for its band) already is the band."""
        if self.cond.shape[-2] == height:
            return replace(self, cond=self.cond[:, :, rows])
        if self.cond.shape[-2] != rows.stop - rows.start:
            raise ValueError(f"a control image of {self.cond.shape[-2]} rows is neither the image nor rows {rows}")
        return self

    def active(self, t: torch.Tensor) -> bool:
        value = float(t)
        if value != self._last_t:
            self._step, self._last_t = self._step + 1, value
        n = max(1, self.steps)
        return not (self._step / n < self.start or (self._step + 1) / n > self.end + 1e-9)

    def __call__(self, call: UNetCall) -> dict[str, Any]:
        if not self.active(call.t):
            return {}
        down, mid = self.model(
            call.sample,
            call.t,
            encoder_hidden_states=call.encoder_hidden_states,
            controlnet_cond=self.cond,  # batch 1, broadcast over the guidance halves inside the ControlNet
            conditioning_scale=self.scale,
            added_cond_kwargs=call.added_cond_kwargs,
            return_dict=False,
        )
        return {"down_block_additional_residuals": tuple(down), "mid_block_additional_residual": mid}
