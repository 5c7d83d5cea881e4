"""What a person reads: help, parse errors, --version; and the cold start that keeps them instant."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from linfusion_cli.cli.commands import app

COMMANDS = [
    ["generate"],
    ["plan"],
    ["upscale"],
    ["batch"],
    ["replay"],
    ["distill"],
    ["view"],
    ["info"],
    ["presets", "list"],
    ["presets", "show"],
    ["bench", "unet"],
    ["bench", "attention"],
    ["bench", "vae"],
    ["bench", "png"],
    ["bench", "pipeline"],
]


def run(runner, *args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_help_reads_cleanly(runner, command) -> None:
    import typer.main

    result = runner.invoke(app, [*command, "--help"])
    text = " ".join(result.stdout.replace("│", " ").split())
    assert "<bool>" not in text  # flags take no value: `--low-vram true` must not look right
    usage = next(line for line in result.stdout.splitlines() if "Usage:" in line)
    assert "{" not in usage  # PROMPT, not {prompt}
    cmd = typer.main.get_command(app)
    for name in command:
        cmd = cmd.commands[name]  # type: ignore[attr-defined]
    for param in cmd.params:
        helptext = getattr(param, "help", None) or ""
        if "default:" in helptext:
            # a "[default: ...]" written in a help string must survive rich's markup
            shown = " ".join(helptext.replace("\\[", "[").split())
            assert shown in text, param.name


@pytest.mark.parametrize("command", ["generate", "batch", "upscale", "plan"])
def test_long_commands_have_panels_and_examples(runner, command) -> None:
    text = run(runner, command, "--help").stdout
    for panel in ("Size and stages", "Sampler", "Memory", "Output", "Device", "Examples"):
        assert panel in text
    assert f"linfusion {command} " in text.split("Examples", 1)[1]


def test_usage_line_names_the_prompt(runner) -> None:
    assert "generate [OPTIONS] PROMPT" in run(runner, "generate", "--help").stdout


def test_root_help_offers_completion_and_version(runner) -> None:
    text = run(runner, "--help").stdout
    assert "--install-completion" in text and "--version" in text


def test_version_names_the_stack(runner) -> None:
    lines = run(runner, "--version").stdout.splitlines()
    assert lines[0].startswith("linfusion ")
    assert lines[1].startswith("torch ") and "diffusers " in lines[1]
    assert "CUDA" in lines[2] and lines[3].startswith("device: ")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["generate", "a", "red", "fox"], 'quotes: linfusion generate "a red fox"'),
        (["generate", "x", "--sizee", "3"], "no such option: --sizee"),
        (["generat"], "no such command 'generat'"),
        (["generate", "x", "--steps", "many"], "--steps: must be a whole number, got 'many'"),
        (["generate"], "missing argument 'PROMPT'"),
        (["plan", "--low-vram", "true", "extra"], "unexpected extra"),
        (["generate", "x", "--low-vram", "true"], "on/off flags take no value"),
        (["plan", "--low-vram", "true"], "on/off flags take no value"),
    ],
)
def test_parse_errors_are_one_line(runner, args, expected) -> None:
    result = runner.invoke(app, args, prog_name="linfusion")
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert expected in lines[0]


def test_a_preset_that_does_not_fit_is_named_and_its_strengths_follow_the_size(runner) -> None:
    result = run(runner, "plan", "--preset", "sd15-16k", "--size", "2048", "--json")
    assert result.exit_code == 0
    notes = " ".join(json.loads(result.stdout)["notes"])
    assert "preset sd15-16k's 4 strengths (0.4, 0.3, 0.2, 0.1) are for its own size" in notes
    assert "this 2048x1024 target has 1 refine stage" in notes and "--strengths has" not in notes


def test_no_doubled_got(runner) -> None:
    result = run(runner, "generate", "x", "--strengths", "1.5", "--model", "tiny")
    assert result.exit_code == 2
    assert result.stderr.count("got") == 1 and "(got 1.5)" in result.stderr


def test_cli_import_does_not_import_torch() -> None:
    """`linfusion --help` stays instant only while nothing imports torch at import time."""
    code = "import sys, linfusion_cli.cli.commands; print('torch' in sys.modules, 'diffusers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_plan_prints_its_table_on_stdout_without_made_up_names(runner) -> None:
    result = runner.invoke(app, ["plan", "a fox", "--model", "tiny", "--size", "1024"])
    assert result.exit_code == 0, result.stderr
    assert "1024x1024" in result.stdout and "memory budget" in result.stdout
    assert "output:" not in result.stdout + result.stderr  # no seed given: any name would be made up
    seeded = runner.invoke(app, ["plan", "a fox", "--model", "tiny", "--size", "1024", "--seed", "3"])
    assert "output: outputs/a-fox_3_1024x1024" in seeded.stdout


def test_info_prints_on_stdout(runner, tmp_path) -> None:
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a fox\nSteps: 4, Seed: 1")
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png", pnginfo=info)
    result = runner.invoke(app, ["info", str(tmp_path / "x.png")])
    assert result.exit_code == 0 and result.stderr == ""
    assert result.stdout.splitlines() == [f"{tmp_path / 'x.png'}: PNG 8x8", "a fox", "Steps: 4, Seed: 1"]


def test_errors_keep_brackets(runner, tmp_path) -> None:
    result = runner.invoke(app, ["batch", str(tmp_path / "[draft] prompts.txt")])
    assert result.exit_code == 2 and "[draft] prompts.txt" in result.stderr


@pytest.mark.parametrize("command", ["generate", "plan", "upscale", "batch"])
def test_panels_come_in_one_order(runner, command) -> None:
    text = run(runner, command, "--help").stdout
    panels = [line.split("─ ", 1)[1].split(" ─")[0] for line in text.splitlines() if line.startswith("╭─ ")]
    order = ["Arguments", "Options", "Prompt", "Size and stages", "Refine method", "Sampler"]
    order += ["Model and adapters", "ControlNet", "IP-Adapter", "Memory", "Output", "Device"]
    known = [p for p in panels if p in order]  # a panel added later (not ranked yet) goes last
    assert known == [p for p in order if p in panels] and panels[: len(known)] == known


@pytest.mark.parametrize(
    ("words", "expected"),
    [
        (
            "linfusion generate x --scheduler dpm++2m-sde-h",
            ["dpm++2m-sde-heun", "dpm++2m-sde-heun-exp", "dpm++2m-sde-heun-karras"],
        ),
        ("linfusion plan --format t", ["tiff"]),
        ("linfusion generate x --preset sdxl", ["sdxl-16k"]),
    ],
)
def test_shell_completion_offers_values(runner, words, expected) -> None:
    env = {"_LINFUSION_COMPLETE": "complete_bash", "COMP_WORDS": words, "COMP_CWORD": str(len(words.split()) - 1)}
    result = runner.invoke(app, [], prog_name="linfusion", env=env)
    assert sorted(result.stdout.split()) == expected


def _examples() -> list[str]:
    """The Examples lines of the help that run on a CPU: the tiny model, or plan (no model at all)."""
    import shlex

    from linfusion_cli.cli import commands as cli

    lines = []
    for text in (cli.GENERATE_EXAMPLES, cli.PLAN_EXAMPLES, cli.UPSCALE_EXAMPLES, cli.BATCH_EXAMPLES):
        for line in text.splitlines():
            words = shlex.split(line.strip(), comments=True)
            if words[:1] == ["linfusion"] and "|" not in words and ("tiny" in words or words[1] == "plan"):
                lines.append(shlex.join(words))
    return lines


def test_help_examples_fit_80_columns() -> None:
    from linfusion_cli.cli import commands as cli

    for text in (cli.GENERATE_EXAMPLES, cli.PLAN_EXAMPLES, cli.UPSCALE_EXAMPLES, cli.BATCH_EXAMPLES):
        assert all(len(line.strip()) <= 78 for line in text.splitlines()), text


@pytest.mark.parametrize("line", _examples())
def test_help_examples_run(runner, line, tmp_path, monkeypatch) -> None:
    import shlex

    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, shlex.split(line)[1:], catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
