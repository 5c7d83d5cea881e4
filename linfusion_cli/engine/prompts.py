"""A job's text conditioning for every stage and step. A prompt without A1111's edits (`[from:to:when]`,
`[a|b]`: prompt_schedule.py) is encoded once for all stages, as it always was. One with them is read per stage, in
that stage's own steps (a refine stage running 12 steps switches `[cat:dog:0.5]` after its 6th), and each distinct
text (prompt and negative together) is encoded once for the job."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..base.plan import Plan
from ..models.loading import Components
from .prompt_schedule import is_scheduled, schedule, text_at
from .text import Conditioning, TextOptions, encode_prompt


@dataclass
class JobText:
    """The conditioning of the job's first step, and for stages whose prompt changes, each step's."""

    first: Conditioning
    per_step: dict[int, list[Conditioning]] = field(default_factory=dict)  # stage index -> one per sampler step
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def job_text(
    comps: Components,
    prompt: str,
    negative: str,
    guidance: float,
    plan: Plan,
    device: torch.device,
    options: TextOptions,
) -> JobText:
    """Encode what the job's stages need (see the module docstring)."""
    encoded: dict[tuple[str, str], Conditioning] = {}

    def cond(text: str, negative_text: str) -> Conditioning:
        if (text, negative_text) not in encoded:
            encoded[text, negative_text] = encode_prompt(comps, text, negative_text, guidance, device, options=options)
        return encoded[text, negative_text]

    if not is_scheduled(prompt) and not is_scheduled(negative):
        first = cond(prompt, negative)
        return JobText(first, notes=list(first.notes), warnings=list(first.warnings))
    per_step: dict[int, list[Conditioning]] = {}
    for stage in plan.stages:
        steps = max(stage.steps, 1)
        texts, negatives = schedule(prompt, steps), schedule(negative, steps)
        per_step[stage.index] = [cond(text_at(texts, i), text_at(negatives, i)) for i in range(steps)]
    made = list(encoded.values())
    notes = list(dict.fromkeys(n for c in made for n in c.notes))
    warnings = list(dict.fromkeys(w for c in made for w in c.warnings))
    notes.append(f"prompt editing: {len(made)} texts encoded, switched per step in each stage's own steps")
    return JobText(per_step[plan.stages[0].index][0], per_step, notes, warnings)
