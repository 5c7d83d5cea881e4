"""The site's HTML: one deep-zoom page per image and the contact sheet.

Every value that comes from a file (prompts, settings, file names, error messages) is text to escape: the pages
are built from strings with `html.escape` on each value, and the one JSON object a page carries for its script
has `<`, `>` and `&` written as `\\u003c`... so that a prompt holding `</script>` cannot end the script element.
Scripts and styles are files in `assets/` (from `static/`), so no prompt is ever part of code.
"""

from __future__ import annotations

import html
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .assets import Viewer
from .pyramid import Pyramid
from .records import JobNote, Sidecar

MAX_ZOOM_PIXEL_RATIO = 16  # the deepest zoom: one image pixel as a 16x16 square of screen pixels
TITLE_CHARS = 80
# settings under each thumbnail, in this order (value formatting in key_settings)
KEY_SETTINGS = ("steps", "guidance", "scheduler", "refine")
# the page's "Settings" list: what decides the picture, when set (everything is in "All settings" below it)
MAIN_SETTINGS = (
    "negative", "steps", "guidance", "scheduler", "refine", "strengths", "strength", "preset", "base_size",
    "lora", "controlnet", "control_image", "ip_adapter", "ip_image", "vae", "image",
)  # fmt: skip
_SCRIPT_ESCAPES = {ord("<"): "\\u003c", ord(">"): "\\u003e", ord("&"): "\\u0026"}


@dataclass
class Card:
    """One image as the pages show it: its pyramid (None when damaged), its sidecar, and why it is marked."""

    name: str  # the image's file name
    slug: str  # its names in the site: pages/SLUG.html, tiles/SLUG_files/, thumbs/SLUG.jpg
    pyramid: Pyramid | None
    sidecar: Sidecar
    damage: str | None  # why libvips could not read it
    when: float  # newest first: the sidecar's `created`, else the file's mtime


def esc(value: Any) -> str:
    return html.escape(value if isinstance(value, str) else _plain(value), quote=True)


def _plain(value: Any) -> str:
    """A setting as a person reads it: strings bare, None as a dash, a list of plain values (LoRAs, strengths)
    joined by commas, anything else as compact JSON."""
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(item, str | int | float) for item in value):
        return ", ".join(_plain(item) for item in value) or "-"
    return json.dumps(value, ensure_ascii=False, separators=(", ", ": "), default=str)


def megapixels(width: int, height: int) -> str:
    """268.4 MP, 4.2 MP, 0.04 MP: two significant figures at least, so a small image is not "0.0 MP"."""
    mp = width * height / 1e6
    return f"{mp:.1f} MP" if mp >= 1 else f"{mp:.2g} MP"


def file_name(name: str) -> str:
    """A file name as HTML that wraps after its `/`, `_` and `-` (a batch's long names), never inside a word."""
    return "".join(esc(char) + ("<wbr>" if char in "/_-" else "") for char in name)


def script_json(data: Any) -> str:
    """JSON safe inside a <script> element whatever its strings hold."""
    return json.dumps(data, ensure_ascii=False).translate(_SCRIPT_ESCAPES)


def _document(title: str, body_class: str, body: str, prefix: str) -> str:
    return (
        '<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        '<link rel="icon" href="data:,">\n'  # no favicon.ico request (a 404 on every page served)
        f"<title>{esc(title)}</title>\n"
        f'<link rel="stylesheet" href="{prefix}assets/view.css">\n'
        f'</head>\n<body class="{body_class}">\n{body}\n</body>\n</html>\n'
    )


def _short(text: str, limit: int = TITLE_CHARS) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _size_text(card: Card) -> str:
    if card.pyramid is None:
        return ""
    width, height = card.pyramid.width, card.pyramid.height
    return f"{width}x{height}"


def key_settings(card: Card) -> str:
    """seed . WxH . steps . guidance . scheduler . refine . model: what tells jobs of a batch apart."""
    data, settings = card.sidecar.data, card.sidecar.settings
    parts = [f"seed {data['seed']}"] if "seed" in data else []
    parts += [_size_text(card)] if card.pyramid else []
    labels = {"steps": "{} steps", "guidance": "cfg {}", "scheduler": "{}", "refine": "{}"}
    if settings.get("steps") == 1:
        labels["steps"] = "{} step"  # not "1 steps"
    parts += [labels[key].format(_plain(settings[key])) for key in KEY_SETTINGS if settings.get(key) is not None]
    parts += [_plain(data["model"])] if data.get("model") else []
    return " · ".join(parts)


