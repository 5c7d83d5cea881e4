"""`demofusion`: the official LinFusion high-resolution pipeline's refine method (`pipeline_highres_sdxl.py`, in
the DemoFusion manner), declared here; its per-step math is in demofusion_ops.py.

At a stage r times the base size, with cos_factor(t) = 0.5 (1 + cos(pi (T - t) / T)): a skip residual pulls the
latents towards the upscaled image noised to t (c1 = cos_factor^cs1), and a second, *global* UNet pass with every
convolution dilated r times runs on Gaussian-blurred latents and is blended into the prediction (c2 =
cos_factor^cs2); each stage's latents keep the base image's statistics. Strengths are linspace(0.32, 0, n + 1)
without the final 0, and a stage runs ceil(steps x strength) steps, as the official `get_timesteps` counts them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ...base.settings import REFINE_PANEL, WITH_BENCH, Setting, in_range
from .method import JobRefiner, RefineMethod

if TYPE_CHECKING:
    from ...base.job import Job

NAME = "demofusion"
FIRST_STRENGTH = 0.32  # the official high-resolution pipeline's `upscale_strength`
# It keeps the encoded upscaled latents, their noise, the local prediction and the blurred latents (4 channels,
# fp32 each) beside the UNet's activations; its global branch is a second pass, not a wider one. The first two
# (the skip residual's) its guide keeps through RefineStage.keep: in CPU memory where the stage parks.
EXTRA_BYTES_PER_TOKEN = 4 * 4 * 4
KEPT_BYTES_PER_TOKEN = 2 * 4 * 4
IN_EFFECT = ("refine", NAME)


def demofusion_strengths(count: int, first: float = FIRST_STRENGTH) -> list[float]:
    """The official pipeline's upscale strengths: linspace(first, 0, count + 1) without the final 0."""
    return [round(first * (1 - i / count), 4) for i in range(count)] if count > 0 else []


def demofusion_steps(schedule_steps: int, strength: float) -> int:
    """ceil(steps * strength), as the official pipeline's `get_timesteps` counts them."""
    if strength <= 0:
        return 0
    return min(schedule_steps, math.ceil(round(schedule_steps * strength, 9)))


def _parameter(name: str, default: float, help: str, check: Any = None) -> Setting:
    return Setting(
        name,
        "float",
        default,
        help,
        REFINE_PANEL,
        WITH_BENCH,
        when=IN_EFFECT,
        check=check or in_range(0.0, 1e6),
    )


class DemoFusion(RefineMethod):
    name = NAME
    summary = (
        "LinFusion's official high-resolution method: skip residual + a dilated global UNet pass per step, about "
        "2x the refine time"
    )
    settings = (
        _parameter(
            "cosine_scale_1",
            3.0,
            "demofusion: skip-residual exponent; larger keeps less of the upscaled image \\[default: 3].",
        ),
        _parameter(
            "cosine_scale_2",
            1.0,
            "demofusion: global-branch blend exponent; larger blends in less of it \\[default: 1].",
        ),
        _parameter("cosine_scale_3", 1.0, "demofusion: exponent of the blur's fall over the steps \\[default: 1]."),
        _parameter(
            "gaussian_sigma",
            1.0,
            "demofusion: Gaussian blur sigma of the global branch, latent px \\[default: 1].",
            in_range(0.01, 100.0),
        ),
    )
    first_strength = FIRST_STRENGTH
    passes_per_step = 2  # the local pass and the dilated global pass
    extra_bytes_per_token = EXTRA_BYTES_PER_TOKEN
    kept_bytes_per_token = KEPT_BYTES_PER_TOKEN
    caption = "refine: demofusion (a local and a dilated global UNet pass per refine step)"

    def strengths(self, count: int, first: float) -> list[float]:
        return demofusion_strengths(count, first)

    def steps(self, schedule_steps: int, strength: float) -> int:
        return demofusion_steps(schedule_steps, strength)

    def a1111_fields(self, settings: Mapping[str, Any]) -> list[tuple[str, str]]:
        params = (
            f"cosine scales {settings['cosine_scale_1']:g}/{settings['cosine_scale_2']:g}/"
            f"{settings['cosine_scale_3']:g}, sigma {settings['gaussian_sigma']:g}"
        )
        return [("Refine", f'"{NAME} ({params})"')]

    def start_job(self, job: Job) -> JobRefiner:
        from .demofusion_ops import DemoFusionParams, DemoFusionRefiner  # lazy: torch stays out of CLI start-up

        return DemoFusionRefiner(DemoFusionParams.of(job))


DEMOFUSION = DemoFusion()
