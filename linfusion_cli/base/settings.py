"""How a job setting is declared, and the values settings take.

Every setting is declared once, as a `Setting`: its name, how a value is read and checked, its default, its help
and help panel, which commands take it as a flag, and whether it decides the pixels (enters the settings key).
core/settings.py collects the declarations (its own, and those adapter kinds and refine methods make beside their
code) and derives job validation and the settings key from them; the CLI derives every command's options.
No torch here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .registry import did_you_mean
from .sizes import parse_px
from .text import quote

# How a value is read: "str", "int", "px" (a side: 4096, 16k), "float", "bool", "floats" (0.4,0.3), "refs"
# (SRC[:SCALE] items: adapters), "texts" (several texts).
KINDS = ("str", "int", "px", "float", "bool", "floats", "refs", "texts")
TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")
MAX_ADAPTER_SCALE = 10.0
# Help panels: generate has ~40 options; a person looks for them by what they are about. Every command shows
# its panels in this order.
PROMPT_PANEL = "Prompt"
SIZE_PANEL = "Size and stages"
REFINE_PANEL = "Refine method"
SAMPLER_PANEL = "Sampler"
MODEL_PANEL = "Model and adapters"
CONTROL_PANEL = "ControlNet"
IP_PANEL = "IP-Adapter"
MEMORY_PANEL = "Memory"
OUTPUT_PANEL = "Output"
DEVICE_PANEL = "Device"
# The commands that take job settings as flags.
GENERATE, PLAN, UPSCALE, BATCH, BENCH = "generate", "plan", "upscale", "batch", "bench pipeline"
REPLAY = "replay"  # takes the engine's settings (a model that moved): they replace the sidecar's
RENDER_COMMANDS = (GENERATE, PLAN, UPSCALE, BATCH)
WITH_BENCH = (*RENDER_COMMANDS, BENCH)  # settings `bench pipeline` takes too: it times jobs as users run them

Check = Callable[[Any], "str | None"]  # a problem description, or None


@dataclass(frozen=True)
class Setting:
    """One job setting, declared once (see the module docstring)."""

    name: str
    kind: str
    default: Any = None
    help: str | Callable[[], str] = ""  # the flag's help (a function where it lists what registries hold)
    panel: str = "Options"
    commands: tuple[str, ...] = RENDER_COMMANDS  # commands that take it as a flag
    in_key: bool = True  # decides the pixels: enters the settings key that names outputs
    when: tuple[str, str] | None = None  # only in effect (and in the key) when setting when[0] is when[1]
    key_if_default: bool = True  # False for settings added after outputs were named: their default adds nothing
    key_of: Callable[[Any], Any] | None = None  # what enters the key for a value (a file's content, not its path)
    path: bool = False  # a file the job reads: `replay` finds a relative one beside the sidecar
    in_presets: bool = True  # a preset may set it (not what belongs to one image: prompt, seed, name...)
    check: Check | None = None
    normalize: Callable[[Any], Any] | None = None  # the spelling a person types -> ours (None: not set)
    choices: Callable[[], tuple[str, ...]] | None = None  # the values a "str" setting may take
    complete: Callable[[str], list[str]] | None = None  # tab completion where `choices` cannot say
    flags: tuple[str, ...] = ()  # more spellings of the flag (-s); `--name-with-dashes` is always one
    aliases: tuple[str, ...] = ()  # other names for it (A1111's `cfg_scale`): each a job field and a flag too
    metavar: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"setting {self.name}: kind {self.kind!r} is not one of {KINDS}")

    def help_text(self) -> str:
        return self.help() if callable(self.help) else self.help

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def all_flags(self) -> tuple[str, ...]:
        """Every spelling of its flag: `--name`, the aliases' (`--cfg-scale`) and the short ones (`-g`)."""
        return (self.flag, *("--" + alias.replace("_", "-") for alias in self.aliases), *self.flags)

    def read(self, value: Any, *, from_text: bool = False) -> Any:
        """A value as given (a flag's text, a YAML/JSON value, a CSV cell) -> the setting's value, or None for
        'not set' (`from_text`: blank text is 'not set', as an empty CSV cell). TypeError/ValueError say what is
        wrong with it, in words a person reads."""
        if value is None or (from_text and isinstance(value, str) and value.strip() == ""):
            return None
        out = convert(self.kind, value)
        if self.normalize is not None:
            out = self.normalize(out)
        if self.choices is not None and isinstance(out, str):
            out = any_case(out, self.choices())
        if out is not None:
            problem = self.problem(out)
            if problem:
                raise ValueError(f"{problem} (got {shown(out)})")
        return out

    def problem(self, value: Any) -> str | None:
        """What is wrong with a read value (one of the choices? in range?), or None."""
        if self.choices is not None:
            options = self.choices()
            if value not in options:
                return f"must be one of {', '.join(options)}{did_you_mean(str(value), options)}"
        return self.check(value) if self.check is not None else None


