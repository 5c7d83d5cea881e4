"""Sizes, aspects, field validation and precedence."""

from __future__ import annotations

import pytest

from linfusion_cli.base.errors import UsageError
from linfusion_cli.base.sizes import parse_aspect, resolve_target
from linfusion_cli.core.jobs import resolve_job
from linfusion_cli.core.layers import merge_layers, validate_layer
from linfusion_cli.core.settings import FLAGS


@pytest.mark.parametrize(
    ("kwargs", "expected", "rounded"),
    [
        ({"size": 1024, "aspect": "16:9"}, (1024, 576), False),
        ({"size": 1000, "aspect": "16:9"}, (1000, 560), True),
        ({"size": 1024, "aspect": "9:16"}, (576, 1024), False),
        ({"size": 16384, "aspect": "2:1"}, (16384, 8192), False),
        ({"size": 1001}, (1000, 1000), True),
        ({"width": 1920, "height": 1080}, (1920, 1080), False),
        ({"width": 1920, "aspect": "16:9"}, (1920, 1080), False),
        ({"height": 1000, "aspect": "3x2"}, (1504, 1000), True),
        ({"size": 1024, "aspect": "1.5"}, (1024, 680), True),
    ],
)
def test_resolve_target(kwargs: dict, expected: tuple[int, int], rounded: bool) -> None:
    target = resolve_target(kwargs.pop("size", None), **kwargs)
    assert (target.width, target.height) == expected
    assert target.width % 8 == 0 and target.height % 8 == 0
    assert (target.note is not None) == rounded


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"size": 0}, "impossible"),
        ({"size": -5}, "impossible"),
        ({"size": 70000}, "impossible"),
        ({"size": 1024, "width": 512}, "not both"),
        ({"size": 100, "aspect": "16:1"}, "too small"),
    ],
)
def test_impossible_targets(kwargs: dict, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        resolve_target(kwargs.pop("size", None), **kwargs)


@pytest.mark.parametrize("text", ["0:1", "1:0", "-1:2", "a:b", "1:2:3", "inf:1", "nan:1", "", "100:1"])
def test_bad_aspects(text: str) -> None:
    with pytest.raises(UsageError):
        parse_aspect(text)


def test_validate_layer_names_file_line_and_field() -> None:
    with pytest.raises(UsageError, match=r"jobs.yaml line 3: field 'steps' must be a whole number"):
        validate_layer({"steps": "many"}, where="jobs.yaml line 3")
    with pytest.raises(UsageError, match=r"unknown field 'colour'"):
        validate_layer({"colour": "red"}, where="x")
    with pytest.raises(UsageError, match=r"--guidance: must be between 0 and 50"):
        validate_layer({"guidance": 99.0}, where=FLAGS)
    assert validate_layer({"steps": "30", "strengths": "0.4,0.2"}, where="csv", from_text=True) == {
        "steps": 30,
        "strengths": [0.4, 0.2],
    }
    with pytest.raises(UsageError, match="true or false"):
        validate_layer({"low_vram": "maybe"}, where="x", from_text=True)


def test_empty_prompt_is_refused() -> None:
    with pytest.raises(UsageError, match="prompt is empty"):
        merge_layers([("row 1", {"prompt": "   "})])


def test_precedence_preset_then_flags() -> None:
    job = resolve_job({"prompt": "p", "preset": "sd15-16k", "steps": 20})
    assert job.size == 16384 and job.base_size == 1024  # from the preset
    assert job.steps == 20 and job.sources["steps"] == FLAGS  # the flag wins
    assert job.sources["size"] == "preset sd15-16k"


def test_the_typed_view_of_a_job_lists_every_setting_with_its_type() -> None:
    """base/job.py is what mypy reads `job.<setting>` against: it must list the table as it is (rewrite it with
    `python -m linfusion_cli.core.job_types` after declaring a setting)."""
    from linfusion_cli.base.job import Job
    from linfusion_cli.core.job_types import JOB_MODULE, job_module
    from linfusion_cli.core.jobspec import JobSpec
    from linfusion_cli.core.settings import table

    assert JOB_MODULE.read_text() == job_module(), "base/job.py is stale: python -m linfusion_cli.core.job_types"
    job = JobSpec(steps=20)
    assert job.steps == 20 and job.value("steps") == 20 and job.seed is None
    assert set(Job.__annotations__) == set(table())
    with pytest.raises(AttributeError, match="no job setting 'cosine_scale1'"):
        _ = job.cosine_scale1
