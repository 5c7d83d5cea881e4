"""What a new user types at the command line: an option given where a value goes, a misspelt command,
--prompt on a command whose prompt is an argument, numbers typer converts, precision aliases, an empty prompt,
and plans for a device this machine does not have. Nothing here loads a model."""

from __future__ import annotations

import json

import pytest

from linfusion_cli.cli.commands import app


def test_an_option_is_not_taken_as_the_value_of_another(runner, no_model_loads) -> None:
    result = runner.invoke(app, ["generate", "x", "--negative", "--dry-run", "--model", "tiny"])
    assert result.exit_code == 2
    assert "--negative needs a value, but the next word is the option --dry-run" in result.stderr
    assert "--negative=--dry-run" in result.stderr
    result = runner.invoke(
        app, ["generate", "x", "--negative=--dry-run", "--dry-run", "--model", "tiny", "--size", "256"]
    )
    assert result.exit_code == 0, result.stderr


@pytest.mark.parametrize(("typed", "meant"), [("gen", "generate"), ("pla", "plan"), ("upscal", "upscale")])
def test_a_misspelt_command_gets_a_did_you_mean(runner, typed: str, meant: str) -> None:
    result = runner.invoke(app, [typed, "x"])
    assert result.exit_code == 2 and f"no such command '{typed}' (did you mean {meant}?)" in result.stderr


@pytest.mark.parametrize("command", ["generate", "plan"])
def test_prompt_as_an_option_says_it_is_the_first_argument(runner, command: str) -> None:
    result = runner.invoke(app, [command, "--prompt", "x"])
    assert result.exit_code == 2
    assert f'the prompt is the first argument, in quotes: linfusion {command} "a red fox"' in result.stderr


def test_typers_own_numbers_are_refused_in_our_words(runner) -> None:
    result = runner.invoke(app, ["upscale", "a.png", "--max-input-pixels", "1.5"])
    assert result.exit_code == 2
    assert "--max-input-pixels: must be a whole number, got '1.5'" in result.stderr
    assert "unable to parse" not in result.stderr


def test_an_empty_prompt_gets_no_upscale_hint(runner, no_model_loads) -> None:
    result = runner.invoke(app, ["generate", "", "--model", "tiny"])
    assert result.exit_code == 2
    assert "the prompt is empty: say what to draw" in result.stderr and "upscale" not in result.stderr


@pytest.mark.parametrize(("typed", "flag"), [("float16", "fp16"), ("half", "fp16"), ("FLOAT32", "fp32")])
def test_precision_aliases(runner, no_model_loads, typed: str, flag: str) -> None:
    result = runner.invoke(app, ["plan", "--model", "tiny", "--size", "256", "--device", "cpu", "--dtype", typed])
    assert result.exit_code == 0, result.stderr
    assert f"unet {flag}" in result.stdout


def test_plan_for_a_gpu_this_machine_does_not_have(runner, no_model_loads, monkeypatch) -> None:
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    args = ["plan", "--size", "4k", "--device", "cuda", "--max-vram", "24", "--dtype", "fp16", "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["device"] == "cuda" and plan["dtype"] == "fp16" and plan["memory_budget_gib"] == 24.0
    assert any("a plan for cuda, which this machine does not have" in note for note in plan["notes"])
    result = runner.invoke(app, ["generate", "x", "--model", "tiny", "--device", "cuda"])
    assert result.exit_code == 2 and "CUDA is not available here" in result.stderr  # a run still needs it


def test_plan_json_carries_the_schema_and_the_note_says_the_tables_gib(runner, no_model_loads) -> None:
    args = ["plan", "--size", "16k", "--device", "cpu", "--max-vram", "8"]
    plan = json.loads(runner.invoke(app, [*args, "--json"]).stdout)
    assert plan["schema"] == 1
    over = next(s for s in plan["stages"] if not s["fits"])
    assert f"needs about {over['estimated_peak_gib']:.2f} GiB" in " ".join(plan["warnings"])
    assert not set(plan["notes"]) & set(plan["warnings"])  # each said once
    table = runner.invoke(app, args)
    assert f"{over['estimated_peak_gib']:.2f}" in table.stdout


@pytest.mark.parametrize("out", [["--out", ""], ["--out="], ["-o", " "]])
def test_an_empty_out_is_refused(runner, no_model_loads, tmp_path, monkeypatch, out: list[str]) -> None:
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["generate", "x", "--model", "tiny", "--size", "256", *out])
    assert result.exit_code == 2 and "is empty: give a folder or file name" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_dry_run_checks_the_output_folder_and_writes_nothing(runner, no_model_loads, tmp_path) -> None:
    file = tmp_path / "a-file"
    file.write_text("")
    result = runner.invoke(app, ["generate", "x", "--model", "tiny", "--dry-run", "--out", str(file / "sub")])
    assert result.exit_code == 2 and "cannot create output folder" in result.stderr
    fresh = tmp_path / "new" / "deeper"
    result = runner.invoke(app, ["generate", "x", "--model", "tiny", "--size", "256", "--dry-run", "--out", str(fresh)])
    assert result.exit_code == 0, result.stderr
    assert not (tmp_path / "new").exists()
