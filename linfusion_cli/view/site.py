"""`build_site`: a folder of images (or one image) as a static site of deep-zoom pages and a contact sheet.

A site is a folder:

    index.html              the contact sheet: every image of the site, newest first
    pages/SLUG.html         one deep-zoom page per image
    tiles/SLUG.dzi          its pyramid's descriptor, and the tiles in tiles/SLUG_files/LEVEL/COL_ROW.jpg
    thumbs/SLUG.jpg         its thumbnail, cut from the pyramid
    assets/                 styles, scripts, and the viewer (OpenSeadragon, with its button images)
    site.json               what was built from which file, so that a rerun only adds what is new

Reruns are incremental: an image whose bytes and mtime match site.json keeps its pyramid, so a batch that is still
running can be viewed as it grows; pages are rewritten only when their text changes (a sidecar that appeared, a
new viewer). Images that left their folder leave the site. Runs on one site take turns (a lock on `site.json`'s
folder), so `generate --view` from several tasks sharing an output folder cannot interleave.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import time
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple

from ..base.errors import InputImageError, LinFusionError, OutputFolderError, UsageError
from ..io.files import ParseError, load_json, quote, read_regular
from .assets import install_viewer
from .pages import Card, contact_sheet, image_page
from .pyramid import PART_PREFIX, TILE_FORMATS, ImageUnreadable, Pyramid, cut_pyramid, load_pyvips, make_thumbnail
from .records import (
    IMAGE_SUFFIXES,
    JobNote,
    file_signature,
    image_folders,
    list_folder,
    read_claims,
    read_job_logs,
    read_sidecar,
)

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: runs on one site do not take turns there
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

SITE_DIR = "view"  # the default site: FOLDER/view (an image's: its folder's view/)
STATE_FILE = "site.json"
STATE_SCHEMA = 1
MAX_STATE_BYTES = 64 << 20
SLUG_CHARS = 60
STATIC_FILES = ("view.css", "zoom.js", "sheet.js")
SUBDIRS = ("pages", "tiles", "thumbs", "assets")

Progress = Callable[[Path, "Pyramid | None", float], None]  # after each cut: (image, pyramid or None if damaged, s)


@dataclass
class SiteReport:
    """What a build did. `page` is the one to open: the image's page for an image, else the contact sheet."""

    site: Path
    index: Path
    page: Path
    images: int = 0
    new: list[str] = field(default_factory=list)  # images whose pyramid was cut in this run
    unchanged: int = 0
    pages_written: int = 0
    damaged: list[tuple[str, str]] = field(default_factory=list)  # (file name, why)
    failed_jobs: int = 0
    unfinished_jobs: int = 0
    not_images: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "schema": STATE_SCHEMA,
            "site": str(self.site),
            "index": str(self.index),
            "page": str(self.page),
            "url": self.page.resolve().as_uri(),
            "images": self.images,
            "new": self.new,
            "unchanged": self.unchanged,
            "pages_written": self.pages_written,
            "damaged": [{"file": name, "error": why} for name, why in self.damaged],
            "failed_jobs": self.failed_jobs,
            "unfinished_jobs": self.unfinished_jobs,
            "not_images": self.not_images,
            "seconds": round(self.seconds, 3),
        }


class ImageFiles(NamedTuple):
    """Where one image's files are in a site (see the module docstring)."""

    base: Path  # the pyramid's name without suffix: base.dzi and base_files/
    dzi: Path
    tiles: Path
    thumb: Path
    page: Path


def image_files(site: Path, slug: str) -> ImageFiles:
    base = site / "tiles" / slug
    return ImageFiles(base, base.with_name(f"{slug}.dzi"), base.with_name(f"{slug}_files"),
                      site / "thumbs" / f"{slug}.jpg", site / "pages" / f"{slug}.html")  # fmt: skip


def default_site(source: Path) -> Path:
    return (source if source.is_dir() else source.parent) / SITE_DIR


