"""Jobs from the command line and from prompt files, merged in precedence order:
built-in defaults < preset < file defaults < job row < flags the user set."""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..base.errors import JobFileError, UsageError
from ..base.text import plural, quote
from ..io.files import ParseError, load_json, load_yaml, read_regular
from .image_settings import from_image
from .jobspec import JobSpec
from .layers import merge_layers, validate_layer
from .presets import load_preset
from .settings import FLAGS


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
    job = merge_layers(layers, require_prompt=require_prompt)
    if job.image:
        from_image(job)  # an upscale's image: its recorded prompt, seed... where no layer set them (noted when planned)
    return job


def flags_layer(values: Mapping[str, Any]) -> dict[str, Any]:
    """The flags the user actually set (None means 'not given'), validated; numbers given as text (a flag's
    value) are read as a prompt file's text cells are."""
    return validate_layer({k: v for k, v in values.items() if v is not None}, where=FLAGS, from_text=True)


# --- prompt files ---------------------------------------------------------------------------------------------
# One numbering everywhere: a job is counted from 0, as its index in file names, logs, JSON lines and --shard;
# a line is counted from 1, as an editor shows it (a CSV's header is line 1). Messages say both:
# "prompts.yaml line 7 (job 2): field 'steps' ...", the line being the bad field's own where it has one.

MAX_FILE_BYTES = 64 << 20
MAX_JOBS = 1_000_000
MAX_SAID = 20  # a file's mistakes said at once; past this, how many more
TOP_LEVEL_KEYS = ("defaults", "jobs")
FORMATS_BY_SUFFIX = {".txt": "txt", ".yaml": "yaml", ".yml": "yaml", ".jsonl": "jsonl", ".csv": "csv"}
UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")  # Windows' "Unicode" text files


@dataclass(frozen=True)
class JobRow:
    """One job as written in the file: where it is (for messages) and its validated fields."""

    index: int
    where: str
    values: dict[str, Any]


@dataclass(frozen=True)
class JobFile:
    defaults: dict[str, Any]
    rows: list[JobRow]  # the jobs that passed their checks (all of them, unless `problems` says otherwise)
    problems: dict[int, str] = field(default_factory=dict)  # job index -> what is wrong with it
    total: int = 0  # jobs in the file, good and bad


@dataclass(frozen=True)
class _Raw:
    """A job as parsed: the line it starts on, its fields, the line of each field where known, and whether its
    values are text (TXT lines, CSV cells: blank means unset)."""

    line: int | str
    values: Any
    field_lines: dict[str, int]
    from_text: bool
    problem: str = ""  # a line that is no job at all (JSONL that does not parse): said with the others' mistakes


def job_where(file: Path, line: int | str, index: int | None) -> str:
    """`prompts.csv line 3 (job 1)`: the file, the line as an editor counts it, the job as file names count it."""
    return f"{file.name} line {line}" + ("" if index is None else f" (job {index})")


def read_job_file(path: str | Path, *, collect: bool = False) -> JobFile:
    """Parse and validate a whole prompt file; any problem is a JobFileError naming file, line and field, every
    job's mistake at once (in the file's order), so that a file is fixed in one go. `collect`: a job whose fields
    are wrong is left out of `rows` and said in `problems` instead (batch_plan adds the plan's own checks to them)."""
    file = Path(path)
    kind = FORMATS_BY_SUFFIX.get(file.suffix.lower())
    if kind is None:
        raise JobFileError(f"{file}: unknown prompt file type '{file.suffix}'; use .txt, .yaml, .yml, .jsonl or .csv")
    text = _read_text(file)
    defaults: dict[str, Any] = {}
    raw: list[_Raw]
    if kind == "txt":
        raw = [
            _Raw(n, {"prompt": line.strip()}, {}, True)
            for n, line in enumerate(text.splitlines(), 1)
            if line.strip() and not line.lstrip().startswith("#")
        ]
    elif kind == "jsonl":
        raw = _jsonl_rows(file, text)
    elif kind == "csv":
        raw = _csv_rows(file, text)
    else:
        raw, defaults_raw = _yaml_rows(file, text)
        defaults = _validate(file, defaults_raw, None, "defaults")
    if not raw:
        raise JobFileError(f"{file}: no jobs in the file (only blank lines or comments): nothing to do")
    if len(raw) > MAX_JOBS:
        raise JobFileError(f"{file}: {len(raw)} jobs; the limit is {MAX_JOBS} per file (split it)")
    rows, problems = [], {}
    for index, row in enumerate(raw):
        where = job_where(file, row.line, index)
        if row.problem:
            problems[index] = row.problem
            continue
        try:
            values = _validate(file, row, index)
        except JobFileError as exc:
            problems[index] = str(exc)
            continue
        if not str(values.get("prompt", defaults.get("prompt", ""))).strip() and not values.get("image"):
            problems[index] = f"{where}: the prompt is empty"
            continue
        rows.append(JobRow(index, where, values))
    if problems and not collect:
        raise JobFileError(said_together(problems))
    return JobFile(defaults, rows, problems, len(raw))


def said_together(problems: dict[int, str]) -> str:
    """Every job's mistake, one a line, in the file's order (at most MAX_SAID of them, then how many more)."""
    said = [problems[index] for index in sorted(problems)]
    more = len(said) - MAX_SAID
    return "\n".join(said[:MAX_SAID] + ([f"... and {plural(more, 'more job')} with mistakes"] if more > 0 else []))


