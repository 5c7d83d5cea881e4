"""Output that fits (second round of edges): tables and help at any width, piped or not; 141 on a closed pipe for
every command; the small answers a person expects (did-you-means, refusals instead of silent changes)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image, PngImagePlugin

from linfusion_cli.cli.commands import app


def test_tables_fit_columns_piped_breaking_between_fields_only(runner) -> None:
    """`plan` to a pipe (CliRunner's stdout is one) follows COLUMNS, and a row too wide becomes lines that break
    between fields, never inside one: every size and number stays whole."""
    wide = runner.invoke(app, ["plan", "--size", "16k", "--world-size", "4"], env={"COLUMNS": "200"})
    narrow = runner.invoke(app, ["plan", "--size", "16k", "--world-size", "4"], env={"COLUMNS": "60"})
    assert wide.exit_code == narrow.exit_code == 0
    assert max(len(line.rstrip()) for line in narrow.stdout.splitlines()) <= 60
    assert "| 6     | refine | 16384x16384 | 16384x4096" in wide.stdout  # a table where it fits
    flat = " ".join(narrow.stdout.split())
    planned = runner.invoke(app, ["plan", "--size", "16k", "--world-size", "4", "--json"])
    peak = json.loads(planned.stdout)["stages"][-1]["estimated_peak_gib"]
    for field in ("size 16384x16384", "per process 16384x4096", f"est. peak GiB {peak:.2f}", "VAE tiles of 320 px"):
        assert field in flat, field
    assert "stage 6: kind refine" in narrow.stdout and "sampler ddim, guidance 7.5" in narrow.stdout


@pytest.mark.parametrize("width", [60, 100])
def test_presets_list_wraps_descriptions_and_lines_keep_long_fields_whole(runner, tmp_path: Path, width: int) -> None:
    """A description is prose: wrapped between words in its column, never cut; a field longer than a line (an
    output path) is left whole on its line, its file name at the end."""
    from linfusion_cli.core.presets import scan_presets

    listed = runner.invoke(app, ["presets", "list"], env={"COLUMNS": str(width)}).stdout
    assert max(len(line.rstrip()) for line in listed.splitlines()) <= width
    words = " ".join(line.split("|")[-2] for line in listed.splitlines() if line.startswith("| "))
    names = re.findall(r"^\| ([a-z0-9-]+) ", listed, re.M)
    presets = sorted(scan_presets()[0], key=lambda preset: preset.name)
    assert names[1:] == [preset.name for preset in presets]  # by name, after the header
    for preset in presets:
        assert " ".join(preset.description.split()) in " ".join(words.split()), preset.name
    out = tmp_path / ("a-long-folder-name" * 4) / "renders"
    jobs = tmp_path / "one.txt"
    jobs.write_text("a red fox\n")
    planned = runner.invoke(
        app, ["batch", str(jobs), "--dry-run", "--model", "tiny", "--seed", "1", "--out", str(out)],
        env={"COLUMNS": str(width)},
    )  # fmt: skip
    assert re.search(rf"^  output {re.escape(str(out))}/00000_a-red-fox_1_2048x2048_\w+\.png$", planned.stdout, re.M)


def test_help_fits_60_columns(runner) -> None:
    root = runner.invoke(app, ["--help"], env={"COLUMNS": "60"}).stdout
    listed = re.findall(r"^│ (\w+) ", root, re.M)
    assert listed[:4] == ["generate", "upscale", "batch", "replay"] and listed[-1] == "distill"
    distill = runner.invoke(app, ["distill", "--help"], env={"COLUMNS": "60"}).stdout
    assert "--gradient-checkpointing" in distill and "…" not in distill
    examples = runner.invoke(app, ["generate", "--help"], env={"COLUMNS": "60"}).stdout.split("Examples")[1]
    assert re.search(r'linfusion generate "a lighthouse at dusk" --size 16k \\ *\n +--aspect 2:1', examples)
    assert max(len(line.rstrip()) for line in examples.splitlines()) <= 60


@pytest.mark.parametrize("command", [["bench"], ["view"], ["distill"], ["batch"]])
@pytest.mark.parametrize("width", ["60", "80"])
def test_examples_paste_into_a_shell_at_any_width(runner, command: list[str], width: str) -> None:
    """Every line of the examples is a command, a comment (`# ` on each of its lines) or the continuation of a
    command whose line ends with ` \\`; no comment ends with one (a shell would not continue it)."""
    examples = runner.invoke(app, [*command, "--help"], env={"COLUMNS": width}).stdout.split("Examples")[1]
    lines = [line.strip() for line in examples.splitlines() if line.strip()]
    assert max(len(line) + 1 for line in lines) <= int(width)
    for before, line in zip(["linfusion", *lines], lines, strict=False):
        continued = before.endswith(" \\")
        assert continued != line.startswith(("linfusion ", "torchrun ", "#")), (before, line)
        assert not (before.startswith("#") and continued), before


def test_every_command_ends_141_on_a_closed_pipe(tmp_path: Path) -> None:
    """`--help | head -1` and `--version | head -1`: the reader gone, exit 141 as other commands end, not 1."""
    for args in (["--help"], ["--version"]):
        reader, writer = os.pipe()
        os.close(reader)  # no one reads: the first write breaks the pipe
        done = subprocess.run(
            [sys.executable, "-m", "linfusion_cli", *args], stdout=writer, stderr=subprocess.PIPE, text=True, timeout=60
        )
        os.close(writer)
        assert done.returncode == 141 and "Traceback" not in done.stderr, (args, done.stderr)


def test_a_result_printed_to_a_closed_stdout_ends_141() -> None:
    """`>&-`: Python starts with no stdout, where typer, click and rich printed into nothing and exited 0."""
    for args in (["--version"], ["presets", "list"]):  # click's echo, rich's console
        done = subprocess.run(
            [sys.executable, "-m", "linfusion_cli", *args],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=60, preexec_fn=lambda: os.close(1),
        )  # fmt: skip
        assert done.returncode == 141 and not done.stderr, (args, done.stderr)


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--model", "tiyn"], "model 'tiyn' does not exist (did you mean tiny?)"),
        (["--device", "gpu"], "(did you mean cuda?)"),
        (["--name", "../evil"], "--name: is a file name without a folder"),
        (["--size", "4096x2048", "--aspect", "16:9"], "--aspect: 16:9 is not the shape of 4096x2048"),
        (["--vae", "/no/such/vae"], "VAE '/no/such/vae' does not exist: give a diffusers AutoencoderKL folder"),
        (["--vae", __file__], f"--vae '{__file__}' is a file: give a diffusers AutoencoderKL folder"),
        (["--vae", str(Path(__file__).parent)], f"--vae '{Path(__file__).parent}' has no config.json"),
    ],
)
def test_what_a_person_means_or_a_refusal_not_a_silent_change(runner, args: list[str], said: str) -> None:
    result = runner.invoke(app, ["generate", "x", *args, "--dry-run"])
    assert result.exit_code == 2 and said in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("name", "written", "note"),
    [
        ("fox.png", "fox.png", False),
        ("fox.v2", "fox.v2.png", False),
        ("my fox", "my-fox.png", True),
        ("con", "con_.png", True),
    ],
)
def test_a_name_is_the_file_name_or_says_how_it_is_written(runner, name: str, written: str, note: bool) -> None:
    result = runner.invoke(
        app, ["generate", "x", "--model", "tiny", "--name", name, "--seed", "1", "--dry-run", "--json"]
    )
    plan = json.loads(result.stdout)
    assert result.exit_code == 0 and Path(plan["output"]).name == written
    assert any(f"name '{name}' is written {written}" in said for said in plan["notes"]) is note, plan["notes"]


def test_a_folder_given_that_is_not_there_is_said_and_serve_s_port_has_its_flag(runner, tmp_path: Path) -> None:
    gone = str(tmp_path / "no-such-folder")
    for flag in ("--embeddings", "--lora-dir"):
        result = runner.invoke(app, ["generate", "x", "--model", "tiny", flag, gone, "--dry-run"])
        assert result.exit_code == 0 and f"{flag} '{gone}' is not a folder: nothing" in result.stderr, result.stderr
    served = runner.invoke(app, ["view", str(tmp_path), "--serve", "8767"])
    assert served.exit_code == 2 and "the port goes to --port" in served.stderr and "--port 8767" in served.stderr


def test_a_contact_sheet_card_says_1_step() -> None:
    from linfusion_cli.view.pages import Card, key_settings
    from linfusion_cli.view.records import Sidecar

    for steps, said in ((1, "seed 3 · 1 step · ddim"), (4, "seed 3 · 4 steps · ddim")):
        sidecar = Sidecar({"seed": 3, "settings": {"steps": steps, "scheduler": "ddim"}})
        assert key_settings(Card("a.png", "a", None, sidecar, None, 0.0)) == said


def test_a_site_carries_the_viewer_s_licence_beside_it(tmp_path: Path) -> None:
    from linfusion_cli.view.assets import install_viewer

    viewer = install_viewer(tmp_path, None)
    assert viewer.local and (tmp_path / "assets" / "openseadragon.min.js").is_file()
    assert "Redistribution and use" in (tmp_path / "assets" / "openseadragon-LICENSE.txt").read_text()


def test_a_name_with_another_format_s_extension_is_refused(runner) -> None:
    result = runner.invoke(app, ["generate", "x", "--model", "tiny", "--name", "fox.jpg", "--dry-run"])
    assert result.exit_code == 2 and "ends in .jpg, but the format is png: give --format jpeg" in result.stderr


def test_a_file_that_is_no_checkpoint_is_refused_by_a_dry_run(runner, tmp_path: Path) -> None:
    import numpy as np
    from safetensors.numpy import save_file

    save_file({"lora_unet_x.alpha": np.zeros(1, np.float32)}, tmp_path / "style.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
    for name, said in [("style", "is not a Stable Diffusion single-file checkpoint"), ("junk", "not a readable")]:
        result = runner.invoke(app, ["generate", "x", "--model", str(tmp_path / f"{name}.safetensors"), "--dry-run"])
        assert result.exit_code == 2 and said in result.stderr, result.stderr


def test_a_prompt_file_says_every_mistake_in_line_order(runner, tmp_path: Path) -> None:
    jobs = tmp_path / "jobs.yaml"
    jobs.write_text(
        "- prompt: a\n  size: 4096x2048\n  format: webp\n  steps: 30\n"  # fine
        "- prompt: b\n  size: 20000\n  format: webp\n"  # line 6 (job 1): webp cannot hold 20000 px (a plan check)
        "- prompt: c\n  steps: 0\n"  # line 9 (job 2): a field check
        "- prompt: ''\n"  # line 10 (job 3)
    )
    result = runner.invoke(app, ["batch", str(jobs), "--dry-run"])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert [re.search(r"\(job (\d)\)", line).group(1) for line in lines] == ["1", "2", "3"], lines  # type: ignore[union-attr]
    assert all(line.startswith("error: jobs.yaml line ") for line in lines)


def test_each_job_is_charged_with_its_own_mistakes_only(runner, tmp_path: Path) -> None:
    """A LoRA tag not found is its job's mistake, not that of the jobs of the same settings after it; a JSONL line
    that does not parse is one mistake among the others, not the end of the checks."""
    tags = tmp_path / "tags.txt"
    tags.write_text("a fox\nb <lora:nope:1>\nc plain\nd <lora:gone>\n")
    said = runner.invoke(app, ["batch", str(tags), "--dry-run", "--model", "tiny"]).stderr.strip().splitlines()
    assert [line.split(": no LoRA named ")[0] for line in said] == [
        "error: tags.txt line 2 (job 1)",
        "error: tags.txt line 4 (job 3)",
    ], said
    lines = tmp_path / "jobs.jsonl"
    lines.write_text('{"prompt": "a", "steps": 0}\n[1]\nnot json\n{"prompt": "d", "stepz": 3}\n')
    result = runner.invoke(app, ["batch", str(lines), "--dry-run", "--model", "tiny"])
    said = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and [line.split(":")[1] for line in said] == [
        " jobs.jsonl line 1 (job 0)",
        " jobs.jsonl line 2 (job 1)",
        " jobs.jsonl line 3 (job 2)",
        " jobs.jsonl line 4 (job 3)",
    ], said


def test_a_batch_plan_says_each_warning_once_and_info_names_each_file(runner, tmp_path: Path, hub_cache) -> None:
    jobs = tmp_path / "jobs.txt"
    jobs.write_text("a fox\n")
    planned = runner.invoke(app, ["batch", str(jobs), "--dry-run", "--json", "--model", "someone/not-downloaded"])
    (plan,) = [json.loads(line) for line in planned.stdout.splitlines()]
    assert len([said for said in plan["warnings"] if "someone/not-downloaded" in said]) == 1, plan["warnings"]
    Image.new("RGB", (24, 16)).save(tmp_path / "plain.jpg")
    shown = runner.invoke(app, ["info", str(tmp_path / "plain.jpg"), "--json"])
    assert json.loads(shown.stdout) == {
        "path": str(tmp_path / "plain.jpg"),
        "format": "JPEG",
        "width": 24,
        "height": 16,
        "parameters": None,
        "linfusion": None,
    }
    assert runner.invoke(app, ["info", str(tmp_path / "plain.jpg")]).stdout.startswith(
        f"{tmp_path}/plain.jpg: JPEG 24x16"
    )


def test_one_job_planned_and_info_of_several_images(runner, tmp_path: Path) -> None:
    jobs = tmp_path / "one.txt"
    jobs.write_text("a fox\n")
    planned = runner.invoke(app, ["batch", str(jobs), "--dry-run", "--model", "tiny"])
    assert "1 job planned; nothing loaded" in planned.stdout
    names = []
    for name in ("a", "b"):
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", f"{name} fox\nSteps: 4, Seed: 1")
        Image.new("RGB", (8, 8)).save(tmp_path / f"{name}.png", pnginfo=info)
        names.append(str(tmp_path / f"{name}.png"))
    shown = runner.invoke(app, ["info", *names, "--json"])
    assert shown.exit_code == 0 and [json.loads(line)["parameters"][:5] for line in shown.stdout.splitlines()] == [
        "a fox",
        "b fox",
    ]
    missing = runner.invoke(app, ["info", names[0], str(tmp_path / "gone.png")])
    assert missing.exit_code == 2 and "a fox" in missing.stdout and "gone.png" in missing.stderr
