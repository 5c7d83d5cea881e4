"""Command options: every job setting's flag made from its declaration (`with_settings`), and the run-level
options (where files go, the device) that are not job settings.

A job setting's flag is read as text and checked by the setting itself (the same reading and the same messages as
a prompt file's CSV cell), so `--steps 2.5` says "must be a whole number" in our words.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from ..base.settings import DEVICE_PANEL, MODEL_PANEL, OUTPUT_PANEL, PROMPT_PANEL, SAMPLER_PANEL, Setting
from ..core.settings import table

FLAG = {"metavar": "", "show_default": False}  # an on/off flag: no "<bool>" type, no "[default: False]"
# What a setting's flag shows as its value in --help, by how the setting reads values.
METAVARS = {"int": "INTEGER", "float": "FLOAT", "px": "PX", "floats": "NUMBERS", "str": "TEXT", "refs": "SRC"}
SETTINGS_PARAM = "settings"


def _annotation(setting: Setting) -> Any:
    """The Typer option of one setting: text (read by the setting), a list for adapters and texts, a flag for
    bools."""
    names = list(setting.all_flags)
    help_text = setting.help_text()
    common: dict[str, Any] = {"help": help_text, "rich_help_panel": setting.panel, "show_default": False}
    if setting.kind == "bool":
        return Annotated[bool | None, typer.Option(*names, **{**common, **FLAG})]
    metavar = setting.metavar or METAVARS.get(setting.kind, "TEXT")
    completion = _completion(setting)
    if completion is not None:
        common["autocompletion"] = completion
    if setting.kind in ("refs", "texts"):  # every time the flag is given reaches the check: none silently lost
        return Annotated[list[str] | None, typer.Option(*names, metavar=metavar, **common)]
    return Annotated[str | None, typer.Option(*names, metavar=metavar, **common)]


def _completion(setting: Setting) -> Callable[[str], list[str]] | None:
    if setting.complete is not None:
        return setting.complete
    choices = setting.choices
    if choices is None:
        return None
    return lambda incomplete: [name for name in choices() if name.startswith(incomplete)]


class _WithSettings:
    """A command function with a flag for every job setting declared for its command. The flags are read from
    the settings table whenever Typer builds the command (each run), so a setting added at run time (a plug-in,
    a test) is a flag like any other."""

    def __init__(self, fn: Callable[..., Any], command: str) -> None:
        self.fn = fn
        self.command = command
        self.__name__ = fn.__name__
        self.__qualname__ = fn.__qualname__
        self.__doc__ = fn.__doc__
        self.__module__ = fn.__module__
        own = inspect.signature(fn, eval_str=True)  # the real Annotated types, for Typer
        self._own = [
            p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own.parameters.values() if p.name != SETTINGS_PARAM
        ]

    def _settings(self) -> list[Setting]:
        taken = {p.name for p in self._own}
        return [s for s in table().values() if self.command in s.commands and s.name not in taken]

    @property
    def __signature__(self) -> inspect.Signature:
        added = [
            inspect.Parameter(s.name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=_annotation(s))
            for s in self._settings()
        ]
        return inspect.Signature([*self._own, *added])

    @property
    def __annotations__(self) -> dict[str, Any]:  # type: ignore[override]
        return {p.name: p.annotation for p in self.__signature__.parameters.values()}

    def __call__(self, **kwargs: Any) -> Any:
        names = {s.name for s in self._settings()}
        given = {name: kwargs.pop(name) for name in list(kwargs) if name in names}
        settings = {name: value for name, value in given.items() if value not in (None, [])}
        return self.fn(**kwargs, settings=settings)


def with_settings(command: str) -> Callable[[Callable[..., Any]], Any]:
    """Give a command a flag for every job setting declared for it; the function receives the ones given as one
    `settings` dict (setting name -> the text or list given; unset flags left out), after its own parameters."""

    def decorate(fn: Callable[..., Any]) -> Any:
        return _WithSettings(fn, command)

    return decorate


# --- run-level options: not job settings ----------------------------------------------------------------------
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Output folder.", rich_help_panel=OUTPUT_PANEL)]
OverwriteOpt = Annotated[
    bool, typer.Option("--overwrite", help="Replace existing outputs.", rich_help_panel=OUTPUT_PANEL, **FLAG)
]
SaveStagesOpt = Annotated[
    bool, typer.Option("--save-stages", help="Also save each stage's image.", rich_help_panel=OUTPUT_PANEL, **FLAG)
]
JsonOpt = Annotated[
    bool,
    typer.Option(
        "--json", help="Print one JSON report on stdout (and nothing else there).", rich_help_panel=OUTPUT_PANEL, **FLAG
    ),
]
QuietOpt = Annotated[
    bool, typer.Option("--quiet", "-q", help="Show only errors.", rich_help_panel=OUTPUT_PANEL, **FLAG)
]
DryRunOpt = Annotated[
    bool,
    typer.Option(
        "--dry-run", help="Print the stage plan and exit; loads no model.", rich_help_panel=OUTPUT_PANEL, **FLAG
    ),
]
DeviceOpt = Annotated[
    str,
    typer.Option(help="auto (cuda, then mps, then cpu), cuda, cuda:N, mps or cpu.", rich_help_panel=DEVICE_PANEL),
]
DtypeOpt = Annotated[
    str, typer.Option(help="auto (fp16 on GPUs, fp32 on the CPU), fp16, bf16 or fp32.", rich_help_panel=DEVICE_PANEL)
]
AllowPickleOpt = Annotated[
    bool,
    typer.Option(
        "--allow-pickle",
        help="Allow .ckpt/.bin pickle weights (loaded weights-only).",
        rich_help_panel=MODEL_PANEL,
        **FLAG,
    ),
]
MaxPixelsOpt = Annotated[
    int,
    typer.Option(
        metavar="PIXELS",
        help="Refuse input images with more pixels than this (1 gigapixel).",
        rich_help_panel=OUTPUT_PANEL,
    ),
]
GpusOpt = Annotated[
    int | None,
    typer.Option(
        metavar="N",
        help="Split the image over N processes on this machine, one per GPU, started for you (torch's launcher); "
        "under torchrun it is split over torchrun's processes already.",
        rich_help_panel=DEVICE_PANEL,
    ),
]
TimeoutOpt = Annotated[
    float,
    typer.Option(
        "--timeout",
        metavar="SECONDS",
        help="How long the processes of a split image wait for each other before all stop with an error "
        "\\[default: 600].",
        show_default=False,
        rich_help_panel=DEVICE_PANEL,
    ),
]
BatchCountOpt = Annotated[
    int,
    typer.Option(
        "--batch-count",
        metavar="N",
        help="Make N images of it, one after another, seeds counting up from --seed (AUTOMATIC1111's batch count) "
        "\\[default: 1].",
        show_default=False,
        rich_help_panel=OUTPUT_PANEL,
    ),
]
SplitImageOpt = Annotated[
    bool,
    typer.Option(
        "--split-image",
        help="Under torchrun (or with --gpus): all processes make each job together, its image split over them, "
        "instead of each taking its own jobs (for images that need every card's memory).",
        rich_help_panel=DEVICE_PANEL,
        **FLAG,
    ),
]


# --- the commands' own arguments and options (cli/commands.py) -----------------------------------------------

BatchFileOpt = Annotated[
    Path,
    typer.Argument(
        metavar="FILE", help="Prompt file: .txt (a prompt a line), .yaml/.yml, .jsonl or .csv.", show_default=False
    ),
]

BatchSeedOpt = Annotated[
    str | None,
    typer.Option(
        metavar="INTEGER",
        help="Base seed: a job without its own seed gets BASE + its index; -1 means random \\[default: random].",
        rich_help_panel=SAMPLER_PANEL,
    ),
]

BatchShardOpt = Annotated[
    str | None,
    typer.Option(
        metavar="K/N",
        help="Run the jobs whose index mod N is K \\[default: from SLURM_ARRAY_TASK_* or torchrun's RANK/WORLD_SIZE].",
        rich_help_panel=DEVICE_PANEL,
    ),
]

BatchFailFastOpt = Annotated[
    bool, typer.Option("--fail-fast", help="Stop at the first failed job.", rich_help_panel=OUTPUT_PANEL, **FLAG)
]

BatchOverwriteOpt = Annotated[
    bool, typer.Option("--overwrite", help="Redo jobs whose outputs exist.", rich_help_panel=OUTPUT_PANEL, **FLAG)
]

BatchJsonOutOpt = Annotated[
    bool,
    typer.Option(
        "--json", help="One JSON line per finished or skipped job on stdout.", rich_help_panel=OUTPUT_PANEL, **FLAG
    ),
]

BatchDryRunOpt = Annotated[
    bool,
    typer.Option(
        "--dry-run",
        help="Check the whole file and print each job's plan; loads no model.",
        rich_help_panel=OUTPUT_PANEL,
        **FLAG,
    ),
]

UpscaleImageOpt = Annotated[
    Path,
    typer.Argument(
        metavar="IMAGE",
        help="Your image: PNG, JPEG, WebP, TIFF, BMP... any mode (alpha over white).",
        show_default=False,
    ),
]

UpscalePromptOpt = Annotated[
    str,
    typer.Option(
        help="What the image shows. Optional: with one, the refine stages add detail that fits it; without, "
        "the prompt the image records (its sidecar, linfusion's or A1111's metadata), else generic texture.",
        rich_help_panel=PROMPT_PANEL,
    ),
]

PlanPromptOpt = Annotated[
    str,
    typer.Argument(
        metavar="PROMPT",
        help="The prompt, if you have one: with --seed the plan also shows the output file name.",
        show_default=False,
    ),
]

PlanSimulateOpt = Annotated[
    bool,
    typer.Option(
        "--simulate",
        help="Also run the job on PyTorch's meta device as a CUDA GPU would (no GPU, nothing downloaded): each "
        "stage's simulated peak memory and its parts, and its TFLOP. Seconds; about a minute at 16K.",
        rich_help_panel=DEVICE_PANEL,
    ),
]

PlanGpuOpt = Annotated[
    str | None,
    typer.Option(
        metavar="CARD",
        help="The GPU to plan for: h200, h100, a100, l40s, 4090, 3090 (its memory is the budget unless "
        "--max-vram gives one), or its dense fp16 TFLOPS; --simulate then gives each stage's time floor on it.",
        rich_help_panel=DEVICE_PANEL,
    ),
]

PlanWorldSizeOpt = Annotated[
    int,
    typer.Option(
        metavar="N",
        min=1,
        help="Plan one image split over N processes (torchrun, --gpus): each stage's bands and the memory of one.",
        rich_help_panel=DEVICE_PANEL,
    ),
]

ReplaySidecarOpt = Annotated[
    Path,
    typer.Argument(
        metavar="SIDECAR",
        help="A sidecar .json that linfusion wrote next to an image, or the image itself (its sidecar if "
        "beside it, else what it records: linfusion's metadata or AUTOMATIC1111's parameters).",
        show_default=False,
    ),
]

ReplayDtypeOpt = Annotated[
    str | None,
    typer.Option(
        help="Precision: auto, fp16, bf16 or fp32 \\[default: the one recorded in the sidecar].",
        rich_help_panel=DEVICE_PANEL,
    ),
]
