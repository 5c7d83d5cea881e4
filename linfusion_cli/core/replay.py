"""Turn a sidecar back into the job that made it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..base.errors import UsageError
from ..base.precision import dtype_flag
from ..io.files import ParseError, load_json, read_regular
from .settings import JobSpec, merge_layers, validate_layer

SIDECAR_ONLY = ("sources",)
MAX_SIDECAR_BYTES = 16 << 20


IMAGE_SIGNATURES = (b"\x89PNG", b"\xff\xd8\xff", b"RIFF", b"II*\x00", b"MM\x00*")  # PNG, JPEG, WebP, TIFF


def read_sidecar(path: Path) -> dict[str, Any]:
    """A sidecar's JSON object (a regular file of at most MAX_SIDECAR_BYTES); UsageError if it is not one."""
    data = read_regular(path, MAX_SIDECAR_BYTES, "sidecar")
    if data.startswith(IMAGE_SIGNATURES):
        raise UsageError(f"{path} is an image; replay reads its sidecar: {path}.json (written beside it)")
    try:
        value = load_json(data.decode("utf-8"))
    except (ParseError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path} is not a linfusion sidecar ({exc})") from None
    if not isinstance(value, dict):
        raise UsageError(f"{path} is not a linfusion sidecar (not a JSON object)")
    return value


def job_from_sidecar(path: Path) -> tuple[JobSpec, str]:
    """The recorded settings (seed included) as a JobSpec, and the recorded precision as its flag (fp16...)."""
    data = read_sidecar(path)
    settings, seed, file = data.get("settings"), data.get("seed"), data.get("file")
    if not isinstance(settings, dict) or isinstance(seed, bool) or not isinstance(seed, int):
        raise UsageError(f"{path} is not a linfusion sidecar (needs 'settings' and a whole-number 'seed')")
    settings = {**settings, "seed": seed}
    settings.pop("preset", None)  # its values are already resolved into the settings
    name = file.get("name") if isinstance(file, dict) else None
    if isinstance(name, str) and Path(name).stem:
        settings["name"] = Path(name).stem
    layer = validate_layer({k: v for k, v in settings.items() if k not in SIDECAR_ONLY}, where=f"sidecar {path.name}")
    job = merge_layers([(f"sidecar {path.name}", layer)])
    return job, dtype_flag(str(data.get("dtype", "auto")))