# --- the deep-zoom page ----------------------------------------------------------------------------------------


def image_page(card: Card, viewer: Viewer) -> str:
    """The page of one image: the viewer on the left, everything its sidecar says on the right."""
    assert card.pyramid is not None  # damaged images have no page
    config = {
        "tileSource": card.pyramid.tile_source(f"../tiles/{card.slug}_files/"),
        "buttons": viewer.buttons,
        "script": viewer.script,
        "maxZoomPixelRatio": MAX_ZOOM_PIXEL_RATIO,
    }
    integrity = f' integrity="{esc(viewer.integrity)}" crossorigin="anonymous"' if viewer.integrity else ""
    title = _short(card.sidecar.prompt or card.name)
    body = (
        '<main>\n<div id="viewer" class="viewer" role="img" aria-label="the image, zoomable">'
        '<div id="zoom-readout"></div></div>\n'
        f'<aside class="meta">\n<p><a href="../index.html">&larr; all images</a></p>\n'
        f"<h1>{esc(card.sidecar.prompt or card.name)}</h1>\n{_notes(card)}{_facts(card)}{_settings(card)}"
        f"{_timings(card.sidecar.data)}{_all_settings(card.sidecar.settings)}"
        f'<p class="viewer-source">viewer: {esc(viewer.source)}</p>\n</aside>\n</main>\n'
        f'<script src="{esc(viewer.script)}"{integrity}></script>\n'
        f'<script type="application/json" id="view-config">{script_json(config)}</script>\n'
        '<script src="../assets/zoom.js"></script>'
    )
    return _document(f"{title} · linfusion", "zoom", body, "../")


def _notes(card: Card) -> str:
    notes = [card.sidecar.problem] if card.sidecar.problem else []
    return "".join(f'<p class="note">{esc(note)}</p>\n' for note in notes)


def _dl(rows: Iterable[tuple[str, Any]]) -> str:
    items = "".join(f"<dt>{esc(label)}</dt><dd>{esc(value)}</dd>" for label, value in rows)
    return f"<dl>{items}</dl>\n" if items else ""


def _facts(card: Card) -> str:
    data, pyramid = card.sidecar.data, card.pyramid
    assert pyramid is not None
    size = f"{_size_text(card)} ({megapixels(pyramid.width, pyramid.height)})"
    rows: list[tuple[str, Any]] = [("file", card.name), ("size", size)]
    rows += [(key, data[key]) for key in ("seed", "model", "family", "linfusion", "device", "dtype") if key in data]
    rows += [("created", data["created"])] if "created" in data else []
    levels = pyramid.top_level + 1
    rows.append(
        ("pyramid", f"{levels} levels, {pyramid.tile_count():,} {pyramid.format} tiles of {pyramid.tile_size} px")
    )
    return "<h2>Image</h2>\n" + _dl(rows)


def _settings(card: Card) -> str:
    settings = card.sidecar.settings
    rows = [(key, settings[key]) for key in MAIN_SETTINGS if settings.get(key) not in (None, "", [])]
    return "<h2>Settings</h2>\n" + _dl(rows) if rows else ""


def _timings(data: dict[str, Any]) -> str:
    seconds = data.get("seconds")
    out = ""
    if isinstance(seconds, dict) and seconds:
        out += "<h2>Seconds</h2>\n" + _dl((phase, value) for phase, value in seconds.items())
    stages = [stage for stage in data.get("stages") or [] if isinstance(stage, dict)]
    if stages:
        head = "<tr><th>stage</th><th>size</th><th>strength</th><th>steps</th><th>seconds</th><th>memory</th></tr>"
        rows = "".join(
            "<tr>" + "".join(f"<td>{esc(cell)}</td>" for cell in _stage_cells(stage)) + "</tr>" for stage in stages
        )
        out += f"<h2>Stages</h2>\n<table>{head}{rows}</table>\n"
    return out