def build_site(
    source: Path,
    out: Path | None = None,
    *,
    viewer_js: str | Path | None = None,
    tiles: str = "jpeg",
    job_logs: tuple[Path, ...] = (),
    progress: Progress | None = None,
) -> SiteReport:
    """Build or update the site for `source` (an image or a folder of them) in `out` (default: `view/` beside).

    This is what `linfusion view` runs, and what `generate --view` / `batch --view` call with their output
    (the output folder, or the finished image). `viewer_js`: where pages get OpenSeadragon (`assets`: by default
    the copy this package ships, copied into the site); `job_logs`
    are `batch --json` logs whose failed jobs the contact sheet lists (a folder's own `*.jsonl` logs are read
    too). Raises UsageError for a missing source, OutputFolderError for a site folder that cannot be written,
    InputImageError when the one image given cannot be read; a damaged image in a folder is listed instead."""
    started = time.perf_counter()
    if tiles not in TILE_FORMATS:
        raise UsageError(f"--tiles must be one of {', '.join(TILE_FORMATS)}, not {quote(tiles)}")
    source = source.expanduser().absolute()
    site = (out or default_site(source)).expanduser().absolute()
    images, others = _sources(source, site)
    load_pyvips()  # before anything is written: without libvips there is nothing to build
    _prepare(site)
    report = SiteReport(site, site / "index.html", site / "index.html", images=len(images), not_images=len(others))
    with _site_lock(site):
        _remove_leftovers(site)
        viewer = install_viewer(site, viewer_js)
        state = _load_state(site)
        for image in images:
            _refresh(site, image, state, tiles, report, progress)
        if source.is_file() and state[str(source)]["damage"]:
            _save_state(site, state)
            raise InputImageError(f"{quote(source.name)} cannot be read as an image: {state[str(source)]['damage']}")
        _forget_missing(site, state)
        cards = [_card(Path(key), entry, source) for key, entry in state.items()]
        jobs = _job_notes(source, job_logs, site)
        report.failed_jobs = sum(note.status == "failed" for note in jobs)
        report.unfinished_jobs = len(jobs) - report.failed_jobs
        _write_pages(site, cards, jobs, viewer, report, title=_title(source))
        _save_state(site, state)
    if source.is_file():
        report.page = image_files(site, state[str(source)]["slug"]).page
    report.seconds = time.perf_counter() - started
    return report


def _sources(source: Path, site: Path) -> tuple[list[Path], list[Path]]:
    """(images, other files) to build from: the folder's (and its sub-folders', but the site's), or the one image."""
    if source.is_dir():
        try:
            return list_folder(source, skip=site)
        except OSError as exc:
            raise UsageError(f"cannot list the folder {quote(str(source))}: {exc.strerror or exc}") from None
    if not source.exists():
        raise UsageError(f"{quote(str(source))} does not exist: give an image or a folder of images")
    if not source.is_file() or not source.name.lower().endswith(IMAGE_SUFFIXES):
        raise UsageError(f"{quote(str(source))} is not an image ({', '.join(IMAGE_SUFFIXES)}) or a folder")
    return [source.absolute()], []


def _prepare(site: Path) -> None:
    """Create the site's folders, or say in one line why they cannot be written (exit 2)."""
    try:
        for sub in SUBDIRS:
            (site / sub).mkdir(parents=True, exist_ok=True)
        probe = site / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise OutputFolderError(
            f"cannot write the site folder {quote(str(site))}: {exc.strerror or exc}; choose another with --out"
        ) from None


@contextlib.contextmanager
def _site_lock(site: Path) -> Iterator[None]:
    """One build at a time per site: a lock the kernel drops if the build dies."""
    handle = open(site / ".lock", "a+b")  # noqa: SIM115 - held for the whole build
    try:
        if fcntl is not None:
            with contextlib.suppress(OSError):  # a filesystem without locks: go ahead unguarded
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        yield
    finally:
        handle.close()


def _remove_leftovers(site: Path) -> None:
    """Temp files and half-cut pyramids of a build that was killed: safe to remove while holding the site's lock,
    since no other build of this site can be writing them."""
    for part in [*site.glob(f"tiles/{PART_PREFIX}*"), *site.glob("*/.*.part-*"), *site.glob(".*.part-*")]:
        if part.is_dir() and not part.is_symlink():
            shutil.rmtree(part, ignore_errors=True)
        else:
            part.unlink(missing_ok=True)


def slug_for(image: Path) -> str:
    """The image's name in the site: ASCII letters, digits, `-` and `_` only (so tile URLs need no escaping
    in HTML, file:// or a server), plus a hash of its full path (two folders' `a.png` stay apart)."""
    ascii_stem = unicodedata.normalize("NFKD", image.stem).encode("ascii", "ignore").decode()  # "côte" -> "cote"
    stem = re.sub(r"[^A-Za-z0-9_-]+", "-", ascii_stem).strip("-")[:SLUG_CHARS] or "image"
    digest = hashlib.sha1(str(image.absolute()).encode("utf-8", "surrogateescape")).hexdigest()[:8]
    return f"{stem}-{digest}"


def _refresh(
    site: Path, image: Path, state: dict[str, Any], tiles: str, report: SiteReport, progress: Progress | None
) -> None:
    """Cut the image's pyramid and thumbnail unless site.json says they were cut from these very bytes."""
    key = str(image)
    entry = state.get(key) or {}
    signature = file_signature(image)
    slug = entry.get("slug") or slug_for(image)
    files = image_files(site, slug)
    cut_before = entry.get("damage") or (files.dzi.is_file() and files.thumb.is_file())
    if entry.get("signature") == signature and cut_before:
        report.unchanged += 1
    else:
        pyramid, damage = _cut(site, image, slug, tiles, progress)
        entry = {"slug": slug, "signature": signature, "pyramid": pyramid and pyramid.as_dict(), "damage": damage}
        state[key] = entry
        if damage is None:
            report.new.append(image.name)
    if entry.get("damage"):
        report.damaged.append((image.name, entry["damage"]))


