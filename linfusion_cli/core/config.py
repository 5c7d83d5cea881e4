"""Typed job settings, their schema, and the precedence that merges them.

Precedence (lowest first): built-in defaults < preset < prompt-file defaults < job row < flags the user set.
Every layer is a plain dict of the keys it sets; `resolve_job` validates the merged result against FIELDS and
rejects unknown keys, wrong types and impossible values with a message naming where the value came from.
No torch here: the CLI validates everything before any model loads.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from ..base.errors import UsageError
from ..base.sizes import MAX_SIDE, MIN_SIDE, is_two_sides, parse_aspect, parse_px, split_size
from ..base.text import quote
from ..io.formats import FORMATS, format_name

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
# Sampler name -> (diffusers scheduler class, config overrides). Data, not an if-chain; the names are what
# --scheduler and job files accept.
SCHEDULER_TABLE: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "dpm++2m": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False},
    ),
    "dpm++2m-karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "unipc": ("UniPCMultistepScheduler", {}),
}
SCHEDULERS = tuple(SCHEDULER_TABLE)
# Our sampler -> AUTOMATIC1111's name: written into image metadata, and accepted as input (any case).
A1111_SAMPLERS = {
    "ddim": "DDIM",
    "euler": "Euler",
    "euler-a": "Euler a",
    "dpm++2m": "DPM++ 2M",
    "dpm++2m-karras": "DPM++ 2M Karras",
    "unipc": "UniPC",
}
REFINE_METHODS = ("sdedit", "demofusion")  # how refine stages work: refine.py
RANDOM_SEED = -1  # AUTOMATIC1111's spelling of "pick one at random"
MAX_PROMPT_CHARS = 10_000


# Precisions: the flag's spelling (used in every report, sidecar and benchmark) -> torch's name.
DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


def dtype_flag(dtype: Any) -> str:
    """The flag spelling (fp16, bf16, fp32) of a torch dtype or its name; 'auto' for anything else."""
    name = str(dtype).replace("torch.", "")
    return next((flag for flag, long in DTYPES.items() if name in (flag, long)), "auto")


@dataclass(frozen=True)
class FieldSpec:
    """How one job setting is read and checked. What it means is told once, in the CLI option's help."""

    kind: str  # "str" | "int" | "px" | "float" | "bool" | "floats" | "refs" | "texts"
    check: Callable[[Any], str | None] | None = None  # returns a problem description, or None
    normalize: Callable[[Any], Any] | None = None  # spelling a person types -> our value (None: not set)


def _range(lo: float, hi: float) -> Callable[[Any], str | None]:
    return lambda v: None if lo <= v <= hi else f"must be between {lo:g} and {hi:g}"


def _choice(options: tuple[str, ...]) -> Callable[[Any], str | None]:
    return lambda v: None if v in options else f"must be one of {', '.join(options)}"


def _strengths_ok(values: list[float]) -> str | None:
    if not values:
        return "needs at least one value"
    return None if all(0.0 <= v <= 1.0 for v in values) else "values must be between 0 and 1"


def _stage_scales_ok(values: list[float]) -> str | None:
    if not values:
        return "needs at least one value"
    return None if all(0.0 <= v <= 10.0 for v in values) else "values must be between 0 and 10"


def _random_seed(value: int) -> int | None:
    return None if value == RANDOM_SEED else value


def _scheduler_name(value: str) -> str:
    wanted = " ".join(value.lower().split())
    by_a1111 = {a1111.lower(): ours for ours, a1111 in A1111_SAMPLERS.items()}
    return by_a1111.get(wanted, wanted)


def _prompt_ok(text: str) -> str | None:
    if len(text) > MAX_PROMPT_CHARS:
        return f"is {len(text)} characters; the limit is {MAX_PROMPT_CHARS}"
    return None


def _aspect_ok(text: str) -> str | None:
    try:
        parse_aspect(text)
    except UsageError:
        return "needs two positive numbers W:H, at most 64:1 (for example 16:9)"
    return None


