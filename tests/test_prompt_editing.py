"""A1111's prompt editing and alternation: `[from:to:when]`, `[to:when]`, `[from::when]`, `[a|b]`, read as A1111
reads them (its step of change, its off-by-one), per stage in each stage's own steps, and switched per step in the
denoising loop; what A1111 parses that this tool does not is a warning."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from linfusion_cli.base.plan import Plan, StagePlan
from linfusion_cli.engine.prompt_schedule import is_scheduled, schedule, text_at

STEPS = 20


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        # A1111 1.10's get_learned_conditioning_prompt_schedules for 20 steps
        ("a [cat:dog:0.5] in snow", [(10, "a cat in snow"), (20, "a dog in snow")]),
        ("a [cat:dog:7] in snow", [(7, "a cat in snow"), (20, "a dog in snow")]),
        ("a [dog:0.25] fox", [(5, "a  fox"), (20, "a dog fox")]),
        ("a [dog::0.25] fox", [(5, "a dog fox"), (20, "a  fox")]),
        ("[(red:1.2) fox:dog:0.3], [blurry]", [(6, "(red:1.2) fox, [blurry]"), (20, "dog, [blurry]")]),
        ("[[a|b]:c:0.1]", [(1, "a"), (2, "b"), *((step, "c") for step in range(3, 21))]),  # every step, as A1111
        ("no edit (here:1.1) [x] 16:9", [(20, "no edit (here:1.1) [x] 16:9")]),
        (r"\[a:b:0.5\] literal", [(20, r"\[a:b:0.5\] literal")]),
        ("unclosed [a:b:0.5", [(20, "unclosed [a:b:0.5")]),
        ("[a:b:1.0]", [(20, "a")]),
    ],
)
def test_schedules_are_a1111s(prompt: str, expected: list[tuple[int, str]]) -> None:
    assert schedule(prompt, STEPS) == expected
    assert is_scheduled(prompt) == (len(expected) > 1 or "[a:b:1.0]" == prompt)


def test_alternation_takes_each_option_in_turn_as_a1111_picks_steps() -> None:
    pairs = schedule("a [cat|dog] fox", 4)
    assert pairs == [(1, "a cat fox"), (2, "a dog fox"), (3, "a cat fox"), (4, "a dog fox")]
    # A1111's reconstruct_cond_batch: step i (from 0) takes the first pair ending at or after i
    assert [text_at(pairs, i) for i in range(4)] == ["a cat fox", "a cat fox", "a dog fox", "a cat fox"]


@pytest.fixture(scope="module")
def tiny():
    from linfusion_cli.models.loading import build_random

    return build_random("tiny")


def _plan(*steps: int) -> Plan:
    from linfusion_cli.base.sizes import resolve_target

    stages = tuple(StagePlan(i, 64, 64, None if i == 0 else 0.5, s) for i, s in enumerate(steps))
    return Plan(resolve_target(64, "1:1", None, None), stages, steps[0], 64, "sdedit")


def test_each_stage_switches_in_its_own_steps_and_each_text_is_encoded_once(tiny) -> None:
    from linfusion_cli.engine.prompts import job_text
    from linfusion_cli.engine.text import TextOptions, encode_prompt

    text = job_text(tiny, "a [cat:dog:0.5]", "blurry", 7.5, _plan(10, 4), torch.device("cpu"), TextOptions())
    base, refine = text.per_step[0], text.per_step[1]
    cat, dog = base[0], base[-1]
    assert [c is cat for c in base] == [True] * 6 + [False] * 4  # when = 5 of 10: steps 0..5 (A1111's <=)
    assert [c is cat for c in refine] == [True] * 3 + [False]  # when = 2 of 4
    assert all(c is cat or c is dog for c in base + refine)
    torch.testing.assert_close(dog.embeds, encode_prompt(tiny, "a dog", "blurry", 7.5, torch.device("cpu")).embeds)
    static = job_text(tiny, "a cat", "", 7.5, _plan(10, 4), torch.device("cpu"), TextOptions())
    assert static.per_step == {}


def test_the_denoising_loop_hands_the_unet_each_steps_text(tiny) -> None:
    from linfusion_cli.engine.noise import NoiseSource
    from linfusion_cli.engine.sampling import StageInputs, denoise, stage_timesteps
    from linfusion_cli.engine.schedulers import make_scheduler
    from linfusion_cli.engine.text import encode_prompt

    cpu = torch.device("cpu")
    conds = [encode_prompt(tiny, text, "", 1.0, cpu) for text in ("a cat", "a dog", "a bird")]
    seen: list[torch.Tensor] = []

    class Recording(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, sample, t, encoder_hidden_states, **kwargs):
            seen.append(encoder_hidden_states)
            return (sample * 0.1,)

    scheduler = make_scheduler("heun", tiny.scheduler_config)  # two model calls per step
    timesteps = stage_timesteps(scheduler, 3, 3, cpu, img2img=False)
    inputs = StageInputs(conds[0], 1.0, (64, 64), per_step=conds)
    denoise(
        Recording(),
        scheduler,
        torch.randn(1, 4, 8, 8),
        timesteps,
        inputs,
        NoiseSource(torch.Generator()),
        lambda *a: None,
    )
    texts = [next(i for i, c in enumerate(conds) if torch.equal(c.embeds, h)) for h in seen]
    assert len(seen) == 5 and texts == [0, 0, 1, 1, 2]  # 5 calls over 3 steps: each call with its step's text


def test_a_scheduled_prompt_makes_its_own_image_and_and_is_a_warning(runner, tmp_path) -> None:
    from linfusion_cli.cli.commands import app

    args = ["--model", "tiny", "--size", "64", "--steps", "4", "--seed", "4", "--json", "-q", "--out", str(tmp_path)]
    made = [
        json.loads(runner.invoke(app, ["generate", prompt, *args]).stdout)["path"]
        for prompt in ("[a red fox:a blue bird:0.5]", "a red fox", "a blue bird")
    ]
    edited, fox, bird = (np.asarray(Image.open(path)) for path in made)
    assert not np.array_equal(edited, fox) and not np.array_equal(edited, bird)
    plan = json.loads(runner.invoke(app, ["plan", "a cat AND a dog", "--model", "tiny", "--json"]).stdout)
    assert any("'AND' in the prompt is read as a word" in str(note) for note in plan["notes"])