def _card(image: Path, entry: dict[str, Any], source: Path) -> Card:
    """The image as the pages show it: what site.json holds of its pyramid, and its sidecar as it is now; named by
    its path below the source folder (`night-2/00003_....png`)."""
    pyramid = Pyramid(**entry["pyramid"]) if isinstance(entry.get("pyramid"), dict) else None
    sidecar = read_sidecar(image)
    signature = entry.get("signature")
    when = sidecar.created() or (signature[1] / 1e9 if signature else 0.0)
    name = image.relative_to(source).as_posix() if source.is_dir() and image.is_relative_to(source) else image.name
    return Card(name, entry["slug"], pyramid, sidecar, entry.get("damage"), when)


def _cut(
    site: Path, image: Path, slug: str, tiles: str, progress: Progress | None
) -> tuple[Pyramid | None, str | None]:
    """(pyramid, None), or (None, why) for an image libvips cannot read; the site's own disk errors raise."""
    started = time.perf_counter()
    try:
        files = image_files(site, slug)
        pyramid = cut_pyramid(image, files.base, tiles)
        make_thumbnail(pyramid, files.tiles, files.thumb)
    except ImageUnreadable as exc:
        log.info("%s cannot be read as an image: %s", image.name, exc)  # the report lists it
        _remove(site, slug)
        if progress:
            progress(image, None, time.perf_counter() - started)
        return None, str(exc)
    except OSError as exc:  # the site's disk, not the image: the whole build cannot go on
        raise OutputFolderError(f"cannot write the pyramid of {quote(image.name)}: {exc.strerror or exc}") from None
    if progress:
        progress(image, pyramid, time.perf_counter() - started)
    return pyramid, None


def _remove(site: Path, slug: str) -> None:
    """A dropped image's files: only names this module made from its slug, inside the site."""
    files = image_files(site, slug)
    shutil.rmtree(files.tiles, ignore_errors=True)
    for path in (files.dzi, files.thumb, files.page):
        path.unlink(missing_ok=True)


def _forget_missing(site: Path, state: dict[str, Any]) -> None:
    """Images that are gone from where they were leave the site, with their files."""
    for key in [key for key in state if not Path(key).is_file()]:
        _remove(site, state.pop(key)["slug"])


def _job_notes(source: Path, job_logs: tuple[Path, ...], site: Path) -> list[JobNote]:
    """Failed jobs from the logs given and the folder's own `*.jsonl`, and jobs claimed but not finished."""
    for log_file in job_logs:
        if not log_file.is_file():
            raise UsageError(f"--jobs: {quote(str(log_file))} is not a file")
    if not source.is_dir():
        return read_job_logs(list(job_logs))
    folders = image_folders(source, skip=site)
    own = [path for folder in folders for path in sorted(folder.glob("*.jsonl")) if path.is_file()]
    return read_job_logs([*job_logs, *own]) + [note for folder in folders for note in read_claims(folder)]


def _title(source: Path) -> str:
    return source.absolute().name if source.is_dir() else source.absolute().parent.name


def _write_pages(
    site: Path, cards: list[Card], jobs: list[JobNote], viewer: Any, report: SiteReport, title: str
) -> None:
    for name in STATIC_FILES:
        report.pages_written += write_if_changed(
            site / "assets" / name, (resources.files(__package__) / "static" / name).read_text("utf-8")
        )
    for card in cards:
        if card.pyramid is not None:
            report.pages_written += write_if_changed(image_files(site, card.slug).page, image_page(card, viewer))
    report.pages_written += write_if_changed(site / "index.html", contact_sheet(title, cards, jobs, report.not_images))


def write_if_changed(path: Path, text: str) -> bool:
    """Write `text` atomically unless the file already holds it: reruns leave unchanged pages untouched."""
    data = text.encode("utf-8")
    with contextlib.suppress(OSError):
        if path.stat().st_size == len(data) and path.read_bytes() == data:
            return False
    part = path.with_name(f".{path.name}.part-{os.getpid()}")
    try:
        part.write_bytes(data)
        os.replace(part, path)
    except OSError as exc:
        part.unlink(missing_ok=True)
        raise OutputFolderError(f"cannot write {quote(str(path))}: {exc.strerror or exc}") from None
    return True


def _load_state(site: Path) -> dict[str, Any]:
    """site.json's images by absolute path; a missing or unreadable one starts the site afresh."""
    path = site / STATE_FILE
    if not path.is_file():
        return {}
    try:
        data = load_json(read_regular(path, MAX_STATE_BYTES, "the site's state").decode("utf-8"))
    except (LinFusionError, ParseError, UnicodeDecodeError) as exc:
        log.warning("%s cannot be read (%s): every image is cut again", path, exc)
        return {}
    images = data.get("images") if isinstance(data, dict) and data.get("schema") == STATE_SCHEMA else None
    return {key: value for key, value in (images or {}).items() if isinstance(value, dict) and "slug" in value}


def _save_state(site: Path, state: dict[str, Any]) -> None:
    write_if_changed(
        site / STATE_FILE, json.dumps({"schema": STATE_SCHEMA, "images": state}, indent=1, ensure_ascii=False)
    )
