"""Prompt files: every format, errors that name file, line and field, precedence of the layers."""

from __future__ import annotations

from pathlib import Path

import pytest

from linfusion_cli.base.errors import JobFileError
from linfusion_cli.core.jobs import read_job_file, resolve_job
from linfusion_cli.core.settings import FLAGS


def write(tmp_path: Path, name: str, text: str | bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


def test_txt(tmp_path: Path) -> None:
    jobs = read_job_file(write(tmp_path, "p.txt", "# comment\n\na red fox\n  a blue bird  \n"))
    assert [r.values["prompt"] for r in jobs.rows] == ["a red fox", "a blue bird"]
    assert jobs.rows[1].where == "p.txt line 4 (job 1)"


def test_yaml_list_and_defaults(tmp_path: Path) -> None:
    jobs = read_job_file(write(tmp_path, "p.yaml", "- a fox\n- prompt: a bird\n  seed: 3\n"))
    assert [r.values for r in jobs.rows] == [{"prompt": "a fox"}, {"prompt": "a bird", "seed": 3}]
    jobs = read_job_file(write(tmp_path, "q.yml", "defaults:\n  size: 1024\njobs:\n  - a fox\n  - prompt: b\n"))
    assert jobs.defaults == {"size": 1024} and len(jobs.rows) == 2
    assert jobs.rows[1].where == "q.yml line 5 (job 1)"


def test_jsonl_and_csv(tmp_path: Path) -> None:
    jobs = read_job_file(write(tmp_path, "p.jsonl", '{"prompt": "a", "seed": 1}\n\n{"prompt": "b", "steps": 20}\n'))
    assert [r.values for r in jobs.rows] == [{"prompt": "a", "seed": 1}, {"prompt": "b", "steps": 20}]
    jobs = read_job_file(write(tmp_path, "p.csv", 'prompt,seed,strengths\na fox,7,"0.4,0.2"\nb,,\n'))
    assert jobs.rows[0].values == {"prompt": "a fox", "seed": 7, "strengths": [0.4, 0.2]}
    assert jobs.rows[1].values == {"prompt": "b"}


def test_bom_and_non_utf8(tmp_path: Path) -> None:
    assert read_job_file(write(tmp_path, "bom.txt", b"\xef\xbb\xbfa fox\n")).rows[0].values["prompt"] == "a fox"
    with pytest.raises(JobFileError, match=r"bad.txt line 2: not UTF-8"):
        read_job_file(write(tmp_path, "bad.txt", b"a fox\nsa\xe9ta\n"))


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("e.yaml", "- prompt: a\n- prompt: b\n  stepz: 3\n", r"e.yaml line 3 \(job 1\): unknown field 'stepz'"),
        ("e.yaml", "- prompt: a\n  seed: lots\n", r"e.yaml line 2 \(job 0\): field 'seed' must be a whole number"),
        ("e.yaml", "- prompt: ''\n", r"e.yaml line 1 \(job 0\): the prompt is empty"),
        ("e.yaml", "defaults: {}\njob: []\n", r"unknown top-level key"),
        ("e.yaml", "- [unclosed\n", r"e.yaml line 2: not valid YAML"),
        (
            "e.jsonl",
            '{"prompt": "a"}\n{"prompt": "b", "guidance": "high"}\n',
            r"e.jsonl line 2 \(job 1\): field 'guidance'",
        ),
        ("e.jsonl", '{"prompt": "a"}\nnot json\n', r"e.jsonl line 2 \(job 1\): not valid JSON"),
        ("e.csv", "prompt,steps\na,10\nb,ten\n", r"e.csv line 3 \(job 1\): field 'steps' must be a whole number"),
        ("e.csv", "prompt,colour\na,red\n", r"e.csv line 2 \(job 0\): unknown field 'colour'"),
        ("e.txt", "# nothing\n\n", r"e.txt: no jobs in the file .*: nothing to do"),
        ("e.toml", "x", r"unknown prompt file type"),
        ("e.yaml", "- prompt: a\n  size: 0\n", r"field 'size' must be between 64 and 65536"),
    ],
)
def test_errors_name_file_line_and_field(tmp_path: Path, name: str, text: str, message: str) -> None:
    path = write(tmp_path, name, text)
    with pytest.raises(JobFileError, match=message):
        read_job_file(path)


def test_yaml_is_loaded_safely(tmp_path: Path) -> None:
    path = write(tmp_path, "evil.yaml", "- !!python/object/apply:os.system ['touch pwned']\n")
    with pytest.raises(JobFileError):
        read_job_file(path)
    assert not (tmp_path / "pwned").exists()


def test_precedence_defaults_preset_file_row_flags(tmp_path: Path) -> None:
    """built-in defaults < preset < file defaults < job row < flags."""
    jobs = read_job_file(
        write(
            tmp_path,
            "p.yaml",
            (
                "defaults:\n  preset: sd15-16k\n  steps: 30\n  guidance: 5.0\n"
                "jobs:\n  - prompt: a\n    guidance: 6.0\n    scheduler: euler\n"
            ),
        )
    )
    row = jobs.rows[0]
    job = resolve_job({"scheduler": "unipc"}, file_defaults=jobs.defaults, row=row.values, row_label=row.where)
    assert job.negative == ""  # built-in default
    assert job.base_size == 1024 and job.sources["base_size"] == "preset sd15-16k"  # preset
    assert job.steps == 30 and job.sources["steps"] == "file defaults"  # file defaults beat the preset (50)
    assert job.guidance == 6.0 and job.sources["guidance"] == row.where  # row beats file defaults
    assert job.scheduler == "unipc" and job.sources["scheduler"] == FLAGS  # flags beat the row
