"""The layout version of every JSON linfusion writes (reports, batch lines, sidecars, plans, benchmarks), and the
check readers make: a file written by a later layout is refused, not half-read (see the README's JSON output)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

SCHEMA = 1


def schema_problem(data: Mapping[str, Any]) -> str | None:
    """Why a JSON object we read is not of a layout this version knows (a later one), or None. A file without
    `schema` is from before it was written: layout 1."""
    found = data.get("schema", SCHEMA)
    if found == SCHEMA:
        return None
    return f'it is "schema": {found!r}, and this linfusion reads {SCHEMA}: use the linfusion version that wrote it'
