"""Turn a sidecar back into the job that made it (`replay`), and say what a sidecar or an image records (`info`)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..base.errors import UsageError
from ..base.precision import dtype_flag
from ..base.schema import schema_problem
from ..io.files import ParseError, load_json, read_regular
from ..io.metadata import read_metadata
from .layers import merge_layers, validate_layer
from .metadata import a1111_parameters
from .settings import FLAGS, JobSpec, table

SIDECAR_ONLY = ("sources",)
MAX_SIDECAR_BYTES = 16 << 20


IMAGE_SIGNATURES = (b"\x89PNG", b"\xff\xd8\xff", b"RIFF", b"II*\x00", b"MM\x00*")  # PNG, JPEG, WebP, TIFF


def read_sidecar(path: Path) -> dict[str, Any]:
    """A sidecar's JSON object (a regular file of at most MAX_SIDECAR_BYTES, of a layout this version reads);
    UsageError if it is not one."""
    data = read_regular(path, MAX_SIDECAR_BYTES, "sidecar")
    if data.startswith(IMAGE_SIGNATURES):
        raise UsageError(f"{path} is an image; replay reads its sidecar: {path}.json (written beside it)")
    try:
        value = load_json(data.decode("utf-8"))
    except (ParseError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path} is not a linfusion sidecar ({exc})") from None
    if not isinstance(value, dict):
        raise UsageError(f"{path} is not a linfusion sidecar (not a JSON object)")
    problem = schema_problem(value)
    if problem:
        raise UsageError(f"{path}: {problem}")
    return value


def job_from_sidecar(path: Path, overrides: Mapping[str, Any] | None = None) -> tuple[JobSpec, str]:
    """The recorded settings (seed included) as a JobSpec, and the recorded precision as its flag (fp16...).
    `overrides` (flags: the model's folder moved) replace recorded settings; a relative path the job reads (an
    IP-Adapter's image, a control image) is found beside the sidecar, where it was when the sidecar was written
    relative to its folder, else where it is from here."""
    data = read_sidecar(path)
    settings, seed, file = data.get("settings"), data.get("seed"), data.get("file")
    if not isinstance(settings, dict) or isinstance(seed, bool) or not isinstance(seed, int):
        raise UsageError(f"{path} is not a linfusion sidecar (needs 'settings' and a whole-number 'seed')")
    settings = {**settings, "seed": seed}
    settings.pop("preset", None)  # its values are already resolved into the settings
    name = file.get("name") if isinstance(file, dict) else None
    if isinstance(name, str) and Path(name).stem:
        settings["name"] = Path(name).stem
    where = f"sidecar {path.name}"
    layer = validate_layer({k: v for k, v in settings.items() if k not in SIDECAR_ONLY}, where=where)
    layer = beside(layer, path.parent)
    flags = validate_layer({k: v for k, v in (overrides or {}).items() if v is not None}, where=FLAGS, from_text=True)
    job = merge_layers([(where, layer), (FLAGS, flags)])
    return job, dtype_flag(str(data.get("dtype", "auto")))


def beside(layer: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Relative paths of the settings that name files (`Setting.path`), found in `folder` where they are there."""
    out = dict(layer)
    for name, setting in table().items():
        if setting.path and out.get(name) is not None:
            value = out[name]
            out[name] = [_found(v, folder) for v in value] if isinstance(value, list) else _found(value, folder)
    return out


def _found(value: str, folder: Path) -> str:
    path = Path(value).expanduser()
    return str(folder / path) if not path.is_absolute() and (folder / path).exists() else value


def describe(path: Path, max_pixels: int) -> dict[str, Any]:
    """What `info` prints about an image (the parameters it carries), or about a sidecar (the same text, made
    from its settings)."""
    if path.suffix.lower() != ".json":
        return read_metadata(path, max_pixels)
    data = read_sidecar(path)
    try:
        parameters = a1111_parameters(data)
    except (KeyError, TypeError, ValueError):
        parameters = None
    size = f"{data.get('width')}x{data.get('height')}"
    return {"format": "linfusion sidecar", "size": size, "parameters": parameters, "linfusion": data}
