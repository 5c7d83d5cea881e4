"""Turn a sidecar back into the job that made it (`replay`), and say what a sidecar or an image records (`info`)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..base.errors import UsageError
from ..base.precision import dtype_flag
from ..base.schema import schema_problem
from ..io.a1111 import parse_parameters
from ..io.files import ParseError, load_json, read_regular
from ..io.metadata import read_metadata
from .image_settings import a1111_settings, readable, recorded_settings, sidecar_beside
from .jobspec import JobSpec
from .layers import merge_layers, validate_layer
from .metadata import a1111_parameters
from .settings import FLAGS, table

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
    relative to its folder, else where it is from here. An image instead of a sidecar: `job_from_image`."""
    if is_image(path):
        return job_from_image(path, overrides)
    return _job_from_record(read_sidecar(path), f"sidecar {path.name}", path, overrides)


def job_from_image(path: Path, overrides: Mapping[str, Any] | None = None) -> tuple[JobSpec, str]:
    """`replay IMAGE`: the job its sidecar records when one is beside it; else what the image itself records (this
    tool's own metadata chunk, the whole sidecar; or AUTOMATIC1111's parameters: prompt, negative, seed, sampler,
    steps, CFG, clip skip and size, LoRA tags in the prompt)."""
    sidecar = sidecar_beside(path)
    if sidecar is not None:
        return job_from_sidecar(sidecar, overrides)
    recorded = recorded_settings(path)
    if recorded is None:
        raise UsageError(
            f"{path} records no generation parameters (no sidecar beside it, no A1111 parameters, no linfusion "
            "metadata): nothing to replay"
        )
    if recorded.data is not None:
        return _job_from_record(recorded.data, recorded.where, path, overrides)
    values, _ = readable(recorded)  # what cannot be taken is said again when the job is planned
    flags = validate_layer({k: v for k, v in (overrides or {}).items() if v is not None}, where=FLAGS, from_text=True)
    job = merge_layers([(recorded.where, {**values, "source_image": str(path)}), (FLAGS, flags)])
    return job, dtype_flag("auto")


def is_image(path: Path) -> bool:
    """Whether a file starts as an image does (PNG, JPEG, WebP, TIFF), whatever its size or name."""
    try:
        with open(path, "rb") as handle:
            return handle.read(8).startswith(IMAGE_SIGNATURES)
    except OSError:
        return False


def _job_from_record(
    data: dict[str, Any], where: str, path: Path, overrides: Mapping[str, Any] | None
) -> tuple[JobSpec, str]:
    """A job from a sidecar's data (read from the sidecar `path`, or from the image `path` that carries it)."""
    settings, seed, file = data.get("settings"), data.get("seed"), data.get("file")
    if not isinstance(settings, dict) or isinstance(seed, bool) or not isinstance(seed, int):
        raise UsageError(f"{path} is not a linfusion sidecar (needs 'settings' and a whole-number 'seed')")
    settings = {**settings, "seed": seed}
    settings.pop("preset", None)  # its values are already resolved into the settings
    name = file.get("name") if isinstance(file, dict) else None
    if isinstance(name, str) and Path(name).stem:
        settings["name"] = Path(name).stem
    if is_image(path):
        settings["source_image"] = str(path)
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
    if path.suffix.lower() != ".json" or is_image(path):
        meta = read_metadata(path, max_pixels)
        if meta.get("parameters"):
            params = parse_parameters(meta["parameters"])
            meta["a1111"] = params.as_dict()
            meta["a1111"]["settings"], _ = a1111_settings(params)
        return meta
    data = read_sidecar(path)
    try:
        parameters = a1111_parameters(data)
    except (KeyError, TypeError, ValueError):
        parameters = None
    size = {"width": data.get("width"), "height": data.get("height")}
    return {"format": "linfusion sidecar", **size, "parameters": parameters, "linfusion": data}
