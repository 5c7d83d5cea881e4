"""Small text helpers for messages: counted nouns, and user values quoted short."""

from __future__ import annotations

import reprlib
from typing import Any

QUOTE_CHARS = 80  # what an error message may echo of a user's value


def plural(count: int, noun: str, many: str | None = None) -> str:
    """ "1 stage", "3 stages" (`many` for irregular nouns)."""
    return f"{count} {noun if count == 1 else many or noun + 's'}"


class _ShortRepr(reprlib.Repr):
    """reprlib with bounded work: depth-limited, and huge integers described instead of converted."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.maxlevel = 3
        self.maxstring = self.maxother = self.maxlong = limit
        self.maxlist = self.maxtuple = self.maxdict = self.maxset = 6

    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() > 128:  # str() of a 5000-digit int raises; it is also useless in a message
            return f"<a whole number of about {int(x.bit_length() * 0.30103) + 1} digits>"
        return super().repr_int(x, level)


def quote(value: Any, limit: int = QUOTE_CHARS) -> str:
    """repr(value) for an error message: at most `limit` characters, whatever the value's size or depth."""
    try:
        text = _ShortRepr(limit).repr(value)
    except (RecursionError, ValueError):
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."
