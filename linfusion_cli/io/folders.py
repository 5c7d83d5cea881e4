"""Folders of files a user keeps and names by file name (LoRAs, textual-inversion embeddings), as AUTOMATIC1111's
`models/Lora` and `embeddings` folders: the folders given (a flag, a job field, a preset), then those in an
environment variable (several, separated as PATH is), then one in the user's linfusion folder. Sub-folders are
searched too; a name is the file name without its extension, the first folder's file winning a clash."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from ..base.errors import UsageError
from ..base.registry import did_you_mean

HOME_ENV = "LINFUSION_HOME"


def user_folder(name: str) -> Path:
    """`$LINFUSION_HOME/<name>`, else `~/.config/linfusion/<name>` (XDG_CONFIG_HOME respected)."""
    home = os.environ.get(HOME_ENV)
    base = Path(home) if home else Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config")) / "linfusion"
    return base / name


def search_folders(given: Iterable[str] | None, env: str, default: str) -> list[Path]:
    """The folders to look in, in order: `given`, then `$env` (os.pathsep-separated), then user_folder(default)."""
    listed = [*(given or ()), *os.environ.get(env, "").split(os.pathsep)]
    folders = [Path(item).expanduser() for item in listed if item.strip()]
    return [*folders, user_folder(default)]


def files_by_name(folders: Iterable[Path], suffixes: tuple[str, ...]) -> dict[str, Path]:
    """Every file with one of `suffixes` under the folders, by its name without extension."""
    found: dict[str, Path] = {}
    for folder in folders:
        if not folder.is_dir():
            continue
        for path in sorted(folder.rglob("*")):
            if path.suffix.lower() in suffixes and path.is_file():
                found.setdefault(path.stem, path)
    return found


def find_by_name(name: str, found: dict[str, Path], what: str, folders: list[Path]) -> Path:
    """The file called `name` (any case when no file has it exactly), or a UsageError naming the folders searched
    and the closest name."""
    if name in found:
        return found[name]
    folded = {stem.casefold(): path for stem, path in found.items()}
    if name.casefold() in folded:
        return folded[name.casefold()]
    where = ", ".join(str(f) for f in folders)
    hint = did_you_mean(name, found) or (f" ({len(found)} found there)" if found else " (none found there)")
    raise UsageError(f"no {what} named '{name}' in {where}{hint}")
