"""The noise a stochastic sampler adds at each step, handed to it by the stage (as k-diffusion hands its samplers
`noise_sampler`) rather than left to a module-level draw.

diffusers' schedulers take a generator, not noise: `step(..., generator=g)` draws `torch.randn(shape,
generator=g)` (through diffusers' `randn_tensor`, or any other way a scheduler chooses). `NoiseSource.step` runs
the step with the stage's generator and answers each draw made from that generator itself: on one process with
exactly the draw the scheduler would have made (the same numbers), on a split image with the noise for the whole
image's rows, of which this process keeps its own, so a seed gives the same image however the image is split.
Draws from any other generator, and everything else the step does, pass through untouched.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

Band = Callable[[torch.Tensor], torch.Tensor]  # the whole image's tensor -> this process's rows of it


class NoiseSource:
    """Where a stage's fresh noise comes from: its generator, drawn on the CPU as diffusers draws it; with
    `whole_rows` and `band` (a split image), drawn for the whole image's latent rows and cut to this process's."""

    def __init__(self, generator: torch.Generator, whole_rows: int | None = None, band: Band | None = None) -> None:
        self.generator = generator
        self.whole_rows = whole_rows
        self.band = band
        self.draws = 0  # draws answered so far (a deterministic sampler makes none)

    def draw(self, shape: tuple[int, ...], dtype: torch.dtype | None = None) -> torch.Tensor:
        """Noise of `shape`, this process's rows of it, on the generator's device."""
        self.draws += 1
        if self.band is None or self.whole_rows is None:
            return torch.randn(shape, generator=self.generator, dtype=dtype, device=self.generator.device)
        whole_shape = (*shape[:-2], self.whole_rows, shape[-1])
        whole = torch.randn(whole_shape, generator=self.generator, dtype=dtype, device=self.generator.device)
        return self.band(whole).contiguous()

    def step(self, scheduler: Any, prediction: torch.Tensor, t: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """One scheduler step whose draws from the stage's generator are answered by `draw`."""
        takes_generator = "generator" in inspect.signature(scheduler.step).parameters  # the deterministic: mostly not
        given = {"generator": self.generator} if takes_generator else {}
        with _Answering(self):
            return scheduler.step(prediction, t, latents, return_dict=False, **given)[0]


class _Answering(TorchFunctionMode):
    """While a step runs: `torch.randn(shape, generator=<the source's>)` is answered by the source (torch turns
    the mode off while its handler runs, so the source's own draw is a plain one)."""

    def __init__(self, source: NoiseSource) -> None:
        super().__init__()
        self.source = source

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is not torch.randn or kwargs.get("generator") is not self.source.generator:
            return func(*args, **kwargs)
        size = kwargs.get("size", args[0] if len(args) == 1 and not isinstance(args[0], int) else args)
        shape = tuple(int(side) for side in size)
        noise = self.source.draw(shape, kwargs.get("dtype"))
        return noise.to(kwargs.get("device") or noise.device)
