"""Turn a sidecar back into the job that made it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .config import JobSpec, merge_layers, validate_layer
from .errors import UsageError

SIDECAR_ONLY = ("sources",)
MAX_SIDECAR_BYTES = 16 << 20


def job_from_sidecar(path: Path) -> tuple[JobSpec, str]:
    """The recorded settings (seed included) as a JobSpec, and the recorded precision."""
    try:
        if path.stat().st_size > MAX_SIDECAR_BYTES:
            raise UsageError(f"{path} is larger than {MAX_SIDECAR_BYTES >> 20} MiB: not a linfusion sidecar")
        data: Any = json.loads(path.read_text(encoding="utf-8"))
        settings = dict(data["settings"])
        seed = int(data["seed"])
    except OSError as exc:
        raise UsageError(f"cannot read sidecar {path}: {exc.strerror or exc}") from None
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise UsageError(f"{path} is not a linfusion sidecar (needs 'settings' and 'seed')") from None
    settings["seed"] = seed
    settings.pop("preset", None)  # its values are already resolved into the settings
    name = Path(str(data.get("file", {}).get("name", ""))).stem or None
    if name:
        settings["name"] = name
    layer = validate_layer({k: v for k, v in settings.items() if k not in SIDECAR_ONLY}, where=f"sidecar {path.name}")
    job = merge_layers([(f"sidecar {path.name}", layer)])
    return job, str(data.get("dtype", "auto")).replace("float32", "fp32").replace("float16", "fp16").replace(
        "bfloat16", "bf16"
    )
