"""A job's output files: the image and its JSON sidecar, where they go and whether they are finished.

Every write goes to a temporary file in the destination folder, is fsynced, then renamed into place (writes.py);
the sidecar is written last, so "image + sidecar present and consistent" means "this job finished".
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..base.errors import LinFusionError, OutputError
from .files import load_json, read_regular
from .formats import OUTPUT_FORMATS

SIDECAR_SUFFIX = ".json"  # appended to the image's whole name: x.png.json, so formats never share one
MAX_SIDECAR_BYTES = 16 << 20


# --- names ------------------------------------------------------------------------------------------------


def inside(folder: Path, path: Path) -> bool:
    """`path` is an entry directly in `folder`. The entry itself is not resolved: a link planted at an output name
    is replaced by the rename, never written through."""
    if path.name in ("", ".", ".."):
        return False
    # `folder / name` with a plain name is in it by construction; only other paths need the file system (a
    # 50,000-job batch names 100,000 paths before its first job).
    return path.parent == folder or path.parent.resolve() == folder.resolve()


@dataclass(frozen=True)
class OutputPaths:
    image: Path
    sidecar: Path

    @classmethod
    def for_stem(cls, folder: Path, stem: str, fmt: str) -> OutputPaths:
        image = folder / f"{stem}{OUTPUT_FORMATS.get(fmt).suffix}"
        sidecar = folder / f"{image.name}{SIDECAR_SUFFIX}"
        for path in (image, sidecar):
            if not inside(folder, path):
                raise OutputError(f"refusing to write {path}: outside the output folder {folder}")
        return cls(image, sidecar)

    def problem(self) -> str | None:
        """Why these names cannot be written (something other than a file sits there), or None."""
        for path in (self.image, self.sidecar):
            try:
                mode = os.lstat(path).st_mode
            except FileNotFoundError:
                continue
            except OSError as exc:
                return f"cannot check {path}: {exc.strerror or exc}"
            if stat.S_ISLNK(mode):
                return f"{path} is a symbolic link; remove it (or choose another name) so the job can write there"
            if not stat.S_ISREG(mode):
                return f"{path} exists and is not a file (a folder or device); move it away"
        return None

    def sidecar_data(self) -> dict[str, Any] | None:
        """The sidecar's JSON object, or None if it is missing, not a regular file, too large or not JSON."""
        try:
            data = load_json(read_regular(self.sidecar, MAX_SIDECAR_BYTES, "sidecar").decode("utf-8"))
        except (LinFusionError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def complete(self, key: str | None = None) -> bool:
        """Image and sidecar both present, the sidecar vouching for this exact image file (and, given `key`,
        recording the same settings key: an old sidecar without one is trusted)."""
        meta = self.sidecar_data()
        if meta is None or meta.get("complete") is not True:
            return False
        file = meta.get("file")
        if not isinstance(file, dict) or (key is not None and meta.get("key", key) != key):
            return False
        try:
            info = os.lstat(self.image)
        except OSError:
            return False
        return stat.S_ISREG(info.st_mode) and info.st_size == file.get("bytes")


# --- atomic writes ----------------------------------------------------------------------------------------


# --- metadata ---------------------------------------------------------------------------------------------
