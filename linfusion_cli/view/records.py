"""What a render folder says about its images: sidecars, batch logs, and claims of jobs still being made.

Everything here is read defensively: a sidecar may be missing (an image from elsewhere, or a job killed between
writing the image and its sidecar), damaged, partial or from an older layout (`X.json` beside `X.png` before the
sidecar became `X.png.json`); a log line may be anything. None of that stops a site from being built: the image is
shown with what could be read and a note saying what could not.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from ..base.errors import LinFusionError
from ..core.image_settings import recorded_settings
from ..io.files import ParseError, load_json, read_regular
from ..io.locks import host_name, pid_alive

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff")  # what linfusion writes (--format)
SIDECAR_SUFFIX = ".json"
MAX_SIDECAR_BYTES = 4 << 20  # a sidecar is a few KB; settings with long prompts stay far below this
MAX_LOG_BYTES = 64 << 20  # a batch log: one ~300-byte line per job
MAX_CLAIM_BYTES = 512
CLAIM_SUFFIX = ".claim"  # `.NAME.claim`: held (flock) by the batch task making NAME, removed when it is done
CREATED_FORMAT = "%Y-%m-%dT%H:%M:%S%z"  # the sidecar's `created`
_CLAIM_OWNER = re.compile(r"pid (\d+) on (\S+)")
MAX_DEPTH = 4  # sub-folders looked into below a source folder (renders/2026-12-06/night-1/...)
SITE_MARKER = "site.json"  # a folder holding one is a site (ours, or another run's), not images to show


@dataclass
class Sidecar:
    """A sidecar as read: its data (empty when unusable), why it is unusable, and a signature for reruns."""

    data: dict[str, Any] = field(default_factory=dict)
    problem: str | None = None
    signature: list[int] | None = None  # [bytes, mtime_ns]; None when there is no sidecar

    @property
    def settings(self) -> dict[str, Any]:
        settings = self.data.get("settings")
        return settings if isinstance(settings, dict) else {}

    @property
    def prompt(self) -> str:
        return _text(self.settings.get("prompt"))

    def created(self) -> float | None:
        """When the image was made (seconds since the epoch), from the sidecar; None if it does not say."""
        created = self.data.get("created")
        with contextlib.suppress(TypeError, ValueError):
            return datetime.strptime(created, CREATED_FORMAT).timestamp() if isinstance(created, str) else None
        return None


@dataclass(frozen=True)
class JobNote:
    """A batch job with no image to show: failed (from a log) or still being made (a claim file)."""

    index: int | None
    status: str  # "failed" | "running" | "stopped"
    detail: str
    seed: int | None = None
    prompt: str = ""  # the job's prompt, where its log line says it


def file_signature(path: Path) -> list[int] | None:
    """[bytes, mtime_ns]: a file that changed since the last run (rewritten, or finished by its writer)."""
    try:
        info = path.stat()
    except OSError:
        return None
    return [info.st_size, info.st_mtime_ns]


def image_folders(folder: Path, skip: Path | None = None) -> list[Path]:
    """`folder` and its sub-folders, by name, down to MAX_DEPTH: what a batch per night or per task leaves. Hidden
    folders, links to folders, sites (a `site.json`: the default `view/` among them) and `skip` (the site being
    built) are not entered."""
    found = [folder]
    for depth in range(MAX_DEPTH):
        level = [found[i] for i in range(len(found)) if len(found[i].relative_to(folder).parts) == depth]
        for parent in level:
            with os.scandir(parent) as entries:
                subs = sorted(
                    Path(entry.path)
                    for entry in entries
                    if entry.is_dir(follow_symlinks=False) and not entry.name.startswith(".")
                )
            found += [sub for sub in subs if sub != skip and not (sub / SITE_MARKER).is_file()]
    return found


def list_folder(folder: Path, skip: Path | None = None) -> tuple[list[Path], list[Path]]:
    """(images, other files) in `folder` and its sub-folders (image_folders), by path. Hidden files are a batch's
    temp files and claims; sidecars and JSON logs are ours, so not "other"."""
    files: list[Path] = []
    for where in image_folders(folder, skip):
        with os.scandir(where) as entries:
            files += sorted(Path(e.path) for e in entries if not e.name.startswith(".") and e.is_file())
    images = [path for path in files if path.name.lower().endswith(IMAGE_SUFFIXES)]
    ours = {sidecar for image in images for sidecar in _sidecar_names(image)}
    others = [path for path in files if path not in images and path not in ours and path.suffix != ".jsonl"]
    return images, others


def _sidecar_names(image: Path) -> tuple[Path, Path]:
    """Where an image's sidecar may be: `X.png.json`, or `X.json` (older versions)."""
    return image.with_name(image.name + SIDECAR_SUFFIX), image.with_suffix(SIDECAR_SUFFIX)