FIELDS: dict[str, FieldSpec] = {
    "prompt": FieldSpec("str", _prompt_ok),
    "negative": FieldSpec("str", _prompt_ok),
    "seed": FieldSpec("int", _range(0, 2**63 - 1), normalize=_random_seed),
    "size": FieldSpec("px", _range(MIN_SIDE, MAX_SIDE)),
    "aspect": FieldSpec("str", _aspect_ok),
    "width": FieldSpec("px", _range(MIN_SIDE, MAX_SIDE)),
    "height": FieldSpec("px", _range(MIN_SIDE, MAX_SIDE)),
    "steps": FieldSpec("int", _range(1, 1000)),
    "guidance": FieldSpec("float", _range(0.0, 50.0)),
    "strengths": FieldSpec("floats", _strengths_ok),
    "scheduler": FieldSpec("str", _choice(SCHEDULERS), normalize=_scheduler_name),
    "format": FieldSpec("str", _choice(FORMATS), normalize=format_name),
    "name": FieldSpec("str"),
    "base_size": FieldSpec("px", _range(MIN_SIDE, MAX_SIDE)),
    "model": FieldSpec("str"),
    "linfusion": FieldSpec("str"),
    "vae": FieldSpec("str"),
    "vae_tile": FieldSpec("int", _range(64, MAX_SIDE)),
    "low_vram": FieldSpec("bool"),
    "max_vram": FieldSpec("float", _range(0.5, 4096)),
    "image": FieldSpec("str"),
    "strength": FieldSpec("float", _range(0.0, 1.0)),
    "refine": FieldSpec("str", _choice(REFINE_METHODS)),
    "cosine_scale_1": FieldSpec("float", _range(0.0, 1e6)),
    "cosine_scale_2": FieldSpec("float", _range(0.0, 1e6)),
    "cosine_scale_3": FieldSpec("float", _range(0.0, 1e6)),
    "gaussian_sigma": FieldSpec("float", _range(0.01, 100.0)),
    "lora": FieldSpec("refs"),
    "ip_adapter": FieldSpec("refs", lambda v: None if len(v) <= 1 else "takes one IP-Adapter"),
    "ip_image": FieldSpec("str"),
    "controlnet": FieldSpec("refs"),
    "control_image": FieldSpec("texts"),
    "control_start": FieldSpec("float", _range(0.0, 1.0)),
    "control_end": FieldSpec("float", _range(0.0, 1.0)),
    "control_stages": FieldSpec("floats", _stage_scales_ok),
    "preset": FieldSpec("str"),
}
# Keys a preset may not set: they belong to one image, not to a recipe.
NOT_IN_PRESETS = ("prompt", "name", "image", "preset", "seed")


