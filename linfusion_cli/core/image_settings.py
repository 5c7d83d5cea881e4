"""What an image records about how it was made, read back as job settings: `upscale IMAGE` and `replay IMAGE`
(when no sidecar is there), `info` and `view`.

Where it comes from, first found: the sidecar beside the image (`X.png.json`), this tool's own JSON chunk in a PNG
(the sidecar's content), or AUTOMATIC1111's `parameters` text (io/a1111.py) mapped to our settings. A value of an
image from elsewhere that this tool cannot take (a sampler diffusers lacks) is a warning, never a refusal."""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..base.errors import LinFusionError, UsageError
from ..base.events import Note
from ..engine.schedulers import with_schedule
from ..io.a1111 import Parameters, parse_parameters
from ..io.hashing import model_hash
from ..io.metadata import read_metadata
from .settings import coerce

# What `upscale IMAGE` takes from an image (the rest is the upscale's own: its size, strengths, refine...).
UPSCALE_TAKES = ("prompt", "negative", "seed", "scheduler", "steps", "guidance", "clip_skip", "lora", "embeddings")
A1111_FIELDS = {"Steps": "steps", "CFG scale": "guidance", "Seed": "seed", "Clip skip": "clip_skip"}
SIZE = re.compile(r"^\s*(\d+)\s*x\s*(\d+)\s*$")
MAX_PIXELS = 1_000_000_000


@dataclass
class Recorded:
    """An image's recorded settings (setting name -> value as recorded), where they were read, and the A1111
    `Model hash` it names."""

    where: str
    settings: dict[str, Any] = field(default_factory=dict)
    model_hash: str | None = None
    data: dict[str, Any] | None = None  # the whole sidecar (or this tool's chunk), when that is where they are


def sidecar_beside(image: Path) -> Path | None:
    """`X.png.json` (or the older `X.json`) beside an image, if there is one."""
    for candidate in (image.with_name(image.name + ".json"), image.with_suffix(".json")):
        if candidate.is_file():
            return candidate
    return None


def a1111_settings(params: Parameters) -> tuple[dict[str, Any], str | None]:
    """A1111's fields as our settings (text values, as a CSV cell's), and its Model hash. The size is the final
    one: `Size` times `Hires upscale`, or `Hires resize`."""
    out: dict[str, Any] = {"prompt": params.prompt, "negative": params.negative}
    fields = params.fields
    out |= {name: fields[key] for key, name in A1111_FIELDS.items() if fields.get(key)}
    if fields.get("Sampler"):
        out["scheduler"] = with_schedule(fields["Sampler"], fields.get("Schedule type"))
    size = SIZE.match(fields.get("Hires resize", "")) or SIZE.match(fields.get("Size", ""))
    if size:
        scale = 1.0 if "Hires resize" in fields else _number(fields.get("Hires upscale"), 1.0)
        out["width"], out["height"] = (str(round(int(side) * scale)) for side in size.groups())
    return out, fields.get("Model hash")


def _number(text: str | None, default: float) -> float:
    try:
        return float(text) if text else default
    except ValueError:
        return default


def recorded_settings(image: Path, max_pixels: int = MAX_PIXELS) -> Recorded | None:
    """What `image` records, from its sidecar, this tool's chunk, or A1111's text; None when it records nothing."""
    from .replay import read_sidecar  # replay reads images through this module

    sidecar = sidecar_beside(image)
    if sidecar is not None:
        with contextlib.suppress(LinFusionError):  # a damaged sidecar: what the image itself records, if anything
            data = read_sidecar(sidecar)
            return Recorded(f"sidecar {sidecar.name}", _ours(data), data.get("model_hash"), data)
    try:
        meta = read_metadata(image, max_pixels)
    except LinFusionError:  # not an image, or not one this tool reads: it records nothing
        return None
    if isinstance(meta.get("linfusion"), dict) and isinstance(meta["linfusion"].get("settings"), dict):
        data = meta["linfusion"]
        return Recorded(f"image {image.name} (its linfusion metadata)", _ours(data), data.get("model_hash"), data)
    if meta.get("parameters"):
        settings, digest = a1111_settings(parse_parameters(meta["parameters"]))
        return Recorded(f"image {image.name} (its A1111 parameters)", settings, digest)
    return None


def _ours(data: dict[str, Any]) -> dict[str, Any]:
    settings = dict(data.get("settings") or {})
    if isinstance(data.get("seed"), int):
        settings["seed"] = data["seed"]
    return settings


def readable(recorded: Recorded, names: tuple[str, ...] | None = None) -> tuple[dict[str, Any], list[Note]]:
    """The recorded settings (those in `names`) checked one by one: the good ones, and a warning for each value
    this tool cannot take."""
    taken: dict[str, Any] = {}
    notes: list[Note] = []
    for name, raw in recorded.settings.items():
        if names is not None and name not in names:
            continue
        try:
            value = coerce(name, raw, where=recorded.where, from_text=isinstance(raw, str))
        except UsageError as exc:
            notes.append(Note("warning", f"{exc}: not taken"))
            continue
        if value is not None:
            taken[name] = value
    return taken, notes


def model_hash_note(recorded: Recorded, model: str) -> list[Note]:
    """A warning when the image names a checkpoint hash and the model used is another file."""
    ours = model_hash(model)
    if not recorded.model_hash or ours is None or ours.lower().startswith(recorded.model_hash.lower()[:10]):
        return []
    return [
        Note(
            "warning",
            f"{recorded.where} was made with a model of hash {recorded.model_hash}; {model} has hash {ours}",
        )
    ]


def from_image(job: Any) -> list[Note]:
    """Settings a job takes from the image it is made from: `upscale IMAGE` takes the prompt, negative, seed,
    sampler, steps, CFG, clip skip, LoRAs and embedding folders its image records, where no layer of the job set
    them (flags, rows and presets override); `replay IMAGE` (`source_image`) was built from them already. Notes
    say what came from where, and warn of what could not be taken and of another model than the image's."""
    source = job.source_image or job.image
    recorded = recorded_settings(Path(source)) if source else None
    if recorded is None:
        return []
    values, notes = readable(recorded, None if job.source_image else UPSCALE_TAKES)
    for name, value in values.items():
        if name not in job.sources:
            setattr(job, name, value)
            job.sources[name] = recorded.where
    taken = [name for name in values if job.sources.get(name) == recorded.where]
    if taken:
        shown = ", ".join(f"{name} {_short(values[name])}" for name in taken)
        notes.append(Note("info", f"from {recorded.where}: {shown} (flags replace any of them)"))
    return notes + model_hash_note(recorded, job.model)


def _short(value: Any) -> str:
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 40 else text[:37] + "..."