def sidecar_path(image: Path) -> Path | None:
    """`X.png.json`, or the older `X.json`; None when neither exists."""
    for candidate in _sidecar_names(image):
        if candidate.is_file():
            return candidate
    return None


def read_sidecar(image: Path) -> Sidecar:
    path = sidecar_path(image)
    if path is None:
        return _recorded_in(image)
    signature = file_signature(path)
    try:
        data = load_json(read_regular(path, MAX_SIDECAR_BYTES, "the sidecar").decode("utf-8"))
    except (LinFusionError, ParseError, UnicodeDecodeError) as exc:
        return Sidecar(problem=f"sidecar {path.name} cannot be read: {exc}", signature=signature)
    if not isinstance(data, dict):
        return Sidecar(problem=f"sidecar {path.name} is not a JSON object", signature=signature)
    problem = None if data.get("complete", True) is not False else "the sidecar says this job did not finish"
    return Sidecar(data, problem, signature)


def _recorded_in(image: Path) -> Sidecar:
    """No sidecar: what the image itself records (this tool's metadata chunk, or AUTOMATIC1111's parameters)."""
    try:
        recorded = recorded_settings(image)
    except LinFusionError:
        recorded = None
    if recorded is None:
        return Sidecar(problem="no sidecar: shown without its settings")
    data = recorded.data or {"settings": recorded.settings, "seed": recorded.settings.get("seed")}
    return Sidecar(data, f"no sidecar: settings as {recorded.where.removeprefix('image ')} records them")


def read_job_logs(logs: list[Path]) -> list[JobNote]:
    """Failed jobs from `batch --json` logs (one JSON object a line): those with a `failed` line and no `done`
    or `skipped` line for the same index in any of the logs (a rerun that made the image clears it)."""
    failed: dict[int, JobNote] = {}
    finished: set[int] = set()
    for log in logs:
        for line in _log_lines(log):
            index, status = line.get("index"), line.get("status")
            if not isinstance(index, int) or isinstance(index, bool):
                continue
            if status in ("done", "skipped"):
                finished.add(index)
            elif status == "failed":
                seed = line.get("seed") if isinstance(line.get("seed"), int) else None
                prompt = _text(line.get("prompt"))
                failed[index] = JobNote(index, "failed", _text(line.get("error")) or "failed", seed, prompt)
    return [note for index, note in sorted(failed.items()) if index not in finished]


def _log_lines(log: Path) -> list[dict[str, Any]]:
    """The batch-line objects of a log; anything else (other JSONL, damaged lines) is passed over."""
    try:
        text = read_regular(log, MAX_LOG_BYTES, "the batch log").decode("utf-8", "replace")
    except LinFusionError:
        return []
    lines = []
    for raw in text.splitlines():
        with contextlib.suppress(ParseError):
            line = load_json(raw) if raw.strip().startswith("{") else None
            if isinstance(line, dict) and "schema" in line and "status" in line:
                lines.append(line)
    return lines


def read_claims(folder: Path) -> list[JobNote]:
    """Jobs a batch task has claimed and not finished: a `.NAME.claim` file whose NAME has no image yet.

    The claim's owner line (`pid N on HOST`) tells a live task from a dead one on this host; the file is only
    read, never locked (a lock, even a brief one, would make a batch task think the job was taken)."""
    notes = []
    for claim in sorted(folder.glob(f".*{CLAIM_SUFFIX}")):
        name = claim.name[1 : -len(CLAIM_SUFFIX)]
        if (folder / name).exists():
            continue
        index = int(name[:5]) if name[:5].isdigit() else None
        try:
            owner = read_regular(claim, MAX_CLAIM_BYTES, "a claim file").decode("utf-8", "replace").strip()
        except LinFusionError:
            continue
        found = _CLAIM_OWNER.fullmatch(owner)
        if found and found.group(2) == host_name() and not pid_alive(int(found.group(1))):
            notes.append(JobNote(index, "stopped", f"{name}: its task ({owner}) died before finishing"))
        else:
            notes.append(JobNote(index, "running", f"{name}: being made" + (f" ({owner})" if owner else "")))
    return notes


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""
