"""The precedence that merges a job's layers (lowest first): built-in defaults < preset < prompt-file defaults <
job row < flags the user set. Each layer is a plain dict of the keys it sets, validated on its own
(`validate_layer`: known keys in any case, right types, sane values, a message naming where the value came from),
then merged into one image's settings (`merge_layers`). No torch here: everything is checked before any model
loads."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..base.errors import UsageError
from ..base.sizes import is_two_sides, parse_aspect, split_size
from ..base.text import quote
from .jobspec import JobSpec
from .settings import FLAGS, coerce, problem, setting_name, table

ASPECT_AGREEMENT = 0.02  # relative: sides rounded to multiples of 8 (or of 64 in a preset) stay within this


def validate_layer(
    data: Mapping[str, Any],
    *,
    where: str,
    from_text: bool = False,
    forbidden: tuple[str, ...] = (),
    field_where: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Validate one layer (preset, file defaults, a row, flags): known keys (in any case), right types, sane
    values. `field_where`: where each field is written (its own line), for messages about it."""
    if not isinstance(data, Mapping):
        raise UsageError(f"{where}: expected a mapping of settings, got {type(data).__name__}")
    settings = table()
    out: dict[str, Any] = {}
    spelled: dict[str, str] = {}
    for key, value in data.items():
        if not isinstance(key, str):
            raise UsageError(f"{where}: field names must be text, got {quote(key)}")
        at = (field_where or {}).get(key, where)
        name = setting_name(key, settings)
        if name in spelled:
            raise UsageError(f"{at}: {quote(spelled[name])} and {quote(key)} are the same field; keep one")
        spelled[name] = key
        if name in forbidden:
            raise UsageError(f"{at}: '{key}' cannot be set here")
        if name == "size" and is_two_sides(value):
            if "width" in data or "height" in data:
                raise problem(at, name, "is WxH already; leave out width and height")
            try:
                sides = split_size(value)
            except TypeError as exc:
                raise problem(at, name, str(exc)) from None
            for side_key, side in zip(("width", "height"), sides, strict=True):
                out[side_key] = coerce(name, side, where=at)
            continue
        converted = coerce(name, value, where=at, from_text=from_text)
        if converted is not None:
            out[name] = converted
    _aspect_agrees(out, (field_where or {}).get("aspect", where))
    return out


def _aspect_agrees(layer: Mapping[str, Any], where: str) -> None:
    """Both sides given (`--size 4096x2048`, or --width and --height) leave no room for an aspect: one given beside
    them that says another shape is refused, not silently ignored (a preset's aspect under your WxH is not:
    yours wins, as everywhere)."""
    if not {"width", "height", "aspect"} <= layer.keys():
        return
    width, height = layer["width"], layer["height"]
    aw, ah = parse_aspect(layer["aspect"])
    if abs(width / height - aw / ah) > ASPECT_AGREEMENT * aw / ah:
        raise problem(
            where,
            "aspect",
            f"{layer['aspect']} is not the shape of {width}x{height}, which gives both sides; leave one of them out",
        )


def merge_layers(layers: list[tuple[str, Mapping[str, Any]]], require_prompt: bool = True) -> JobSpec:
    """Merge validated layers, lowest precedence first, into a JobSpec that remembers who set what."""
    job = JobSpec()
    for label, layer in layers:
        for key, value in layer.items():
            setattr(job, key, list(value) if isinstance(value, list) else value)
            job.sources[key] = label
    if require_prompt and not job.prompt.strip() and not job.image:
        where = job.sources.get("prompt", FLAGS)
        prefix = "" if where == FLAGS else f"{where}: "
        raise UsageError(f'{prefix}the prompt is empty: say what to draw, in quotes ("a red fox")')
    return job