def any_case(value: str, options: tuple[str, ...]) -> str:
    """`PNG` -> `png`: a value that is one of `options` but for its case, as the option; any other
    value as it is (the check then names the options)."""
    if value in options:
        return value
    folded = {option.lower(): option for option in options}
    return folded.get(value.lower(), value)


def number_text(value: float) -> str:
    """A limit as a person writes it: whole numbers in plain digits (9223372036854775807, not 9.22337e+18)."""
    return str(value) if isinstance(value, int) else f"{value:g}"


def in_range(lo: float, hi: float) -> Check:
    return lambda v: None if lo <= v <= hi else f"must be between {number_text(lo)} and {number_text(hi)}"


def shown(value: Any) -> str:
    """A checked value as the user would write it, kept short (a 1 MB prompt is not echoed)."""
    if isinstance(value, list):
        return quote(",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)).strip("'")
    if isinstance(value, float):
        return f"{value:g}"
    return quote(value)


def convert(kind: str, value: Any) -> Any:
    """Read one value of `kind`. Numbers and on/off words given as text are read whatever the source (a flag, a
    CSV cell, a quoted YAML value: a person writes `seed: "42"` and means 42)."""
    if kind == "str":
        if not isinstance(value, str):
            raise TypeError(f"must be text, got {type(value).__name__} {quote(value)}")
        return value
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in (*TRUE_WORDS, *FALSE_WORDS):
            return value.strip().lower() in TRUE_WORDS
        raise TypeError(f"must be true or false, got {quote(value)}")
    if kind == "int":
        return _int(value)
    if kind == "float":
        return _float(value)
    if kind == "floats":
        return parse_floats(value)
    if kind == "px":
        return parse_px(value)
    if kind == "refs":
        return [str(AdapterRef.parse(item)) for item in text_items(value)]
    if kind == "texts":
        return text_items(value)
    raise AssertionError(kind)


def _int(value: Any) -> int:
    """A whole number from an int, a whole float (YAML's `steps: 20.0`) or text (a flag, a CSV cell, YAML's
    `seed: "42"`): every source is read alike."""
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text)
        except ValueError:  # not digits, or more digits than Python converts; "20.0" is still whole
            try:
                value = float(text)
            except (ValueError, OverflowError):
                raise TypeError(f"must be a whole number, got {quote(value)}") from None
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    if isinstance(value, float):
        raise TypeError(f"must be a whole number, got {value:g}")
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"must be a whole number, got {type(value).__name__} {quote(value)}")
    return value


def _float(value: Any) -> float:
    """A number from an int, a float or text, wherever it comes from."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TypeError(f"must be a number, got {type(value).__name__} {quote(value)}")
    try:
        out = float(value.strip() if isinstance(value, str) else value)
    except OverflowError:  # a whole number too large for a float
        raise ValueError(f"must be a finite number, got {quote(value)}") from None
    except ValueError:
        raise TypeError(f"must be a number, got {quote(value)}") from None
    if not math.isfinite(out):
        raise ValueError(f"must be a finite number, got {quote(value)}")
    return out


def text_items(value: Any) -> list[str]:
    """One text (`SRC[:SCALE]`, a file...), several separated by ';', or a list of them (each may hold several)."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(i, str) for i in items):
        raise TypeError(f"must be text or a list of texts (got {value!r})")
    return [part.strip() for item in items for part in item.split(";") if part.strip()]


