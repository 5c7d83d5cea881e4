"""Target size -> stage plan: a base image at the model's native size, then img2img refine stages at 2x steps.

The published 16K recipe (docs/reference.md section 4): 512x1024 txt2img, then 2x upscale + img2img at strengths
0.4, 0.3, 0.2, 0.1. A stage at strength s denoises about s * steps of the full schedule (diffusers' img2img
semantics: int(steps * s)). No torch here: plans are made (and printed) before any model loads.
"""

from __future__ import annotations

import math

from ..base.errors import UsageError
from ..base.events import Note
from ..base.plan import Plan, StagePlan
from ..base.sizes import Target, round_side
from ..base.text import plural
from ..engine.refine import DEFAULT_REFINE, REFINE_METHODS, RefineMethod
from .presets import PRESET_LABEL  # a preset's layer: its strengths adapt to the size

# A last refine step smaller than this ratio is folded into the one before it (e.g. 512 -> 1100 is one
# 2.15x stage rather than 512 -> 1024 -> 1100), so every refine step is between 1.25x and 2.5x.
MIN_LAST_STEP = 1.25


def resample(values: list[float], count: int) -> list[float]:
    """`values` as a curve from first to last, read at `count` evenly spaced points (first and last kept)."""
    if count == 1 or len(values) == 1:
        return [values[0]] * count
    out = []
    for i in range(count):
        x = i * (len(values) - 1) / (count - 1)
        low = min(int(x), len(values) - 2)
        out.append(round(values[low] + (values[low + 1] - values[low]) * (x - low), 4))
    return out


def _values(values: list[float]) -> str:
    return ", ".join(f"{v:g}" for v in values)


def _scaled(target: Target, long_side: int) -> tuple[int, int]:
    """The target's aspect at a given long side, sides rounded to multiples of 8."""
    ratio = long_side / target.long_side
    return round_side(target.width * ratio), round_side(target.height * ratio)


def stage_sizes(target: Target, start_long: int) -> list[tuple[int, int]]:
    """Sizes from a start long side up to the target: x2 each step, the last exactly the target."""
    ratio = target.long_side / start_long
    count = max(0, math.ceil(math.log2(ratio / MIN_LAST_STEP) - 1e-9)) if ratio > MIN_LAST_STEP else 0
    sizes = [_scaled(target, start_long * 2**k) for k in range(count)]
    return [*sizes, (target.width, target.height)]


def make_plan(
    target: Target,
    *,
    native: int,
    schedule_steps: int = 50,
    strengths: list[float] | None = None,
    base_size: int | None = None,
    input_size: tuple[int, int] | None = None,
    first_strength: float | None = None,
    strengths_from: str | None = None,
    refine: str = DEFAULT_REFINE,
) -> Plan:
    """Plan the stages for `target`.

    native: the family's native long side; base_size overrides it (the published 16K recipe starts at 1024).
    input_size: (w, h) of an image to upscale: no base stage, refine stages start from it.
    strengths_from: who gave `strengths` when not the --strengths flag (a preset, a prompt file's row).
    refine: the refine method, which sets the default strengths and how a stage's steps are counted.
    """
    method = REFINE_METHODS.get(refine)
    notes: list[Note] = []
    if input_size is not None:
        in_long = max(input_size)
        if target.long_side < in_long:
            raise UsageError(
                f"target {target.width}x{target.height} is smaller than the input image "
                f"{input_size[0]}x{input_size[1]}; upscale needs a larger --size"
            )
        sizes = stage_sizes(target, in_long)
        refine_sizes = sizes[1:] if len(sizes) > 1 else sizes  # the first size is the input itself
        base: list[tuple[int, int]] = []
    else:
        start = min(base_size or native, target.long_side)
        sizes = stage_sizes(target, start)
        base, refine_sizes = sizes[:1], sizes[1:]
        if (base_size or native) > target.long_side:
            what = f"--base-size {base_size}" if base_size else f"the model's native {native} px"
            notes.append(Note("info", f"target is below {what}: one stage, no refinement"))

    chosen = _strengths(
        method, target, base + refine_sizes, len(refine_sizes), strengths, first_strength, strengths_from, notes
    )
    stages = [StagePlan(0, w, h, None, schedule_steps) for w, h in base]
    for (w, h), s in zip(refine_sizes, chosen, strict=True):
        stages.append(StagePlan(len(stages), w, h, s, method.steps(schedule_steps, s)))
    if target.note:
        notes.insert(0, Note("warning", target.note))
    return Plan(
        target,
        tuple(stages),
        schedule_steps,
        native,
        refine,
        from_image=input_size is not None,
        notes=tuple(notes),
        refine_passes=method.passes_per_step,
    )


def _strengths(
    method: RefineMethod,
    target: Target,
    route: list[tuple[int, int]],
    count: int,
    strengths: list[float] | None,
    first_strength: float | None,
    strengths_from: str | None,
    notes: list[Note],
) -> list[float]:
    """The refine stages' strengths: the method's schedule, or the ones given (refused when a person's do not fit
    the plan; a preset's follow its curve at this size, with a note)."""
    if strengths is not None and first_strength is not None:
        notes.append(
            Note("warning", f"--strength {first_strength:g} is ignored: the stage strengths are given one by one")
        )
    if strengths is None:
        chosen = method.strengths(count, first_strength if first_strength is not None else method.first_strength)
    elif count == 0:
        chosen = []
        notes.append(Note("warning", f"{strengths_from or '--strengths'}: strengths ignored: one stage, no refinement"))
    else:
        chosen = list(strengths)
        if len(chosen) != count:
            stages_text = f"{plural(count, 'refine stage')} ({' -> '.join(f'{w}x{h}' for w, h in route)})"
            if strengths_from is None:
                raise UsageError(
                    f"--strengths has {plural(len(chosen), 'value')} but this plan has {stages_text}; "
                    f"give exactly {count}"
                )
            if not strengths_from.startswith(PRESET_LABEL):
                raise UsageError(
                    f"{strengths_from} gives {plural(len(chosen), 'strength')}, but a {target.width}x{target.height} "
                    f"target has {stages_text}; give {plural(count, 'value')}, or a size that fits"
                )
            # A preset's strengths are a curve for its own size: the same curve at this size's stage count.
            given, chosen = chosen, resample(chosen, count)
            notes.append(
                Note(
                    "info",
                    f"{strengths_from}'s {len(given)} strengths ({_values(given)}) are for its own size; this "
                    f"{target.width}x{target.height} target has {stages_text}: {_values(chosen)}, the same curve "
                    "(--strengths chooses)",
                )
            )
    return chosen
