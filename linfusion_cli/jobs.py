"""Jobs from the command line and from prompt files, merged in precedence order:
built-in defaults < preset < file defaults < job row < flags the user set."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .config import FLAGS, JobSpec, merge_layers, validate_layer
from .presets import load_preset


def resolve_job(
    flags: Mapping[str, Any],
    *,
    file_defaults: Mapping[str, Any] | None = None,
    row: Mapping[str, Any] | None = None,
    row_label: str = "job",
    defaults_label: str = "file defaults",
    require_prompt: bool = True,
) -> JobSpec:
    """Merge the layers of one job. `flags`, `file_defaults` and `row` must already be validated."""
    file_defaults = file_defaults or {}
    row = row or {}
    preset_name = flags.get("preset") or row.get("preset") or file_defaults.get("preset")
    layers: list[tuple[str, Mapping[str, Any]]] = []
    if preset_name:
        preset = load_preset(preset_name)
        layers.append((preset.label, preset.settings))
    layers += [(defaults_label, file_defaults), (row_label, row), (FLAGS, flags)]
    return merge_layers(layers, require_prompt=require_prompt)


def flags_layer(values: Mapping[str, Any]) -> dict[str, Any]:
    """The flags the user actually set (None means 'not given'), validated."""
    return validate_layer({k: v for k, v in values.items() if v is not None}, where=FLAGS)
