"""Presets: named YAML recipes (shipped in the package, or the user's own files), validated like job rows."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from ..base.errors import UsageError
from ..base.registry import did_you_mean
from ..base.text import quote
from ..io.files import ParseError, load_yaml, read_regular
from .layers import validate_layer
from .settings import not_in_presets

MAX_PRESET_BYTES = 1 << 20
USER_DIR_ENV = "LINFUSION_HOME"
SUFFIXES = (".yaml", ".yml")
PRESET_LABEL = "preset "  # how a preset's settings are labelled among a job's layers


@dataclass(frozen=True)
class Preset:
    name: str
    path: Path
    description: str
    settings: dict[str, Any]

    @property
    def label(self) -> str:
        return f"{PRESET_LABEL}{self.name}"


def shipped_dir() -> Path:
    """Presets inside the installed package; in a source checkout, the repository's presets/ folder."""
    packaged = Path(str(resources.files("linfusion_cli"))) / "presets"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[2] / "presets"


def user_dir() -> Path:
    home = os.environ.get(USER_DIR_ENV)
    base = Path(home) if home else Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config")) / "linfusion"
    return base / "presets"


def _files() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for folder in (shipped_dir(), user_dir()):  # the user's own override shipped ones of the same name
        if folder.is_dir():
            for path in sorted(folder.iterdir()):
                if path.suffix in SUFFIXES:
                    found[path.stem] = path
    return found


def list_presets() -> list[Preset]:
    """Every preset that loads (see `scan_presets` for the ones that do not)."""
    return scan_presets()[0]


def scan_presets() -> tuple[list[Preset], list[str]]:
    """(the presets that load, what is wrong with each that does not): one broken file of yours does not hide
    the others."""
    presets, problems = [], []
    for _name, path in sorted(_files().items()):  # by name: sd15-16k before sd15-16k-fast, as the error lists them
        try:
            presets.append(load_preset(str(path)))
        except UsageError as exc:
            problems.append(str(exc))
    return presets, problems


def load_preset(name_or_file: str) -> Preset:
    """A preset by name (shipped or user) or by path to a YAML file; unknown keys and bad values refused. Read
    once per file version: every job of a 50,000-line prompt file may name it."""
    path = Path(name_or_file).expanduser()
    if not (path.suffix in SUFFIXES and path.is_file()):
        files = _files()
        if name_or_file not in files:
            close = did_you_mean(name_or_file, files)
            known = close or f" (known: {', '.join(sorted(files)) or 'none'})"
            raise UsageError(f"unknown preset {quote(name_or_file)}{known}; or give a path to a .yaml file")
        path = files[name_or_file]
    try:
        version = path.stat().st_mtime_ns
    except OSError:
        version = 0  # read_regular says what is wrong
    return _load(path, version)


@functools.lru_cache(maxsize=64)
def _load(path: Path, version: int) -> Preset:
    try:
        data, _ = load_yaml(read_regular(path, MAX_PRESET_BYTES, "preset file").decode("utf-8-sig"))
    except (ParseError, UnicodeDecodeError) as exc:
        raise UsageError(f"preset file {path} is not valid UTF-8 YAML: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UsageError(f"preset file {path}: expected a mapping of settings, got {type(data).__name__}")
    description = data.pop("description", "")
    if not isinstance(description, str):
        raise UsageError(f"preset file {path}: 'description' must be text")
    settings = validate_layer(data, where=f"preset {path.stem} ({path})", forbidden=not_in_presets())
    return Preset(path.stem, path, description.strip(), settings)
