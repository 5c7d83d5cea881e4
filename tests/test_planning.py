"""Stage plans: sizes, strengths and steps for a table of targets."""

from __future__ import annotations

import pytest

from linfusion_cli.base.errors import UsageError
from linfusion_cli.base.sizes import resolve_target
from linfusion_cli.core.planning import make_plan
from linfusion_cli.engine.refine.sdedit import default_strengths, refine_steps


def sizes(plan) -> list[str]:
    return [s.size_text for s in plan.stages]


@pytest.mark.parametrize(
    ("size", "aspect", "native", "base", "expected"),
    [
        (2048, "1:1", 512, None, ["512x512", "1024x1024", "2048x2048"]),
        (16384, "2:1", 512, 1024, ["1024x512", "2048x1024", "4096x2048", "8192x4096", "16384x8192"]),  # published
        (16384, "1:1", 512, None, ["512x512", "1024x1024", "2048x2048", "4096x4096", "8192x8192", "16384x16384"]),
        (1024, "16:9", 128, None, ["128x72", "256x144", "512x288", "1024x576"]),
        (3840, "16:9", 512, None, ["512x288", "1024x576", "2048x1152", "3840x2160"]),
        (1104, "1:1", 512, None, ["512x512", "1104x1104"]),  # one 2.16x step, not 2x then 1.08x
        (1400, "1:1", 512, None, ["512x512", "1024x1024", "1400x1400"]),
        (600, "1:1", 512, None, ["600x600"]),  # within 1.25x of native: no refinement
        (256, "1:1", 512, None, ["256x256"]),  # below native
        (2000, "3:4", 768, None, ["576x768", "1152x1536", "1504x2000"]),  # SD-2 native, portrait
        (8192, "9:16", 1024, None, ["576x1024", "1152x2048", "2304x4096", "4608x8192"]),  # SDXL portrait
    ],
)
def test_stage_sizes(size: int, aspect: str, native: int, base: int | None, expected: list[str]) -> None:
    plan = make_plan(resolve_target(size, aspect), native=native, base_size=base)
    assert sizes(plan) == expected
    assert plan.stages[0].strength is None and all(s.strength is not None for s in plan.stages[1:])
    assert plan.stages[-1].width * plan.stages[-1].height == plan.target.width * plan.target.height


def test_published_strengths_and_steps() -> None:
    plan = make_plan(resolve_target(16384, "2:1"), native=512, base_size=1024, schedule_steps=50)
    assert [s.strength for s in plan.refine_stages] == [0.4, 0.3, 0.2, 0.1]
    assert [s.steps for s in plan.stages] == [50, 20, 15, 10, 5]


def test_default_strengths_fall_linearly() -> None:
    assert default_strengths(1) == [0.4]
    assert default_strengths(2) == [0.4, 0.1]
    assert default_strengths(5) == [0.4, 0.325, 0.25, 0.175, 0.1]
    assert default_strengths(0) == []


def test_refine_steps() -> None:
    assert refine_steps(50, 0.325) == 16
    assert refine_steps(5, 0.1) == 1  # never 0 for a positive strength
    assert refine_steps(50, 0.0) == 0


def test_strength_override_count_must_match() -> None:
    target = resolve_target(2048, "1:1")
    plan = make_plan(target, native=512, strengths=[0.5, 0.2])
    assert [s.strength for s in plan.refine_stages] == [0.5, 0.2]
    with pytest.raises(UsageError, match=r"has 3 value.*2 refine stage.*512x512 -> 1024x1024 -> 2048x2048"):
        make_plan(target, native=512, strengths=[0.5, 0.2, 0.1])


def test_upscale_plan_starts_from_the_input() -> None:
    target = resolve_target(4096, "700:500")
    plan = make_plan(target, native=512, input_size=(700, 500))
    assert plan.from_image and all(s.strength is not None for s in plan.stages)
    assert sizes(plan) == ["1400x1000", "2800x2000", "4096x2928"]
    with pytest.raises(UsageError, match="smaller than the input"):
        make_plan(resolve_target(512, "1:1"), native=512, input_size=(700, 700))


def test_plan_and_engine_choose_the_same_memory_settings() -> None:
    """`plan` and the engine ask one MemoryPlanner: the settings a plan shows are the ones a run starts with."""
    import torch

    from linfusion_cli.core.jobs import resolve_job
    from linfusion_cli.core.plan_report import plan_summary
    from linfusion_cli.core.prepare import RunOptions, plan_for
    from linfusion_cli.core.run import job_planner
    from linfusion_cli.engine.memory import placed
    from linfusion_cli.engine.memory_model import StageShape, stage_shape
    from linfusion_cli.engine.pipeline import Engine
    from linfusion_cli.models.loading import build_random

    job = resolve_job({"prompt": "p", "model": "tiny", "size": 4096, "max_vram": 0.75})
    prep = plan_for(job, RunOptions(), seed=1)
    shown = [s["memory"] for s in plan_summary(prep, placed(torch.device("cpu"), torch.float32))["stages"]]
    engine = Engine.from_components(build_random("tiny"), "none", torch.device("cpu"), torch.float32)
    planner = job_planner(prep, engine)  # the planner the run uses: the plan's, with what the engine measured
    used = [planner.choose(stage_shape(prep.plan, s)).settings.name for s in prep.plan.stages]
    assert shown == used
    assert shown[0] == "fast" and shown[-1] != "fast"  # the budget really binds at 4096 px
    assert not planner.choose(StageShape(16384, 16384, previous=(8192, 8192))).fits


def test_notes_name_what_is_ignored_and_the_right_reason() -> None:
    target = resolve_target(2048, "1:1")
    plan = make_plan(target, native=512, strengths=[0.3, 0.2], first_strength=0.5)
    assert [n.level for n in plan.notes if "--strength 0.5 is ignored" in n.message] == ["warning"]
    single = make_plan(target, native=512, base_size=4096)
    assert [n.level for n in single.notes if "below --base-size 4096" in n.message] == ["info"]
    rounded = make_plan(resolve_target(1000, "16:9"), native=512)
    assert [n.level for n in rounded.notes if "rounded to" in n.message] == ["warning"]  # each note's own level
    assert not any("native" in note.message for note in single.notes)


def test_an_upscale_to_another_shape_says_it_stretches() -> None:
    from linfusion_cli.core.jobs import resolve_job
    from linfusion_cli.core.prepare import RunOptions, prepare

    stretched = prepare(
        resolve_job({"prompt": "", "width": 512, "height": 512}, require_prompt=False),
        RunOptions(),
        native=128,
        seed=1,
        input_size=(200, 160),
    )
    assert any("is stretched to 512x512" in note.message for note in stretched.notes)
    kept = prepare(
        resolve_job({"prompt": "", "size": 512}, require_prompt=False),
        RunOptions(),
        native=128,
        seed=1,
        input_size=(200, 160),
    )
    assert not any("stretched" in note.message for note in kept.notes)
