"""A job checked, planned and named before any model loads: everything about it that can fail early does here.

`plan_for` reads the model's family from its config alone (or a single file's header), runs every adapter kind's
checks, plans the stages and names the outputs; the run (run.py), `plan` (plan_report.py) and batches
(batch.py) all start from its `Prepared`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from ..base.errors import DEFAULT_TIMEOUT_S, ModelNotFoundError, UsageError
from ..base.events import Note
from ..base.plan import Plan
from ..base.precision import AUTO, PRECISIONS, precision_name
from ..base.registry import did_you_mean
from ..base.settings import shown
from ..base.sizes import DEFAULT_MAX_PIXELS, Target, resolve_target
from ..engine.schedulers import check_sampler
from ..io.formats import OUTPUT_FORMATS, check_format_fits, format_name
from ..io.names import output_stem
from ..io.output import OutputPaths
from ..models.adapters import ADAPTER_KINDS, preflight
from ..models.families import Family, peek_family
from ..models.hub import looks_like_hub_id
from .image_settings import from_image
from .jobspec import JobSpec
from .metadata import settings_key
from .planning import make_plan
from .presets import load_preset
from .settings import FLAGS
from .tags import expand_prompt_tags, record_embeddings

if TYPE_CHECKING:
    from ..engine.memory_plan import MemoryPlanner

DEVICE_TYPES = ("cuda", "cpu", "mps")
DEVICE_WORDS = {"gpu": "cuda", "nvidia": "cuda", "cuda0": "cuda:0", "metal": "mps", "apple": "mps"}  # what people type
SEED_LIMIT = 2**32 - 1  # seeds we pick ourselves stay in the range every tool accepts
ASSUMED_NATIVE = 512  # plans before a model's config is known assume SD-1.x (replanned once it loads)
ASPECT_TOLERANCE = 0.01  # relative; rounding sides to multiples of 8 alone never stretches this much
SHAPING = ("size", "aspect", "width", "height", "base_size", "strengths", "strength", "refine")  # a preset's, noted
BUILTIN_LINFUSION = ("auto", "none", "init", "random")  # --linfusion values that name no weights to fetch
LINFUSION_FILES = "config.json + diffusion_pytorch_model.safetensors, the official format"
VAE_FOLDER = "give a diffusers AutoencoderKL folder (config.json and safetensors weights)"


@dataclass(frozen=True, kw_only=True)
class RunOptions:
    """Run-level settings: the same for every job of a run."""

    out: Path = Path("outputs")
    device: str = "auto"
    dtype: str = "auto"
    overwrite: bool = False
    save_stages: bool = False
    allow_pickle: bool = False
    max_input_pixels: int = DEFAULT_MAX_PIXELS
    split: bool = False  # one image split across the launcher's processes (RANK/WORLD_SIZE), not one each
    timeout_s: float = DEFAULT_TIMEOUT_S  # how long a process of a split image waits for the others

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", precision_name(self.dtype))  # float16, half... as fp16
        object.__setattr__(self, "device", self.device.strip().lower())
        if self.dtype != AUTO and self.dtype not in PRECISIONS:
            hint = did_you_mean(self.dtype, (AUTO, *PRECISIONS))
            raise UsageError(f"--dtype {self.dtype!r}: must be auto, {', '.join(PRECISIONS)}{hint}")
        if self.device != AUTO and self.device.split(":")[0] not in DEVICE_TYPES:
            meant = DEVICE_WORDS.get(self.device.split(":")[0])
            hint = f" (did you mean {meant}?)" if meant else did_you_mean(self.device, (AUTO, *DEVICE_TYPES))
            raise UsageError(f"--device {self.device!r}: must be auto, cpu, mps, cuda or cuda:N{hint}")


@dataclass
class Prepared:
    """A job checked and planned, before any model is loaded."""

    job: JobSpec
    target: Target
    plan: Plan
    seed: int
    paths: OutputPaths
    index: int | None = None
    input_size: tuple[int, int] | None = None
    notes: list[Note] = field(default_factory=list)  # the plan's, each with its level
    random_seed: bool = False  # picked at random this run (batch resume then matches by index and key, not name)
    key: str = ""  # settings_key: what decides the image, the seed only when it was chosen
    family: Family | None = None  # the model's family as its config says (None: not known before loading)
    planner: MemoryPlanner | None = None  # the job's memory planner, once made (plan_report.memory_planner)


def pick_seed(job: JobSpec, index: int | None = None, base_seed: int | None = None) -> int:
    """The job's own seed, else base + index, else random."""
    if job.seed is not None:
        return job.seed
    if base_seed is not None:
        return base_seed + (index or 0)
    return random.SystemRandom().randint(0, SEED_LIMIT)


