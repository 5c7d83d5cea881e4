"""Jobs from the command line and from prompt files, merged in precedence order:
built-in defaults < preset < file defaults < job row < flags the user set."""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..base.errors import JobFileError, UsageError
from ..base.text import quote
from ..io.files import ParseError, load_json, load_yaml, read_regular
from .presets import load_preset
from .settings import FLAGS, JobSpec, merge_layers, validate_layer


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
    """The flags the user actually set (None means 'not given'), validated; numbers given as text (a flag's
    value) are read as a prompt file's text cells are."""
    return validate_layer({k: v for k, v in values.items() if v is not None}, where=FLAGS, from_text=True)


# --- prompt files ---------------------------------------------------------------------------------------------

MAX_FILE_BYTES = 64 << 20
MAX_JOBS = 1_000_000
TOP_LEVEL_KEYS = ("defaults", "jobs")
FORMATS_BY_SUFFIX = {".txt": "txt", ".yaml": "yaml", ".yml": "yaml", ".jsonl": "jsonl", ".csv": "csv"}


@dataclass(frozen=True)
class JobRow:
    """One job as written in the file: where it is (for messages) and its validated fields."""

    index: int
    where: str
    values: dict[str, Any]


@dataclass(frozen=True)
class JobFile:
    defaults: dict[str, Any]
    rows: list[JobRow]


def read_job_file(path: str | Path) -> JobFile:
    """Parse and validate a whole prompt file; any problem is a JobFileError naming file, line and field."""
    file = Path(path)
    kind = FORMATS_BY_SUFFIX.get(file.suffix.lower())
    if kind is None:
        raise JobFileError(f"{file}: unknown prompt file type '{file.suffix}'; use .txt, .yaml, .yml, .jsonl or .csv")
    text = _read_text(file)
    defaults: dict[str, Any] = {}
    raw: list[tuple[str, Any, bool]]  # (where, row, from_text)
    if kind == "txt":
        raw = [
            (f"{file.name} line {n}", {"prompt": line.strip()}, True)
            for n, line in enumerate(text.splitlines(), 1)
            if line.strip() and not line.lstrip().startswith("#")
        ]
    elif kind == "jsonl":
        raw = _jsonl_rows(file, text)
    elif kind == "csv":
        raw = _csv_rows(file, text)
    else:
        raw, defaults_raw = _yaml_rows(file, text)
        defaults = _validate(defaults_raw, f"{file.name} defaults", from_text=False)
    if not raw:
        raise JobFileError(f"{file}: no jobs in the file (only blank lines or comments): nothing to do")
    if len(raw) > MAX_JOBS:
        raise JobFileError(f"{file}: {len(raw)} jobs; the limit is {MAX_JOBS} per file (split it)")
    rows = [JobRow(i, where, _validate(values, where, from_text)) for i, (where, values, from_text) in enumerate(raw)]
    for row in rows:
        if not str(row.values.get("prompt", defaults.get("prompt", ""))).strip() and not row.values.get("image"):
            raise JobFileError(f"{row.where}: the prompt is empty")
    return JobFile(defaults, rows)


def _validate(values: Any, where: str, from_text: bool) -> dict[str, Any]:
    try:
        return validate_layer(values, where=where, from_text=from_text)
    except UsageError as exc:
        raise JobFileError(str(exc)) from None


def _read_text(file: Path) -> str:
    data = read_regular(file, MAX_FILE_BYTES, "prompt file", JobFileError)
    try:
        return data.decode("utf-8-sig")  # a BOM is fine
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise JobFileError(
            f"{file.name} line {line}: not UTF-8 text (byte {exc.start}); re-save the file as UTF-8"
        ) from None


def _jsonl_rows(file: Path, text: str) -> list[tuple[str, Any, bool]]:
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{file.name} line {n}"
        try:
            value = load_json(line)
        except ParseError as exc:
            raise JobFileError(f"{where}: {exc}") from None
        if not isinstance(value, dict):
            raise JobFileError(f'{where}: each line must be a JSON object like {{"prompt": "..."}}')
        rows.append((where, value, False))
    return rows


def _csv_rows(file: Path, text: str) -> list[tuple[str, Any, bool]]:
    reader = csv.DictReader(io.StringIO(text))
    if not reader.fieldnames:
        raise JobFileError(f"{file.name}: empty CSV; the first row must name the fields (prompt, seed, ...)")
    names = [name.strip() for name in reader.fieldnames]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        columns = "the column" if len(twice) == 1 else "the columns"
        raise JobFileError(f"{file.name} row 1: {columns} {quote(twice)} appear twice; keep one of each")
    rows = []
    for n, record in enumerate(reader, 2):
        where = f"{file.name} row {n}"
        if None in record:
            raise JobFileError(f"{where}: more cells than header fields")
        values = {key.strip(): value for key, value in record.items() if value is not None and value.strip() != ""}
        if values:
            rows.append((where, values, True))
    return rows


def _yaml_rows(file: Path, text: str) -> tuple[list[tuple[str, Any, bool]], dict[str, Any]]:
    import yaml

    try:
        data, root = load_yaml(text)  # nodes carry line numbers
    except ParseError as exc:
        raise JobFileError(f"{file.name}{' ' if str(exc).startswith('line ') else ': '}{exc}") from None
    defaults: Any = {}
    jobs_node = root
    if isinstance(data, dict):
        unknown = sorted(set(map(str, data)) - set(TOP_LEVEL_KEYS))
        if unknown:
            raise JobFileError(
                f"{file.name}: unknown top-level {'key' if len(unknown) == 1 else 'keys'} {quote(unknown)}; "
                "expected 'defaults' and 'jobs'"
            )
        defaults = data.get("defaults") or {}
        jobs = data.get("jobs")
        jobs_node = next((v for k, v in getattr(root, "value", []) if getattr(k, "value", None) == "jobs"), None)
    else:
        jobs = data
    if jobs is None:
        jobs = []
    if not isinstance(jobs, list):
        raise JobFileError(f"{file.name}: expected a list of jobs (or {{defaults: ..., jobs: [...]}})")
    lines = [item.start_mark.line + 1 for item in jobs_node.value] if isinstance(jobs_node, yaml.SequenceNode) else []
    rows = []
    for i, item in enumerate(jobs):
        where = f"{file.name} job {i + 1} (line {lines[i] if i < len(lines) else '?'})"
        rows.append((where, {"prompt": item} if isinstance(item, str) else item, False))
    return rows, defaults