def _stage_cells(stage: dict[str, Any]) -> list[Any]:
    memory = stage.get("memory_settings")
    memory_name = memory.get("name") if isinstance(memory, dict) else memory
    return [
        stage.get("kind"),
        stage.get("size"),
        stage.get("strength"),
        stage.get("steps"),
        stage.get("seconds"),
        memory_name,
    ]


def _all_settings(settings: dict[str, Any]) -> str:
    if not settings:
        return ""
    rows = "".join(f"<tr><th>{esc(key)}</th><td>{esc(value)}</td></tr>" for key, value in sorted(settings.items()))
    return f"<details><summary>All settings</summary><table>{rows}</table></details>\n"


# --- the contact sheet -----------------------------------------------------------------------------------------


def contact_sheet(title: str, cards: list[Card], jobs: list[JobNote], not_images: int) -> str:
    """Thumbnails newest first, then the jobs that left no image; a filter box over prompts and names."""
    ordered = sorted(cards, key=lambda card: card.when, reverse=True)
    damaged = sum(card.damage is not None for card in cards)
    counts = [f"{len(cards)} image{'s' if len(cards) != 1 else ''}"]
    counts += [f"{damaged} damaged"] if damaged else []
    failed = sum(note.status == "failed" for note in jobs)
    counts += [f"{failed} failed job{'s' if failed != 1 else ''}"] if failed else []
    running = len(jobs) - failed
    counts += [f"{running} unfinished"] if running else []
    counts += [f"{not_images} other file{'s' if not_images != 1 else ''} skipped"] if not_images else []
    body = (
        f"<header><h1>{esc(title)}</h1>"
        '<input id="filter" type="search" placeholder="filter by prompt or file name" aria-label="filter">'
        f'<span class="counts">{esc(", ".join(counts))}</span> <span id="shown" class="counts"></span></header>\n'
        '<main class="grid">\n'
        + "".join(map(_card, ordered))
        + "".join(map(_job_card, jobs))
        + '</main>\n<script src="assets/sheet.js"></script>'
    )
    return _document(f"{title} · linfusion", "sheet", body, "")


def _card(card: Card) -> str:
    prompt = card.sidecar.prompt
    text = " ".join([prompt, str(card.sidecar.settings.get("negative") or ""), card.name]).lower()
    if card.damage is not None:
        thumb = f'<div class="thumb empty">damaged: {esc(card.damage)}</div>'
        badge, kind = '<span class="badge bad">damaged</span>', " damaged"
    else:
        thumb = (
            f'<a class="thumb" href="pages/{card.slug}.html">'
            f'<img src="thumbs/{card.slug}.jpg" alt="{esc(_short(prompt or card.name))}" loading="lazy"></a>'
        )
        badge = f'<span class="badge">{esc(_badge(card.sidecar))}</span>' if card.sidecar.problem else ""
        kind = ""
    caption = f'<p class="prompt">{esc(prompt)}</p>' if prompt else ""
    return (
        f'<article class="card{kind}" data-text="{esc(text)}">{thumb}<div class="text">{badge}{caption}'
        f'<span class="keys">{esc(key_settings(card))}</span><span class="file">{file_name(card.name)}</span>'
        "</div></article>\n"
    )


def _badge(sidecar: Sidecar) -> str:
    if sidecar.signature is None:
        return "settings from the image" if sidecar.data else "no sidecar"
    return "incomplete" if sidecar.data.get("complete") is False else "sidecar unreadable"


def _job_card(note: JobNote) -> str:
    label = {"failed": "failed", "running": "being made", "stopped": "stopped"}[note.status]
    job = f"job {note.index}" if note.index is not None else "a job"
    seed = f" · seed {note.seed}" if note.seed is not None else ""
    bad = " bad" if note.status != "running" else ""
    caption = f'<p class="prompt">{esc(note.prompt)}</p>' if note.prompt else ""
    text = f"{note.prompt} {note.detail}".lower()
    return (
        f'<article class="card job{" failed" if bad else ""}" data-text="{esc(text)}">'
        f'<div class="thumb empty">{esc(job)}: {esc(label)}</div><div class="text">'
        f'<span class="badge{bad}">{esc(label)}</span>{caption}<span class="keys">{esc(job + seed)}</span>'
        f'<span class="file">{esc(note.detail)}</span></div></article>\n'
    )