def job_target(job: JobSpec, input_size: tuple[int, int] | None = None) -> Target:
    """The output size a job asks for, checked against its format (no model, no plan needed)."""
    if input_size is not None and job.size is None and job.width is None and job.height is None:
        raise UsageError("upscaling needs a target: give --size (long side) or --width/--height")
    aspect = job.aspect
    if input_size is not None and "aspect" not in job.sources:
        aspect = f"{input_size[0]}:{input_size[1]}"  # keep the input's shape
    target = resolve_target(job.size, aspect, job.width, job.height)
    check_format_fits(job.format, target)
    return target


def prepare(
    job: JobSpec,
    options: RunOptions,
    *,
    native: int,
    seed: int,
    index: int | None = None,
    input_size: tuple[int, int] | None = None,
    random_seed: bool = False,
) -> Prepared:
    """Validate sizes and formats, plan the stages and name the outputs."""
    target = job_target(job, input_size)
    plan = make_plan(
        target,
        native=native,
        schedule_steps=job.steps,
        strengths=job.strengths,
        base_size=job.base_size,
        input_size=input_size,
        first_strength=job.strength,
        strengths_from=None if job.sources.get("strengths", FLAGS) == FLAGS else job.sources["strengths"],
        refine=job.refine,
    )
    key = settings_key(job.settings(), target.width, target.height, None if random_seed else seed)
    name = file_name(job)
    stem = output_stem(_label(job), seed, target.width, target.height, key=key, name=name, index=index)
    paths = OutputPaths.for_stem(options.out, stem, job.format)
    notes = _preset_notes(job) + list(plan.notes) + _stretch_note(input_size, target)
    if name is not None and job.name is not None and paths.image.stem != name:
        said = f"name '{job.name}' is written {paths.image.name} (a file name every system takes)"
        notes.append(Note("info", said))
    return Prepared(job, target, plan, seed, paths, index, input_size, notes, random_seed, key)


def plan_for(
    job: JobSpec,
    options: RunOptions,
    *,
    seed: int,
    index: int | None = None,
    input_size: tuple[int, int] | None = None,
    random_seed: bool = False,
) -> Prepared:
    """Plan a job from the model's config alone (no weights loaded), with every check its adapters make."""
    job_target(job, input_size)  # size and format refused before even the model's config is read
    tag_notes = from_image(job)  # upscale IMAGE: the prompt, seed... its image records, where not given
    tag_notes += expand_prompt_tags(job)  # <lora:NAME:W> -> the job's LoRAs, out of the prompt
    record_embeddings(job)
    family, note = peek_family(job.model)
    check_linfusion_source(job.linfusion)
    check_vae_source(job.vae)
    check_sampler(job.scheduler, job.steps)
    preflight(job, family, options.allow_pickle)
    native = family.native_size if family else ASSUMED_NATIVE
    prep = prepare(job, options, native=native, seed=seed, index=index, input_size=input_size, random_seed=random_seed)
    prep.family = family
    prep.notes.extend(tag_notes)
    if note:
        prep.notes.append(Note("info", note))
    size = (prep.target.width, prep.target.height)
    for kind in ADAPTER_KINDS:
        prep.notes.extend(kind.notes(job, size, len(prep.plan.stages)))
    prep.notes.extend(_missing_folders(job))
    return prep


def _preset_notes(job: JobSpec) -> list[Note]:
    """A preset mixed with your own size (`--preset sd15-16k --size 4k`): what still comes from the preset and
    shapes the output (its 2:1 aspect, its strengths), said once, so a 4096x2048 image is no surprise."""
    if not job.preset:
        return []
    preset = load_preset(job.preset)
    yours = [key for key in preset.settings if job.sources.get(key) != preset.label]
    kept = [key for key in SHAPING if key in preset.settings and key not in yours]
    if not yours or not kept:
        return []
    theirs = ", ".join(f"{key} {_text(preset.settings[key])}" for key in kept)
    replaced = ", ".join(f"{key} {_text(preset.settings[key])}" for key in yours)
    return [Note("info", f"from {preset.label}: {theirs} (its {replaced} replaced by yours)")]


def _text(value: object) -> str:
    return value if isinstance(value, str) else shown(value)


