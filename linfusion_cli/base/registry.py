"""One registry per extensible thing (refine methods, adapter kinds, output formats): entries by name, in the
order they were listed, each an object that owns everything about itself. Nothing outside an entry's module
names it; callers ask the registry."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Iterator
from typing import Generic, Protocol, TypeVar

from .errors import UsageError


class Named(Protocol):
    @property
    def name(self) -> str: ...


T = TypeVar("T", bound=Named)


def did_you_mean(value: str, options: Iterable[str]) -> str:
    """' (did you mean X?)' for the closest option to a mistyped value, case-insensitively; '' when none is close."""
    lowered = {option.lower(): option for option in options}
    close = difflib.get_close_matches(value.lower(), list(lowered), n=1, cutoff=0.6)
    return f" (did you mean {lowered[close[0]]}?)" if close else ""


class Registry(Generic[T]):
    """Named entries in a fixed order (the order they are listed or registered in)."""

    def __init__(self, what: str, entries: Iterable[T] = ()) -> None:
        self.what = what
        self._entries: dict[str, T] = {}
        for entry in entries:
            self.register(entry)

    def register(self, entry: T) -> T:
        """Add an entry (a plug-in, or a test's toy one); a name that is taken is a programming error."""
        if entry.name in self._entries:
            raise ValueError(f"{self.what} {entry.name!r} is registered already")
        self._entries[entry.name] = entry
        return entry

    def unregister(self, name: str) -> None:
        del self._entries[name]

    def get(self, name: str) -> T:
        """The entry called `name`; a UsageError naming the known ones (and the closest) otherwise."""
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(self._entries)
            raise UsageError(
                f"unknown {self.what} {name!r}{did_you_mean(name, self._entries)} (known: {known})"
            ) from None

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[T]:
        return iter(list(self._entries.values()))

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)
