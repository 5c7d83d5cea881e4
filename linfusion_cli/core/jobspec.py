"""`JobSpec`: one image's resolved settings, the one implementation of `base.job.Job` (whose attributes mypy
checks); every setting of the table, built-in or a plug-in's, is an attribute at run time."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..base.job import Job
from .settings import table


class JobSpec(Job):
    """One image's fully resolved settings: every declared setting as an attribute (its default unless a layer
    set it), typed as base/job.py lists them, and `sources`: which layer set each key."""

    _values: dict[str, Any]
    sources: dict[str, str]

    def __init__(self, **values: Any) -> None:
        settings = table()
        unknown = sorted(set(values) - set(settings))
        if unknown:
            raise TypeError(f"not job settings: {', '.join(unknown)}")
        merged = {name: setting.default for name, setting in settings.items()}
        for name, value in merged.items():
            if isinstance(value, list):  # a job may change its own
                merged[name] = list(value)
        merged.update(values)
        object.__setattr__(self, "_values", merged)
        object.__setattr__(self, "sources", {})

    if not TYPE_CHECKING:  # mypy reads the attributes' types from `Job`: a misspelt setting is an error there

        def __getattr__(self, name: str) -> Any:
            try:
                return self.__dict__["_values"][name]
            except KeyError:
                raise AttributeError(f"no job setting {name!r}") from None

    def value(self, name: str) -> Any:
        """A setting by name (one a plug-in declared, which `Job` does not list)."""
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(f"no job setting {name!r}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in self._values:
            raise AttributeError(f"no job setting {name!r}")
        self._values[name] = value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, JobSpec) and self._values == other._values

    def __repr__(self) -> str:
        given = ", ".join(f"{k}={v!r}" for k, v in self._values.items() if k in self.sources)
        return f"JobSpec({given})"

    def settings(self) -> dict[str, Any]:
        """The resolved settings as plain data (for reports, sidecars, replay)."""
        return dict(self._values)