def check_linfusion_source(source: str) -> None:
    """--linfusion PATH exists, as a folder, before the model loads (a hub id is found once fetched, or offline
    by the plan's checks)."""
    if source in BUILTIN_LINFUSION:
        return
    path = Path(source).expanduser()
    if path.is_dir():
        return
    if path.exists():
        raise UsageError(f"--linfusion '{source}' is a file; give the checkpoint's folder ({LINFUSION_FILES})")
    if not looks_like_hub_id(source):
        raise ModelNotFoundError(
            f"LinFusion checkpoint '{source}' does not exist: give a folder ({LINFUSION_FILES}), a hub id, auto or none"
        )


def _missing_folders(job: JobSpec) -> list[Note]:
    """A LoRA or embedding folder given that is not there (a typo) finds nothing: said, since a prompt's word that
    names an embedding is then read as a word, and the image differs with no error."""
    given = [("--embeddings", folder) for folder in job.embeddings or []]
    given += [("--lora-dir", folder) for folder in job.lora_dir or []]
    return [
        Note("warning", f"{flag} '{folder}' is not a folder: nothing is found there")
        for flag, folder in given
        if not Path(folder).expanduser().is_dir()
    ]


def check_vae_source(source: str | None) -> None:
    """--vae PATH is a diffusers AutoencoderKL folder (or a model folder with vae/), found before the model loads:
    a wrong path was refused only once torch and diffusers had been imported (7 s)."""
    if not source:
        return
    path = Path(source).expanduser()
    if path.is_dir():
        if not any((path / sub / "config.json").is_file() for sub in ("", "vae")):
            raise UsageError(f"--vae '{source}' has no config.json (nor vae/config.json): {VAE_FOLDER}")
        return
    if path.exists():
        raise UsageError(f"--vae '{source}' is a file: {VAE_FOLDER}")
    if not looks_like_hub_id(source):
        raise ModelNotFoundError(f"VAE '{source}' does not exist: {VAE_FOLDER}, or a hub id")


def _stretch_note(input_size: tuple[int, int] | None, target: Target) -> list[Note]:
    """An upscale whose target has another shape than its input stretches it: say so, and how to keep it."""
    if input_size is None:
        return []
    before, after = input_size[0] / input_size[1], target.width / target.height
    if abs(after - before) / before <= ASPECT_TOLERANCE:
        return []
    return [
        Note(
            "warning",
            f"the input {input_size[0]}x{input_size[1]} is stretched to {target.width}x{target.height} (another "
            "shape); give --size N alone to keep its shape",
        )
    ]


def file_name(job: JobSpec) -> str | None:
    """The job's `name` without the extension its format gives (`--name fox.png` is fox.png, not fox.png.png);
    an image extension of another format is refused rather than written as fox.jpg.png."""
    if not job.name:
        return None
    stem, suffix = job.name, Path(job.name).suffix
    written = format_name(suffix) if suffix else ""
    if written in OUTPUT_FORMATS:
        if written != job.format:
            raise UsageError(
                f"--name '{job.name}' ends in {suffix}, but the format is {job.format}: give --format {written}, "
                f"or the name without {suffix}"
            )
        stem = stem[: -len(suffix)]
    return stem


def with_seed(prep: Prepared, seed: int, options: RunOptions) -> Prepared:
    """The same job under another seed (a random-seed job adopting the seed of its earlier, unfinished output)."""
    w, h = prep.target.width, prep.target.height
    stem = output_stem(_label(prep.job), seed, w, h, key=prep.key, name=file_name(prep.job), index=prep.index)
    return replace(prep, seed=seed, paths=OutputPaths.for_stem(options.out, stem, prep.job.format))


def _label(job: JobSpec) -> str:
    """What names the output: the prompt, or for an upscale without one, its input image."""
    return job.prompt if job.prompt.strip() or not job.image else f"{Path(job.image).stem}-upscaled"


def replan_for(native: int, prep: Prepared, options: RunOptions) -> Prepared:
    """Plans made before loading assume SD-1.x when the model's config was not local; once it is loaded,
    plan again if its native size differs. Names, seed, index and the memory planner stay as they were."""
    if prep.plan.native == native:
        return prep
    fresh = prepare(
        prep.job,
        options,
        native=native,
        seed=prep.seed,
        index=prep.index,
        input_size=prep.input_size,
        random_seed=prep.random_seed,
    )
    return replace(fresh, paths=prep.paths, family=prep.family, planner=prep.planner)