def _validate(file: Path, raw: _Raw | Any, index: int | None, label: str | None = None) -> dict[str, Any]:
    """A row's (or the defaults') fields checked; an error names the line of the bad field where it is known."""
    if not isinstance(raw, _Raw):  # YAML defaults: a mapping whose lines are kept on the side
        raw = _Raw(0, raw, getattr(raw, "field_lines", {}), False)
    tail = f" ({label})" if label else ""
    where = f"{file.name} {label}" if label and not raw.line else job_where(file, raw.line, index) + tail
    field_where = {key: job_where(file, line, index) + tail for key, line in raw.field_lines.items()}
    try:
        return validate_layer(raw.values, where=where, from_text=raw.from_text, field_where=field_where)
    except UsageError as exc:
        raise JobFileError(str(exc)) from None


def _read_text(file: Path) -> str:
    """The file as text: UTF-8 (a BOM is fine) or UTF-16 with its BOM; anything else, or a NUL byte (binary, or
    UTF-16 without a BOM), refused naming the line."""
    data = read_regular(file, MAX_FILE_BYTES, "prompt file", JobFileError)
    encoding = "utf-16" if data.startswith(UTF16_BOMS) else "utf-8-sig"
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise JobFileError(
            f"{file.name} line {line}: not UTF-8 text (byte {exc.start}); re-save the file as UTF-8"
        ) from None
    nul = text.find("\0")
    if nul >= 0:
        line = text.count("\n", 0, nul) + 1
        raise JobFileError(
            f"{file.name} line {line}: a NUL byte: this is not UTF-8 text (UTF-16 without a byte-order mark, or a "
            "binary file); re-save the file as UTF-8"
        )
    return text


def _jsonl_rows(file: Path, text: str) -> list[_Raw]:
    rows: list[_Raw] = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = job_where(file, n, len(rows))
        try:
            value = load_json(line)
        except ParseError as exc:
            rows.append(_Raw(n, {}, {}, False, problem=f"{where}: {exc}"))
            continue
        problem = (
            "" if isinstance(value, dict) else f'{where}: each line must be a JSON object like {{"prompt": "..."}}'
        )
        rows.append(_Raw(n, value, {}, False, problem=problem))
    return rows


def _csv_rows(file: Path, text: str) -> list[_Raw]:
    reader = csv.DictReader(io.StringIO(text, newline=""))  # the csv module reads \r, \n and \r\n line ends itself
    try:
        return _csv_records(file, reader)
    except csv.Error as exc:  # e.g. a stray quote or carriage return the dialect cannot read
        raise JobFileError(f"{file.name} line {reader.line_num}: not readable as CSV ({exc})") from None


def _csv_records(file: Path, reader: csv.DictReader[str]) -> list[_Raw]:
    if not reader.fieldnames:
        raise JobFileError(f"{file.name}: empty CSV; the first row must name the fields (prompt, seed, ...)")
    names = [name.strip().lower() for name in reader.fieldnames]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        columns = "the column" if len(twice) == 1 else "the columns"
        raise JobFileError(f"{file.name} line 1: {columns} {quote(twice)} appear twice; keep one of each")
    rows: list[_Raw] = []
    for record in reader:
        # the line the record starts on, as an editor counts (a quoted cell may hold line breaks)
        line = reader.line_num - sum(str(v).count("\n") for v in record.values() if isinstance(v, str))
        if None in record:
            rows.append(
                _Raw(line, {}, {}, True, problem=f"{job_where(file, line, len(rows))}: more cells than header fields")
            )
            continue
        values = {key.strip(): value for key, value in record.items() if value is not None and value.strip() != ""}
        if values:
            rows.append(_Raw(line, values, {}, True))
    return rows


def _yaml_rows(file: Path, text: str) -> tuple[list[_Raw], Any]:
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
        jobs_node = _value_node(root, "jobs")
        defaults_node = _value_node(root, "defaults")
        if isinstance(defaults, dict) and defaults_node is not None:
            defaults = _Raw(defaults_node.start_mark.line + 1, defaults, _field_lines(defaults_node), False)
    else:
        jobs = data
    if jobs is None:
        jobs = []
    if not isinstance(jobs, list):
        raise JobFileError(f"{file.name}: expected a list of jobs (or {{defaults: ..., jobs: [...]}})")
    nodes = list(jobs_node.value) if isinstance(jobs_node, yaml.SequenceNode) else []
    rows = []
    for i, item in enumerate(jobs):
        node = nodes[i] if i < len(nodes) else None
        line = node.start_mark.line + 1 if node is not None else "?"
        rows.append(_Raw(line, {"prompt": item} if isinstance(item, str) else item, _field_lines(node), False))
    return rows, defaults


def _value_node(root: Any, key: str) -> Any:
    return next((v for k, v in getattr(root, "value", []) if getattr(k, "value", None) == key), None)


def _field_lines(node: Any) -> dict[str, int]:
    """A YAML mapping's keys and the line each is written on."""
    import yaml

    if not isinstance(node, yaml.MappingNode):
        return {}
    return {k.value: k.start_mark.line + 1 for k, _ in node.value if isinstance(k, yaml.ScalarNode)}
