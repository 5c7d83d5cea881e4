"""Every README command that runs on a CPU (the built-in tiny model, or no model at all) runs as shown."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from linfusion_cli.cli.commands import app

README = Path(__file__).resolve().parents[1] / "README.md"
NO_MODEL = ("plan", "presets")  # commands that load no model at all


def readme_commands() -> list[str]:
    text = README.read_text()
    lines: list[str] = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        lines += block.replace("\\\n", " ").splitlines()
    lines += re.findall(r"`(linfusion [^`]+)`", text)  # commands quoted in the prose
    runnable = []
    for raw in lines:
        words = shlex.split(raw, comments=True)  # shell comments are not arguments
        if len(words) < 2 or words[0] != "linfusion" or any(re.match(r"[A-Z]{3,}\b", w) for w in words):
            continue  # not ours, or with a placeholder (NAME, IMAGE.json) to fill in
        if ("--model" in words and words[words.index("--model") + 1] == "tiny") or words[1] in NO_MODEL:
            runnable.append(shlex.join(words))
    return list(dict.fromkeys(runnable))


def test_the_readme_has_cpu_commands() -> None:
    assert any("--model tiny" in line for line in readme_commands())


@pytest.mark.parametrize("line", readme_commands())
def test_readme_command_runs(runner, line: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # "--out outputs" lands in a temporary folder
    words = shlex.split(line, comments=True)  # as a shell reads it: a trailing "# ..." is a comment
    for word in words:  # an input image the command names (--ip-image ref.png): a small picture stands in
        if word.lower().endswith((".png", ".jpg")) and not Path(word).exists():
            from PIL import Image

            Image.new("RGB", (96, 64), (200, 120, 40)).save(word)
    result = runner.invoke(app, words[1:], catch_exceptions=False)
    assert result.exit_code == 0, f"{line}\n{result.stderr}"


def readme_python() -> list[str]:
    """The README's Python examples that run on the tiny model."""
    return [block for block in re.findall(r"```python\n(.*?)```", README.read_text(), re.S) if '"tiny"' in block]


def test_the_readme_python_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = readme_python()
    assert blocks, "the README shows the Python API on the tiny model"
    monkeypatch.chdir(tmp_path)  # out="outputs" lands in a temporary folder
    for block in blocks:
        exec(compile(block, str(README), "exec"), {})
    assert len(list((tmp_path / "outputs").glob("*.png"))) == 3  # one saved at once, two on save()