def parse_floats(value: Any) -> list[float]:
    """`0.4,0.3` or a list of numbers -> [0.4, 0.3]."""
    items = value.split(",") if isinstance(value, str) else value
    if isinstance(items, (int, float)) and not isinstance(items, bool):
        items = [items]  # `strengths: 0.3`: a list of one
    if not isinstance(items, (list, tuple)):
        raise TypeError(f"must be a list of numbers like 0.4,0.3 (got {quote(value)})")
    out = []
    for item in items:
        if isinstance(item, bool):
            raise TypeError(f"must be a list of numbers like 0.4,0.3 (got {quote(value)})")
        try:
            number = float(item.strip() if isinstance(item, str) else item)
        except (TypeError, ValueError, OverflowError):
            raise TypeError(f"must be a list of numbers like 0.4,0.3 (got {quote(value)})") from None
        if not math.isfinite(number):
            raise TypeError(f"must be finite numbers (got {quote(value)})")
        out.append(number)
    return out


@dataclass(frozen=True)
class AdapterRef:
    """An adapter a job asks for: where it comes from (hub id, folder, file, or `tiny`) and its scale."""

    source: str
    scale: float = 1.0

    @classmethod
    def parse(cls, text: str) -> AdapterRef:
        """`SRC` or `SRC:SCALE`; a trailing `:...` that is not a number stays part of the source."""
        source, sep, tail = text.strip().rpartition(":")
        if sep and source:
            try:
                scale = float(tail)
            except ValueError:
                return cls(text.strip())
            if _is_number(source.rpartition(":")[2]):
                raise ValueError(f"too many ':' parts in {text!r}: give SRC or SRC:SCALE, one scale (e.g. tiny:0.8)")
            if not math.isfinite(scale) or not -MAX_ADAPTER_SCALE <= scale <= MAX_ADAPTER_SCALE:
                raise ValueError(f"scale must be a number between -10 and 10 (got {tail!r} in {text!r})")
            return cls(source, scale)
        return cls(text.strip())

    def __str__(self) -> str:
        return f"{self.source}:{self.scale:g}"


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def adapter_refs(texts: list[str] | None) -> tuple[AdapterRef, ...]:
    return tuple(AdapterRef.parse(text) for text in texts or ())


@dataclass(frozen=True)
class EngineSpec:
    """What an engine is made of: the model, what replaces parts of it, and the adapters on it, as (kind, ref)
    pairs in load order. `Engine.load` takes it, and batches key their loaded engine by it: jobs whose `base()`
    match share the loaded model and only switch adapters."""

    model: str
    linfusion: str = "auto"
    vae: str | None = None
    adapters: tuple[tuple[str, AdapterRef], ...] = ()

    def base(self) -> EngineSpec:
        """The part that needs a model load; adapters are switched on a loaded model."""
        return EngineSpec(self.model, self.linfusion, self.vae)

    def refs(self, kind: str) -> tuple[AdapterRef, ...]:
        return tuple(ref for k, ref in self.adapters if k == kind)


def key_values(values: Mapping[str, Any], table: Mapping[str, Setting]) -> dict[str, Any]:
    """The settings that decide an image's pixels, from a job's values: those declared `in_key`, set (not None),
    in effect (`when`), and for settings added later (`key_if_default` False) only when not at their default.
    A setting added with `in_key` can only split names, never merge two different images under one."""
    chosen: dict[str, Any] = {}
    for name, value in values.items():
        setting = table.get(name)
        if setting is None or not setting.in_key or value is None:
            continue
        if setting.when is not None and values.get(setting.when[0]) != setting.when[1]:
            continue
        if not setting.key_if_default and value == setting.default:
            continue
        chosen[name] = value if setting.key_of is None else setting.key_of(value)
    return chosen
