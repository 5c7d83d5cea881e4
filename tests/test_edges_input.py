"""Input a person types: values in any case, numbers read alike from every source, one numbering in
every message (jobs from 0, lines from 1 as an editor counts), limits in plain digits, text files that are not
UTF-8 refused naming the line. Nothing here loads a model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from linfusion_cli.base.errors import JobFileError
from linfusion_cli.cli.commands import app
from linfusion_cli.core.jobs import read_job_file


def write(tmp_path: Path, name: str, text: str | bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


def plan_json(runner, *args: str) -> dict:
    result = runner.invoke(app, ["plan", "x", "--model", "tiny", "--size", "256", "--json", *args])
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def test_choice_values_in_any_case(runner, no_model_loads) -> None:
    assert plan_json(runner, "--refine", "DemoFusion")["refine"] == "demofusion"
    assert plan_json(runner, "--scheduler", "EULER-A")["scheduler"] == "euler-a"


def test_an_unknown_value_gets_a_did_you_mean(runner, no_model_loads) -> None:
    result = runner.invoke(app, ["plan", "x", "--scheduler", "euler_a"])
    assert result.exit_code == 2 and "did you mean euler-a?" in result.stderr


def test_csv_headers_in_any_case(tmp_path: Path) -> None:
    rows = read_job_file(write(tmp_path, "p.csv", "Prompt,Seed,Base-Size\na fox,42,1k\n")).rows
    assert rows[0].values == {"prompt": "a fox", "seed": 42, "base_size": 1024}


def test_one_field_spelt_twice_is_refused(tmp_path: Path) -> None:
    with pytest.raises(JobFileError, match=r"'prompt' and 'Prompt' are the same field"):
        read_job_file(write(tmp_path, "p.jsonl", '{"prompt": "a", "Prompt": "b"}\n'))


def test_yaml_numbers_are_read_as_csv_cells_are(tmp_path: Path) -> None:
    text = '- prompt: a\n  steps: 20.0\n  seed: "42"\n  guidance: "7"\n  strengths: 0.3\n  low_vram: "yes"\n'
    values = read_job_file(write(tmp_path, "p.yaml", text)).rows[0].values
    assert values == {"prompt": "a", "steps": 20, "seed": 42, "guidance": 7.0, "strengths": [0.3], "low_vram": True}
    with pytest.raises(JobFileError, match=r"field 'steps' must be a whole number, got 20.5"):
        read_job_file(write(tmp_path, "q.yaml", "- prompt: a\n  steps: 20.5\n"))


def test_an_unknown_field_names_the_close_one_only(tmp_path: Path) -> None:
    with pytest.raises(JobFileError) as caught:
        read_job_file(write(tmp_path, "p.jsonl", '{"promt": "a"}\n'))
    assert "did you mean prompt?" in str(caught.value) and "known:" not in str(caught.value)


@pytest.mark.parametrize(
    ("name", "text", "where"),
    [
        ("p.yaml", "- prompt: a\n- prompt: b\n  seed: 1\n  steps: x\n", "p.yaml line 4 (job 1): field 'steps'"),
        ("p.yaml", "defaults:\n  size: 64\n  steps: x\njobs: [a]\n", "p.yaml line 3 (defaults): field 'steps'"),
        ("p.csv", 'prompt,steps\n"a\nb",1\nc,x\n', "p.csv line 4 (job 1): field 'steps'"),
        ("p.txt", "# c\n\na\n" + "b" * 10_001 + "\n", "p.txt line 4 (job 1): field 'prompt'"),
        ("p.jsonl", '{"prompt": "a"}\n\n{"prompt": "b", "seed": "x"}\n', "p.jsonl line 3 (job 1): field 'seed'"),
    ],
)
def test_one_numbering_jobs_from_0_lines_as_an_editor_counts(tmp_path: Path, name: str, text: str, where: str) -> None:
    with pytest.raises(JobFileError) as caught:
        read_job_file(write(tmp_path, name, text))
    assert str(caught.value).startswith(where)


@pytest.mark.parametrize(
    ("data", "line"),
    [
        (b"a fox\nb\x00dog\n", 2),
        ("a fox\nb dog\n".encode("utf-16-le"), 1),  # UTF-16 without a byte-order mark
    ],
)
def test_nul_bytes_are_refused_naming_the_line(tmp_path: Path, data: bytes, line: int) -> None:
    with pytest.raises(JobFileError, match=rf"p.txt line {line}: a NUL byte.*re-save the file as UTF-8"):
        read_job_file(write(tmp_path, "p.txt", data))


def test_utf16_with_its_bom_is_read(tmp_path: Path) -> None:
    rows = read_job_file(write(tmp_path, "p.txt", "a café\n".encode("utf-16"))).rows
    assert rows[0].values["prompt"] == "a café"


def test_a_nul_in_a_json_prompt_is_refused(tmp_path: Path) -> None:
    with pytest.raises(JobFileError, match=r"p.jsonl line 1 \(job 0\): field 'prompt' .*NUL"):
        read_job_file(write(tmp_path, "p.jsonl", '{"prompt": "a\\u0000b"}\n'))


def test_seed_limits_in_plain_digits(runner, no_model_loads) -> None:
    result = runner.invoke(app, ["plan", "x", "--seed", "99999999999999999999"])
    assert result.exit_code == 2
    assert "must be -1 (random) or 0 to 9223372036854775807" in result.stderr and "e+18" not in result.stderr


@pytest.mark.parametrize("flag", ["--lora", "--controlnet", "--ip-adapter"])
def test_too_many_colon_parts_in_an_adapter(runner, no_model_loads, flag: str) -> None:
    result = runner.invoke(app, ["plan", "x", "--model", "tiny", flag, "tiny:0.5:1"])
    assert result.exit_code == 2
    assert f"{flag}: too many ':' parts in 'tiny:0.5:1'" in result.stderr and "not a number" not in result.stderr


def test_a_size_of_x_says_what_a_size_is(tmp_path: Path) -> None:
    with pytest.raises(JobFileError, match=r"must be one side like 4096 or 16k, or WxH like 4096x2048, got 'x'"):
        read_job_file(write(tmp_path, "p.yaml", "- prompt: a\n  size: x\n"))


def test_a_preset_mixed_with_your_size_says_what_it_still_sets_and_adapts_its_strengths(runner, no_model_loads) -> None:
    result = runner.invoke(app, ["plan", "--preset", "sd15-16k", "--size", "4k", "--json"])
    assert result.exit_code == 0, result.stderr
    plan = json.loads(result.stdout)
    assert (plan["width"], plan["height"]) == (4096, 2048)
    assert [s["strength"] for s in plan["stages"][1:]] == [0.4, 0.1]  # the preset's curve, first and last kept
    notes = " ".join(plan["notes"])
    assert "from preset sd15-16k: aspect 2:1, base_size 1024, strengths 0.4,0.3,0.2,0.1" in notes
    assert "its size 16384 replaced by yours" in notes and "(--strengths chooses)" in notes


def test_strengths_a_person_wrote_are_still_checked(runner, no_model_loads, tmp_path: Path) -> None:
    result = runner.invoke(app, ["plan", "--size", "4k", "--strengths", "0.4,0.3"])
    assert result.exit_code == 2 and "--strengths has 2 values but this plan has 3 refine stages" in result.stderr
    jobs = write(tmp_path, "p.yaml", "- prompt: a\n  size: 1024\n  strengths: [0.4, 0.3, 0.2, 0.1, 0.05]\n")
    bad = runner.invoke(app, ["batch", str(jobs), "--dry-run"])
    assert bad.exit_code == 2 and "p.yaml line 1 (job 0) gives 5 strengths" in bad.stderr
    one_stage = runner.invoke(app, ["plan", "--model", "tiny", "--size", "128", "--strengths", "0.3", "--json"])
    assert one_stage.exit_code == 0 and "strengths ignored: one stage" in one_stage.stdout
