"""Every job setting, declared once, and the table that holds them.

The settings of the core (prompt, size, sampler, model, memory...) are declared here, once each; adapter kinds
and refine methods declare theirs beside their code (`AdapterKind.settings`, `RefineMethod.settings`), and
`table()` puts them together. From the table come job-file and preset validation (one value: `coerce`; a whole
layer and the precedence of layers: core/layers.py), the settings key that names outputs (core/metadata.py) and
every command's flags (cli/options.py). No torch here: everything is checked before any model loads.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from ..base.errors import UsageError
from ..base.registry import did_you_mean
from ..base.settings import (
    BATCH,
    BENCH,
    GENERATE,
    MEMORY_PANEL,
    MODEL_PANEL,
    OUTPUT_PANEL,
    PLAN,
    PROMPT_PANEL,
    REFINE_PANEL,
    RENDER_COMMANDS,
    REPLAY,
    SAMPLER_PANEL,
    SIZE_PANEL,
    UPSCALE,
    WITH_BENCH,
    Setting,
    in_range,
)
from ..base.sizes import DEFAULT_SIZE, MAX_SIDE, MIN_SIDE, parse_aspect
from ..base.text import quote
from ..engine.memory_plan import memory_rung_names
from ..engine.refine import DEFAULT_REFINE, REFINE_METHODS
from ..engine.schedulers import DEFAULT_SAMPLER, SAMPLERS, sampler_problem, scheduler_name
from ..io.formats import OUTPUT_FORMATS, format_name
from ..models.adapters import ADAPTER_KINDS
from .prompt_settings import PROMPT_SETTINGS

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
RANDOM_SEED = -1  # AUTOMATIC1111's spelling of "pick one at random"
MAX_SEED = 2**63 - 1
MAX_PROMPT_CHARS = 10_000
SIZE_CONDITIONING = (
    "stage",
    "target",
)  # the default first: see sampling.conditioning_size  # the first method listed is the default
FLAGS = "command line"  # the `where` of the flags layer: errors then name the flag itself
# What diffusers calls a setting, where the name differs and is no alias: an unknown field spelt so is told ours.
OTHER_NAMES = {"num_inference_steps": "steps", "guidance_scale": "guidance", "generator": "seed"}


def _prompt_ok(text: str) -> str | None:
    if len(text) > MAX_PROMPT_CHARS:
        return f"is {len(text)} characters; the limit is {MAX_PROMPT_CHARS}"
    if "\0" in text:  # PNG text chunks cannot hold it: the image would say another prompt than its sidecar
        return "holds a NUL character; remove it"
    return None


def _name_ok(text: str) -> str | None:
    """A file name, not a path: `--name ../x` must not quietly become `x.png` in --out (nor leave it)."""
    if any(sep in text for sep in ("/", "\\")) or text.strip() in (".", ".."):
        return "is a file name without a folder (/ or \\); the folder is --out"
    if text.startswith("."):
        return "must not start with a dot (a hidden file)"
    return None


def _aspect_ok(text: str) -> str | None:
    try:
        parse_aspect(text)
    except UsageError:
        return "needs two positive numbers W:H, at most 64:1 (for example 16:9)"
    return None


def _strengths_ok(values: list[float]) -> str | None:
    if not values:
        return "needs at least one value"
    return None if all(0.0 <= v <= 1.0 for v in values) else "values must be between 0 and 1"


def _random_seed(value: int) -> int | None:
    return None if value == RANDOM_SEED else value


def _seed_ok(value: int) -> str | None:
    return None if 0 <= value <= MAX_SEED else f"must be {RANDOM_SEED} (random) or 0 to {MAX_SEED}"


def _side(name: str, help: str, commands: tuple[str, ...] = RENDER_COMMANDS, **more: Any) -> Setting:
    """A side in px; the output's own sides are hashed as the resolved width x height, not as asked."""
    more.setdefault("in_key", False)
    return Setting(name, "px", None, help, SIZE_PANEL, commands, check=in_range(MIN_SIDE, MAX_SIDE), **more)