@dataclass
class JobSpec:
    """One image's fully resolved settings."""

    prompt: str = ""
    negative: str = ""
    seed: int | None = None
    size: int | None = None
    aspect: str = "1:1"
    width: int | None = None
    height: int | None = None
    steps: int = 50
    guidance: float = 7.5
    strengths: list[float] | None = None
    scheduler: str = "ddim"
    format: str = "png"
    name: str | None = None
    base_size: int | None = None
    model: str = DEFAULT_MODEL
    linfusion: str = "auto"
    vae: str | None = None
    vae_tile: int | None = None
    low_vram: bool = False
    max_vram: float | None = None
    image: str | None = None
    strength: float | None = None
    refine: str = "sdedit"
    cosine_scale_1: float = 3.0
    cosine_scale_2: float = 1.0
    cosine_scale_3: float = 1.0
    gaussian_sigma: float = 1.0
    lora: list[str] | None = None  # "SRC:SCALE" each
    ip_adapter: list[str] | None = None  # "SRC:SCALE", one
    ip_image: str | None = None
    controlnet: list[str] | None = None  # "SRC:SCALE" each
    control_image: list[str] | None = None  # one per ControlNet: a file, or "previous"
    control_start: float = 0.0  # fraction of each stage's steps
    control_end: float = 1.0
    control_stages: list[float] | None = None  # ControlNet scale multiplier per stage, the last repeating
    preset: str | None = None
    sources: dict[str, str] = field(default_factory=dict, repr=False)  # key -> which layer set it

    def settings(self) -> dict[str, Any]:
        """The resolved settings as plain data (for reports, sidecars, replay)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "sources"}


JOB_KEYS = tuple(FIELDS)


FLAGS = "command line"  # the `where` of the flags layer: errors then name the flag itself


def _problem(where: str, key: str, message: str) -> UsageError:
    if where == FLAGS:
        return UsageError(f"--{key.replace('_', '-')}: {message}")
    return UsageError(f"{where}: field '{key}' {message}")


def coerce(key: str, value: Any, *, where: str, from_text: bool = False) -> Any:
    """Check (and, for text sources like CSV/TXT, parse) one value; raise a UsageError naming `where`."""
    spec = FIELDS.get(key)
    if spec is None:
        raise UsageError(f"{where}: unknown field {quote(key)} (known: {', '.join(JOB_KEYS)})")
    if value is None or (from_text and isinstance(value, str) and value.strip() == ""):
        return None
    try:
        out = _convert(spec.kind, value, from_text)
    except (TypeError, ValueError) as exc:
        raise _problem(where, key, str(exc)) from None
    if spec.normalize is not None:
        out = spec.normalize(out)
    if out is not None and spec.check is not None:
        problem = spec.check(out)
        if problem:
            raise _problem(where, key, f"{problem} (got {_shown(out)})")
    return out


def _shown(value: Any) -> str:
    """A checked value as the user would write it, kept short (a 1 MB prompt is not echoed)."""
    if isinstance(value, list):
        return quote(",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)).strip("'")
    if isinstance(value, float):
        return f"{value:g}"
    return quote(value)


def _convert(kind: str, value: Any, from_text: bool) -> Any:
    if kind == "str":
        if not isinstance(value, str):
            raise TypeError(f"must be text, got {type(value).__name__} {quote(value)}")
        return value
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if from_text and isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "0", "false", "no"):
            return value.strip().lower() in ("1", "true", "yes")
        raise TypeError(f"must be true or false, got {quote(value)}")
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, (int, str)) or (isinstance(value, str) and not from_text):
            raise TypeError(f"must be a whole number, got {type(value).__name__} {quote(value)}")
        try:
            return int(value)
        except ValueError:  # not digits, or more digits than Python converts
            raise TypeError(f"must be a whole number, got {quote(value)}") from None
    if kind == "float":
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float, str))
            or (isinstance(value, str) and not from_text)
        ):
            raise TypeError(f"must be a number, got {type(value).__name__} {quote(value)}")
        try:
            out = float(value)
        except OverflowError:  # a whole number too large for a float
            raise ValueError(f"must be a finite number, got {quote(value)}") from None
        if not math.isfinite(out):
            raise ValueError(f"must be a finite number, got {quote(value)}")
        return out
    if kind == "floats":
        return parse_floats(value)
    if kind == "px":
        return parse_px(value)
    if kind == "refs":
        return [str(AdapterRef.parse(item)) for item in _ref_items(value)]
    if kind == "texts":
        return _ref_items(value)
    raise AssertionError(kind)


def _ref_items(value: Any) -> list[str]:
    """One text (`SRC[:SCALE]`, a file...), several separated by ';', or a list of them."""
    items = value.split(";") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(i, str) for i in items):
        raise TypeError(f"must be text or a list of texts (got {value!r})")
    return [i.strip() for i in items if i.strip()]


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
            if not math.isfinite(scale) or not -10.0 <= scale <= 10.0:
                raise ValueError(f"scale must be a number between -10 and 10 (got {tail!r} in {text!r})")
            return cls(source, scale)
        return cls(text.strip())

    def __str__(self) -> str:
        return f"{self.source}:{self.scale:g}"


@dataclass(frozen=True)
class EngineSpec:
    """What an engine is made of: the model, what replaces parts of it, and the adapters on it. `Engine.load`
    takes it, and batches key their loaded engine by it: jobs whose `base()` match share the loaded model and
    only switch adapters."""

    model: str = DEFAULT_MODEL
    linfusion: str = "auto"
    vae: str | None = None
    loras: tuple[AdapterRef, ...] = ()
    ip_adapters: tuple[AdapterRef, ...] = ()
    controlnets: tuple[AdapterRef, ...] = ()

    @classmethod
    def of(cls, job: JobSpec) -> EngineSpec:
        return cls(
            job.model,
            job.linfusion,
            job.vae,
            loras=_refs(job.lora),
            ip_adapters=_refs(job.ip_adapter),
            controlnets=_refs(job.controlnet),
        )

    def base(self) -> EngineSpec:
        """The part that needs a model load; adapters are switched on a loaded model."""
        return EngineSpec(self.model, self.linfusion, self.vae)


def _refs(texts: list[str] | None) -> tuple[AdapterRef, ...]:
    return tuple(AdapterRef.parse(text) for text in texts or ())


def parse_floats(value: Any) -> list[float]:
    """`0.4,0.3` or a list of numbers -> [0.4, 0.3]."""
    items = value.split(",") if isinstance(value, str) else value
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


def validate_layer(
    data: Mapping[str, Any], *, where: str, from_text: bool = False, forbidden: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Validate one layer (preset, file defaults, a row, flags): known keys, right types, sane values."""
    if not isinstance(data, Mapping):
        raise UsageError(f"{where}: expected a mapping of settings, got {type(data).__name__}")
    out: dict[str, Any] = {}
    for key, value in data.items():
        if not isinstance(key, str):
            raise UsageError(f"{where}: field names must be text, got {quote(key)}")
        if key in forbidden:
            raise UsageError(f"{where}: '{key}' cannot be set here")
        if key == "size" and is_two_sides(value):
            if "width" in data or "height" in data:
                raise _problem(where, key, "is WxH already; leave out width and height")
            try:
                sides = split_size(value)
            except TypeError as exc:
                raise _problem(where, key, str(exc)) from None
            for side_key, side in zip(("width", "height"), sides, strict=True):
                out[side_key] = coerce(key, side, where=where)
            continue
        converted = coerce(key, value, where=where, from_text=from_text)
        if converted is not None:
            out[key] = converted
    return out


def merge_layers(layers: list[tuple[str, Mapping[str, Any]]], require_prompt: bool = True) -> JobSpec:
    """Merge validated layers, lowest precedence first, into a JobSpec that remembers who set what."""
    job = JobSpec()
    for label, layer in layers:
        for key, value in layer.items():
            setattr(job, key, list(value) if isinstance(value, list) else value)
            job.sources[key] = label
    if require_prompt and not job.prompt.strip() and not job.image:
        where = job.sources.get("prompt", "the job")
        raise UsageError(f"{where}: the prompt is empty; give a prompt (or an image to upscale)")
    return job
