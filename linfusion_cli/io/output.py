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
from ..base.schema import schema_problem
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

    @property
    def legacy_sidecar(self) -> Path:
        """Where sidecars went before they were named after the image's whole name: `stem.json`."""
        return self.image.with_suffix(SIDECAR_SUFFIX)

    def found_sidecar(self) -> Path | None:
        """The sidecar on disk: `x.png.json`, else an older run's `x.json`; None when neither is there."""
        for path in (self.sidecar, self.legacy_sidecar):
            if os.path.lexists(path):
                return path
        return None

    def sidecar_data(self) -> dict[str, Any] | None:
        """The sidecar's JSON object, or None if it is missing, not a regular file, too large or not JSON."""
        data, _ = self._read_sidecar()
        return data

    def _read_sidecar(self) -> tuple[dict[str, Any] | None, str]:
        path = self.found_sidecar()
        if path is None:
            return None, "no sidecar"
        try:
            text = read_regular(path, MAX_SIDECAR_BYTES, "sidecar").decode("utf-8")
            data = load_json(text) if text.strip() else None
        except (LinFusionError, ValueError) as exc:
            return None, str(exc)
        if data is None:
            return None, "empty"
        if not isinstance(data, dict):
            return None, "not a JSON object"
        return data, ""

    def unfinished(self, key: str | None = None) -> str | None:
        """Why image and sidecar are not one finished job (None when they are): the sidecar present, readable,
        vouching for this exact image file and (given `key`) recording the same settings key (an old sidecar
        without one is trusted)."""
        meta, problem = self._read_sidecar()
        if meta is None:
            return problem
        schema = schema_problem(meta)
        if schema:
            return schema
        file = meta.get("file")
        if meta.get("complete") is not True or not isinstance(file, dict):
            return "it does not record a finished image"
        if key is not None and meta.get("key", key) != key:
            return f"it records other settings (key {meta.get('key')})"
        try:
            info = os.lstat(self.image)
        except OSError:
            return "its image is missing"
        if not stat.S_ISREG(info.st_mode) or info.st_size != file.get("bytes"):
            return f"its image has {info.st_size} bytes, the sidecar says {file.get('bytes')}"
        return None

    def complete(self, key: str | None = None) -> bool:
        return self.unfinished(key) is None


# --- atomic writes ----------------------------------------------------------------------------------------


# --- metadata ---------------------------------------------------------------------------------------------