def _refine_help() -> str:
    methods = " or ".join(f"{m.name} ({m.summary})" for m in REFINE_METHODS)
    return f"How refine stages work: {methods} \\[default: {DEFAULT_REFINE}]."


def _memory_help() -> str:
    names = ", ".join(memory_rung_names())
    return (
        f"Memory settings for every stage, by the name plan shows ({names}; lowest: the most frugal); default: "
        "the fastest whose estimate fits the budget. An out-of-memory error still steps down from it."
    )


def _strength_help() -> str:
    firsts = ", ".join(f"{m.first_strength:g} {m.name}" for m in REFINE_METHODS)
    return f"The first refine stage's strength; later ones fall by the method's schedule \\[default: {firsts}]."


def _preset_names(incomplete: str) -> list[str]:
    """Tab completion of --preset: shipped and user presets."""
    from .presets import list_presets  # presets validate against this table: imported when completing

    return [p.name for p in list_presets() if p.name.startswith(incomplete)]


ONE_IMAGE = (GENERATE, PLAN, UPSCALE)  # settings of one image, not of a whole prompt file
NOT_UPSCALE = (GENERATE, PLAN, BATCH)
CORE_SETTINGS: tuple[Setting, ...] = (
    Setting("prompt", "str", "", commands=(), check=_prompt_ok, in_presets=False),
    Setting(
        "negative",
        "str",
        "",
        "Negative prompt: what to avoid.",
        PROMPT_PANEL,
        (GENERATE, UPSCALE, BATCH),
        check=_prompt_ok,
        flags=("-n",),
        aliases=("negative_prompt",),
    ),
    Setting(
        "seed",
        "int",
        None,
        "Random seed; -1 means random \\[default: random, always reported].",
        SAMPLER_PANEL,
        ONE_IMAGE,
        in_key=False,  # hashed on its own: only when it was chosen
        in_presets=False,
        check=_seed_ok,
        normalize=_random_seed,
    ),
    _side(
        "size",
        f"Long side of the output: 4096, 8k, 16K (x1024), or WxH like 4096x2048 \\[default: {DEFAULT_SIZE}].",
        WITH_BENCH,
        flags=("-s",),
        metavar="PX",
    ),
    Setting(
        "aspect",
        "str",
        "1:1",
        "Shape W:H, e.g. 16:9 \\[default: 1:1].",
        SIZE_PANEL,
        (GENERATE, PLAN, BATCH, BENCH),
        in_key=False,
        check=_aspect_ok,
    ),
    _side("width", "Exact output width, px (instead of --size)."),
    _side("height", "Exact output height, px (instead of --size)."),
    Setting(
        "steps",
        "int",
        50,
        "Full schedule steps; a stage at strength s runs about s*steps \\[default: 50].",
        SAMPLER_PANEL,
        WITH_BENCH,
        check=in_range(1, 1000),
    ),
    Setting(
        "guidance",
        "float",
        7.5,
        "Classifier-free guidance scale \\[default: 7.5].",
        SAMPLER_PANEL,
        WITH_BENCH,
        check=in_range(0.0, 50.0),
        flags=("-g",),
        aliases=("cfg_scale", "cfg"),
    ),
    *PROMPT_SETTINGS,  # clip skip and embeddings: prompt_settings.py
    Setting(
        "strengths",
        "floats",
        None,
        "Refine-stage strengths, first to last, e.g. 0.4,0.3,0.2,0.1 \\[default: 0.4 falling linearly to 0.1].",
        SIZE_PANEL,
        WITH_BENCH,
        check=_strengths_ok,
    ),
    Setting(
        "size_cond",
        "str",
        SIZE_CONDITIONING[0],
        "SDXL's size conditioning (time_ids) at each stage: stage (the stage's own size) or target (the final "
        "output's at every stage, base included, as LinFusion's official SDXL pipeline does) \\[default: stage].",
        SIZE_PANEL,
        WITH_BENCH,
        choices=lambda: SIZE_CONDITIONING,
        key_if_default=False,  # added later: images made before it keep their names
        metavar="stage|target",
    ),
    Setting(
        "scheduler",
        "str",
        DEFAULT_SAMPLER,
        'Sampler, by its AUTOMATIC1111 name ("DPM++ 2M Karras", "Euler a", "DPM++ SDE Karras") or ours '
        f"(dpm++2m-karras, euler-a); `linfusion samplers` lists them \\[default: {DEFAULT_SAMPLER}].",
        SAMPLER_PANEL,
        WITH_BENCH,
        normalize=scheduler_name,
        check=sampler_problem,
        complete=lambda incomplete: [name for name in SAMPLERS.names() if name.startswith(incomplete)],
        aliases=("sampler", "sampler_name"),
    ),
    Setting(
        "format",
        "str",
        "png",
        f"Output format: {', '.join(OUTPUT_FORMATS.names())} (also jpg, tif) \\[default: png].",
        OUTPUT_PANEL,
        in_key=False,
        normalize=format_name,
        choices=OUTPUT_FORMATS.names,
        flags=("-f",),
    ),
    Setting(
        "name",
        "str",
        None,
        "Output file name without extension \\[default: prompt slug, seed, size and a hash of the other settings].",
        OUTPUT_PANEL,
        ONE_IMAGE,
        check=_name_ok,
        in_key=False,
        in_presets=False,
    ),
    _side(
        "base_size",
        "Long side of the base stage, px \\[default: the model's native size].",
        (*NOT_UPSCALE, BENCH),
        metavar="PX",
        in_key=True,
    ),
    Setting(
        "model",
        "str",
        DEFAULT_MODEL,
        "Hub id, diffusers folder, .safetensors file, or tiny / tiny-sd2 / tiny-sdxl (built-in, random "
        f"weights) \\[default: {DEFAULT_MODEL}].",
        MODEL_PANEL,
        (*RENDER_COMMANDS, REPLAY),
        flags=("-m",),
    ),
    Setting(
        "linfusion",
        "str",
        "auto",
        "LinFusion weights: auto (official for the model's family), none (ordinary attention), or a "
        "checkpoint folder / hub id \\[default: auto].",
        MODEL_PANEL,
        (*RENDER_COMMANDS, REPLAY),
    ),
    Setting(
        "vae",
        "str",
        None,
        "Replacement VAE (diffusers folder or hub id), e.g. an fp16-fixed SDXL VAE.",
        MODEL_PANEL,
        (*RENDER_COMMANDS, REPLAY),
    ),
    Setting(
        "vae_tile",
        "int",
        None,
        "VAE tile side, px \\[default: automatic from free memory].",
        MEMORY_PANEL,
        WITH_BENCH,
        in_key=False,
        check=in_range(64, MAX_SIDE),
    ),
    Setting(
        "low_vram",
        "bool",
        False,
        "Memory settings from frugal down: each stage takes the first that fits (frugal, then the UNet in row "
        "bands, then its skips in CPU memory too; linfusion plan --simulate shows what each needs).",
        MEMORY_PANEL,
        WITH_BENCH,
        in_key=False,
    ),
    Setting(
        "memory",
        "str",
        None,
        _memory_help,
        MEMORY_PANEL,
        WITH_BENCH,
        in_key=False,
        choices=memory_rung_names,
        metavar="NAME",
    ),
    Setting(
        "max_vram",
        "float",
        None,
        "Plan memory for at most this many GiB.",
        MEMORY_PANEL,
        WITH_BENCH,
        in_key=False,
        check=in_range(0.5, 4096),
        metavar="GIB",
    ),
    Setting("image", "str", None, commands=(), in_presets=False, path=True),
    Setting(
        "strength",
        "float",
        None,
        _strength_help,
        REFINE_PANEL,
        WITH_BENCH,
        check=in_range(0.0, 1.0),
        aliases=("denoising_strength", "denoise"),
    ),
    Setting(
        "refine",
        "str",
        DEFAULT_REFINE,
        _refine_help,
        REFINE_PANEL,
        WITH_BENCH,
        choices=REFINE_METHODS.names,
        metavar="METHOD",
    ),
    Setting(
        "preset",
        "str",
        None,
        "A recipe of settings: a preset name (see `linfusion presets list`) or a YAML file.",
        PROMPT_PANEL,
        WITH_BENCH,
        in_key=False,
        in_presets=False,
        flags=("-p",),
        complete=_preset_names,
    ),
)


