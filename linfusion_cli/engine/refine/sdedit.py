"""`sdedit`, the default refine method: each refine stage is plain img2img (SDEdit) on the upscaled previous
image: encode, re-noise to the stage's strength, denoise the last `int(steps x strength)` steps of the schedule
(diffusers' img2img semantics). Strengths fall linearly from 0.4 to 0.1, as in the published 16K recipe
(docs/reference.md section 4: 0.4, 0.3, 0.2, 0.1)."""

from __future__ import annotations

from .method import RefineMethod

FIRST_STRENGTH = 0.4
LAST_STRENGTH = 0.1


def default_strengths(count: int, first: float = FIRST_STRENGTH, last: float = LAST_STRENGTH) -> list[float]:
    """Linear from `first` (first refine stage) to `last` (last one); one stage gets `first`."""
    if count <= 0:
        return []
    if count == 1:
        return [first]
    last = min(last, first)
    return [round(first + (last - first) * i / (count - 1), 4) for i in range(count)]


def refine_steps(schedule_steps: int, strength: float) -> int:
    """How many steps an img2img stage at `strength` runs: int(steps * s), at least 1 unless s is 0."""
    if strength <= 0:
        return 0
    return max(1, min(schedule_steps, int(schedule_steps * strength)))


class SDEdit(RefineMethod):
    name = "sdedit"
    summary = "upscale, re-noise, denoise"
    first_strength = FIRST_STRENGTH

    def strengths(self, count: int, first: float) -> list[float]:
        return default_strengths(count, first)

    def steps(self, schedule_steps: int, strength: float) -> int:
        return refine_steps(schedule_steps, strength)


SDEDIT = SDEdit()
