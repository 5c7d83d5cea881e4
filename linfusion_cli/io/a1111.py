"""AUTOMATIC1111's `parameters` text, read back into its parts: the prompt (it may span lines), the negative prompt
(the line starting `Negative prompt:` and any after it, absent when empty), and the last line of `Key: value`
fields joined by ", " (a value holding a comma is quoted as JSON: `Lora hashes: "a: 0123, b: 4567"`). The same rules
as A1111's own reader (modules/infotext_utils.py, parse_generation_parameters): a last line with fewer than three
fields is part of the prompt, and values are kept as text, in order, unknown keys included."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

FIELD = re.compile(r'\s*(\w[\w \-/+]*):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
NEGATIVE = "Negative prompt:"
MIN_FIELDS = 3  # a last line with fewer is prompt text that happens to hold a colon


@dataclass
class Parameters:
    prompt: str = ""
    negative: str = ""
    fields: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return {"prompt": self.prompt, "negative": self.negative, "fields": dict(self.fields)}


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        try:
            text = json.loads(value)
        except ValueError:
            return value
        return text if isinstance(text, str) else value
    return value


def parse_parameters(text: str) -> Parameters:
    """The parts of an A1111 `parameters` text (see the module docstring)."""
    *lines, last = text.strip().split("\n")
    found = FIELD.findall(last)
    if len(found) < MIN_FIELDS:
        lines.append(last)
        found = []
    prompt: list[str] = []
    negative: list[str] = []
    for line in lines:
        line = line.strip()
        if not negative and line.startswith(NEGATIVE):
            negative.append(line[len(NEGATIVE) :].strip())
        elif negative:
            negative.append(line)
        else:
            prompt.append(line)
    fields = {key.strip(): _unquote(value.strip()) for key, value in found}
    return Parameters("\n".join(prompt), "\n".join(negative), fields)


def quoted_list(value: str) -> dict[str, str]:
    """`name: hash, name2: hash2` (A1111's Lora hashes, TI hashes) -> {name: hash}."""
    out = {}
    for item in value.split(","):
        name, sep, digest = item.rpartition(":")
        if sep and name.strip():
            out[name.strip()] = digest.strip()
    return out