def table() -> Mapping[str, Setting]:
    """Every setting by name: the core's, then each refine method's and each adapter kind's (in their registries'
    order). Made again whenever what declares settings changed, so a method or kind registered later (a plug-in, a
    test's toy one) is in it; kept otherwise (a 50,000-job prompt file asks for it 150,000 times)."""
    owners = (*REFINE_METHODS, *ADAPTER_KINDS)
    stamp = (tuple((o, o.settings) for o in owners), tuple(EXTRA_SETTINGS))  # held: no id is reused
    if _TABLE and _TABLE[0][0] == stamp:
        return _TABLE[0][1]
    found: dict[str, Setting] = {}
    owned = (s for owner in owners for s in owner.settings)
    for setting in (*CORE_SETTINGS, *EXTRA_SETTINGS, *owned):
        if setting.name in found:
            raise ValueError(f"setting {setting.name!r} is declared twice")
        found[setting.name] = setting
    names = known_names(found)
    if len(names) != len(set(names)):
        raise ValueError(f"a setting name or alias is declared twice: {sorted(n for n in names if names.count(n) > 1)}")
    _TABLE[:] = [(stamp, MappingProxyType(found))]
    return _TABLE[0][1]


_TABLE: list[tuple[Any, Mapping[str, Setting]]] = []  # the last table made, with what it was made from


