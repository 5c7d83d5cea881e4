"""Property-based tests: the parsers, the name sanitiser and the planner hold their promises for any input."""

from __future__ import annotations

import itertools
import json
import math
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from linfusion_cli.base.errors import JobFileError, UsageError
from linfusion_cli.base.sizes import MAX_SIDE, MIN_SIDE, parse_aspect, resolve_target
from linfusion_cli.core.jobs import read_job_file
from linfusion_cli.core.planning import make_plan
from linfusion_cli.io.names import sanitize_name
from linfusion_cli.io.output import OutputPaths

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(st.text(max_size=400))
def test_sanitised_names_are_safe(text: str) -> None:
    name = sanitize_name(text)
    assert name and len(name) <= 120
    assert "/" not in name and "\\" not in name and "\x00" not in name
    assert not name.startswith(".") and name not in ("..", ".")
    assert all(c.isascii() and (c.isalnum() or c in "._-") for c in name)
    assert sanitize_name(name) == name  # idempotent
    folder = Path(tempfile.gettempdir()) / "linfusion-prop"
    OutputPaths.for_stem(folder, name, "png")  # never escapes the folder (raises if it would)


@FAST
@given(st.one_of(st.integers(-10, 70000), st.none()), st.floats(0.01, 100), st.floats(0.01, 100))
def test_targets_are_valid_or_refused(size: int | None, aw: float, ah: float) -> None:
    try:
        target = resolve_target(size, f"{aw}:{ah}")
    except UsageError:
        return
    assert target.width % 8 == 0 and target.height % 8 == 0
    assert MIN_SIDE <= min(target.width, target.height) and max(target.width, target.height) <= MAX_SIDE
    if size is not None:
        assert abs(target.long_side - size) <= 4
    # the shape is kept within the rounding of the short side
    assert abs(target.width / target.height - aw / ah) <= (aw / ah) * 8 / min(target.width, target.height) + 1e-9


@FAST
@given(st.text(max_size=30))
def test_aspect_parser_never_crashes(text: str) -> None:
    try:
        w, h = parse_aspect(text)
    except UsageError:
        return
    assert w > 0 and h > 0 and math.isfinite(w) and math.isfinite(h)


@FAST
@given(
    st.integers(64, 65536),
    st.sampled_from(["1:1", "16:9", "9:16", "2:1", "3:2", "21:9"]),
    st.sampled_from([128, 512, 768, 1024]),
    st.integers(1, 150),
    st.one_of(st.none(), st.integers(256, 2048)),
)
def test_plans_end_exactly_at_the_target(size: int, aspect: str, native: int, steps: int, base: int | None) -> None:
    try:
        target = resolve_target(size, aspect)
    except UsageError:
        return
    plan = make_plan(target, native=native, schedule_steps=steps, base_size=base)
    last = plan.stages[-1]
    assert (last.width, last.height) == (target.width, target.height)
    assert plan.stages[0].strength is None and plan.stages[0].steps == steps
    longs = [max(s.width, s.height) for s in plan.stages]
    assert all(b > a for a, b in itertools.pairwise(longs))  # always growing
    assert all(b / a <= 2.5 + 1e-6 for a, b in itertools.pairwise(longs))  # never more than 2.5x a step
    for stage in plan.stages:
        assert stage.width % 8 == 0 and stage.height % 8 == 0
        if stage.strength is not None:
            assert 0 < stage.strength <= 0.4 and 1 <= stage.steps <= steps
    strengths = [s.strength for s in plan.refine_stages]
    assert strengths == sorted(strengths, reverse=True)


NO_NUL = st.characters(blacklist_characters="\x00")  # a prompt with a NUL is refused (PNG text cannot hold it)
job_values = st.fixed_dictionaries(
    {"prompt": st.text(NO_NUL, min_size=1, max_size=80).filter(lambda t: t.strip())},
    optional={
        "seed": st.integers(0, 2**40),
        "steps": st.integers(1, 1000),
        "guidance": st.floats(0, 50),
        "aspect": st.sampled_from(["1:1", "16:9"]),
        "negative": st.text(NO_NUL, max_size=40),
    },
)


@FAST
@given(st.lists(job_values, min_size=1, max_size=8))
def test_jsonl_rows_round_trip(rows: list[dict]) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "jobs.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        parsed = read_job_file(path)
    assert [r.values for r in parsed.rows] == rows


@FAST
@given(st.binary(max_size=600), st.sampled_from([".txt", ".yaml", ".jsonl", ".csv"]))
@example(b"\r\x01", ".csv")  # a lone carriage return once escaped as the csv module's own error
@example(b"prompt\r\na cat\rdog\r", ".csv")
def test_any_bytes_parse_or_fail_cleanly(data: bytes, suffix: str) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"jobs{suffix}"
        path.write_bytes(data)
        try:
            parsed = read_job_file(path)
        except JobFileError as exc:
            assert str(exc)  # a message, not a crash
            return
    for row in parsed.rows:
        assert row.where.startswith("jobs") and isinstance(row.values, dict)