EXTRA_SETTINGS: list[Setting] = []  # settings added from outside (a plug-in, a test): `add_setting`


def add_setting(setting: Setting) -> None:
    """Declare one more setting (a plug-in's, a test's toy one): it is then a flag, a job field and, if it says so,
    part of the settings key, like any other."""
    if setting.name in table():
        raise ValueError(f"setting {setting.name!r} is declared already")
    EXTRA_SETTINGS.append(setting)


def remove_setting(name: str) -> None:
    EXTRA_SETTINGS[:] = [s for s in EXTRA_SETTINGS if s.name != name]


def job_keys() -> tuple[str, ...]:
    return tuple(table())


def not_in_presets() -> tuple[str, ...]:
    """Keys a preset may not set: they belong to one image, not to a recipe."""
    return tuple(name for name, setting in table().items() if not setting.in_presets)


def problem(where: str, key: str, message: str) -> UsageError:
    """A UsageError about one field: `--flag: ...` for the command line, `WHERE: field 'key' ...` elsewhere."""
    if where == FLAGS:
        return UsageError(f"--{key.replace('_', '-')}: {message}")
    return UsageError(f"{where}: field '{key}' {message}")


def setting_name(key: str, settings: Mapping[str, Setting]) -> str:
    """A field as a person writes it (`Prompt` in a CSV header, `base-size`, ` seed `, A1111's `CFG Scale` or
    `Negative prompt`) -> the setting's name; a name that is no setting's, as given."""
    if key in settings:
        return key
    name = "_".join(key.strip().lower().replace("-", " ").split())
    if name in settings:
        return name
    return next((s.name for s in settings.values() if name in s.aliases), key)


def known_names(settings: Mapping[str, Setting]) -> list[str]:
    """Every name a field may be written as (settings' names and their aliases): what a did-you-mean offers."""
    return [name for s in settings.values() for name in (s.name, *s.aliases)]


def coerce(key: str, value: Any, *, where: str, from_text: bool = False) -> Any:
    """Check (and, for text sources like flags, CSV or TXT, parse) one value; a UsageError naming `where`."""
    settings = table()
    setting = settings.get(setting_name(key, settings))
    if setting is None:
        ours = OTHER_NAMES.get("_".join(key.strip().lower().replace("-", " ").split()))
        close = f" (did you mean {ours}?)" if ours in settings else did_you_mean(key, known_names(settings))
        known = close or f" (known: {', '.join(settings)})"
        raise UsageError(f"{where}: unknown field {quote(key)}{known}")
    try:
        return setting.read(value, from_text=from_text)
    except (TypeError, ValueError) as exc:
        raise problem(where, setting.name, str(exc)) from None
