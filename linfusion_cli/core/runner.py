"""One job from resolved settings to files on disk: plan, generate, metadata, atomic save.

Shared by `generate`, `batch`, `upscale` and `replay`; the CLI only parses and renders.
"""

from __future__ import annotations

import json
import platform
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import __version__
from ..base.errors import OutputError, OutputFolderError
from ..base.events import CancelToken, EventSink, Note, Working, ignore
from ..base.plan import Plan, StagePlan
from ..base.sizes import Target, resolve_target
from ..base.text import plural
from ..io.formats import check_format_fits
from ..io.hashing import model_hash
from ..io.metadata import encode_image
from ..io.names import output_stem
from ..io.output import OutputPaths
from ..io.writes import atomic_file, write_bytes_atomic
from .config import FLAGS, EngineSpec, JobSpec, dtype_flag
from .metadata import a1111_parameters, settings_key
from .planning import make_plan

if TYPE_CHECKING:
    import torch

    from ..engine.memory import MemoryChoice, MemoryPlanner
    from ..engine.pipeline import Engine, GenerateResult
    from ..models.families import Family

SEED_LIMIT = 2**32 - 1  # seeds we pick ourselves stay in the range every tool accepts
SCHEMA = 1  # the layout of every JSON we write (reports, batch lines, sidecars, benchmarks): see the README


@dataclass(frozen=True)
class RunOptions:
    """Run-level settings: the same for every job of a run."""

    out: Path = Path("outputs")
    device: str = "auto"
    dtype: str = "auto"
    overwrite: bool = False
    save_stages: bool = False
    allow_pickle: bool = False
    max_input_pixels: int = 1_000_000_000


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
    notes: list[str] = field(default_factory=list)
    random_seed: bool = False  # picked at random this run (batch resume then matches by index and key, not name)
    key: str = ""  # settings_key: what decides the image, the seed only when it was chosen


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
        from ..base.errors import UsageError

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
    """Validate sizes and formats, plan the stages and name the outputs: everything that can fail early."""
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
    stem = output_stem(_label(job), seed, target.width, target.height, key=key, name=job.name, index=index)
    paths = OutputPaths.for_stem(options.out, stem, job.format)
    notes = list(plan.notes) + _stretch_note(input_size, target)
    return Prepared(job, target, plan, seed, paths, index, input_size, notes, random_seed, key)


WARNING_WORDS = ("rounded", "stretched", "ignored")  # plan notes that tell of something the user may not want
ASPECT_TOLERANCE = 0.01  # relative; rounding sides to multiples of 8 alone never stretches this much


def _stretch_note(input_size: tuple[int, int] | None, target: Target) -> list[str]:
    """An upscale whose target has another shape than its input stretches it: say so, and how to keep it."""
    if input_size is None:
        return []
    before, after = input_size[0] / input_size[1], target.width / target.height
    if abs(after - before) / before <= ASPECT_TOLERANCE:
        return []
    return [
        f"the input {input_size[0]}x{input_size[1]} is stretched to {target.width}x{target.height} (another shape); "
        "give --size N alone to keep its shape"
    ]


def with_seed(prep: Prepared, seed: int, options: RunOptions) -> Prepared:
    """The same job under another seed (a random-seed job adopting the seed of its earlier, unfinished output)."""
    from dataclasses import replace

    w, h = prep.target.width, prep.target.height
    stem = output_stem(_label(prep.job), seed, w, h, key=prep.key, name=prep.job.name, index=prep.index)
    return replace(prep, seed=seed, paths=OutputPaths.for_stem(options.out, stem, prep.job.format))


def _label(job: JobSpec) -> str:
    """What names the output: the prompt, or for an upscale without one, its input image."""
    return job.prompt if job.prompt.strip() or not job.image else f"{Path(job.image).stem}-upscaled"


def replan_for(engine: Engine, prep: Prepared, options: RunOptions) -> Prepared:
    """Plans made before loading assume SD-1.x when the model's config was not local; once it is loaded,
    plan again if its native size differs. Names, seed and index stay as they were."""
    native = engine.comps.native_size
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
    fresh.paths = prep.paths
    return fresh


def versions() -> dict[str, str]:
    import diffusers
    import torch
    import transformers

    return {
        "linfusion": __version__,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def build_metadata(prep: Prepared, engine: Engine, result: GenerateResult, device_name: str) -> dict[str, Any]:
    """Everything needed to understand and replay the image (the sidecar and the PNG's JSON chunk)."""
    job = prep.job
    settings = job.settings()
    settings["seed"] = prep.seed
    return {
        "schema": SCHEMA,
        "key": prep.key,
        "seed": prep.seed,
        "width": prep.target.width,
        "height": prep.target.height,
        "model": job.model,
        "model_hash": model_hash(job.model),
        "family": engine.comps.family_label,
        "linfusion": engine.linfusion_source,
        "linfusion_layers": len(engine.patch.layers) if engine.patch else 0,
        "adapters": [adapter.describe() for adapter in engine.adapters],
        "settings": settings,
        "stages": [r.as_dict() for r in result.stages],
        "seconds": {"generate": round(result.seconds, 3), "model_load": round(engine.load_seconds, 3)},
        "device": device_name,
        "dtype": dtype_flag(engine.dtype),
        "dtypes": engine.comps.dtypes(),
        "versions": versions(),
        "warnings": list(prep.notes) + list(result.warnings),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def save_outputs(
    prep: Prepared,
    image: np.ndarray,
    meta: dict[str, Any],
    stage_images: list[tuple[StagePlan, np.ndarray]] | None = None,
) -> dict[str, Any]:
    """Write the image (atomically, with metadata), stage images if any, then the sidecar, last."""
    paths = prep.paths
    parameters = a1111_parameters(meta)
    start = time.perf_counter()
    with atomic_file(paths.image) as handle:
        encode_image(image, prep.job.format, parameters, json.dumps(meta, sort_keys=True), handle=handle)
    stage_files = []
    for stage, pixels in stage_images or []:
        stage_path = paths.image.with_name(f"{paths.image.stem}.stage{stage.index}{paths.image.suffix}")
        with atomic_file(stage_path) as handle:
            encode_image(pixels, prep.job.format, parameters, json.dumps(meta, sort_keys=True), handle=handle)
        stage_files.append(stage_path.name)
    sidecar = dict(meta)
    sidecar["seconds"] = {**meta.get("seconds", {}), "write": round(time.perf_counter() - start, 3)}
    sidecar["file"] = {"name": paths.image.name, "bytes": paths.image.stat().st_size, "format": prep.job.format}
    sidecar["stage_files"] = stage_files
    sidecar["complete"] = True
    write_bytes_atomic(paths.sidecar, (json.dumps(sidecar, indent=2, sort_keys=True) + "\n").encode())
    return sidecar


def ensure_writable_target(prep: Prepared, overwrite: bool) -> None:
    problem = prep.paths.problem()
    if problem:
        raise OutputError(problem)
    if prep.paths.image.exists() and not overwrite:  # before any model loads: bad input, exit 2
        raise OutputFolderError(f"{prep.paths.image} already exists; pass --overwrite to replace it")


def run_one(
    engine: Engine,
    prep: Prepared,
    options: RunOptions,
    *,
    events: EventSink = ignore,
    cancel: CancelToken | None = None,
    init_image: np.ndarray | None = None,
) -> dict[str, Any]:
    """Generate and save one prepared job; returns the sidecar dict."""
    result, meta = generate_one(engine, prep, options, events=events, cancel=cancel, init_image=init_image)
    events(Working(f"writing {prep.paths.image}"))
    return save_outputs(prep, result.image, meta, result.stage_images)


def generate_one(
    engine: Engine,
    prep: Prepared,
    options: RunOptions,
    *,
    events: EventSink = ignore,
    cancel: CancelToken | None = None,
    init_image: np.ndarray | None = None,
) -> tuple[GenerateResult, dict[str, Any]]:
    """Generate one prepared job (nothing written yet): the result and its metadata."""
    result = engine.generate(
        prep.job,
        prep.plan,
        prep.seed,
        events=events,
        cancel=cancel,
        init_image=init_image,
        keep_stages=options.save_stages,
    )
    return result, build_metadata(prep, engine, result, describe_device(engine.device))


def describe_device(device: torch.device) -> str:
    import torch

    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"{device} ({platform.processor() or platform.machine()})"


# --- the generate command's core ------------------------------------------------------------------------


def plan_for(
    job: JobSpec,
    options: RunOptions,
    *,
    seed: int,
    index: int | None = None,
    input_size: tuple[int, int] | None = None,
    random_seed: bool = False,
) -> tuple[Prepared, Family | None]:
    """Plan a job from the model's config alone (no weights loaded). Returns (prepared, family or None)."""
    from ..models.adapters import preflight
    from ..models.families import peek_family

    job_target(job, input_size)  # size and format refused before even the model's config is read
    family, note = peek_family(job.model)
    preflight(job, family, options.allow_pickle)
    native = family.native_size if family else 512
    prep = prepare(job, options, native=native, seed=seed, index=index, input_size=input_size, random_seed=random_seed)
    if note:
        prep.notes.append(note)
    if job.controlnet or job.control_image:
        from ..models.controlnet import control_notes

        prep.notes.extend(control_notes(job, (prep.target.width, prep.target.height), len(prep.plan.stages)))
    return prep, family


def plan_summary(
    prep: Prepared, family: Family | None, device_name: str = "auto", dtype_name: str = "auto"
) -> dict[str, Any]:
    """The plan as data: stages with expected peak memory and VAE tiling on the chosen device, each component's
    dtype, and warnings (a stage that fits no memory settings, fp16 on a CPU, weights not available offline)."""
    from ..engine import memory
    from ..models import controlnet, ip_adapter
    from ..models.archs import ARCHS
    from ..models.loading import DTYPE_NAMES

    device = memory.resolve_device(device_name)
    dtype = memory.resolve_dtype(dtype_name, device)
    job = prep.job
    arch = ARCHS[family.arch if family else "sd15"]
    family_gib = family.weights_gib_fp16 if family else 2.1
    controls = controlnet.job_refs(job)
    planner = memory.MemoryPlanner.for_job(
        low_vram=job.low_vram,
        max_vram=job.max_vram,
        guidance=job.guidance,
        device=device,
        top_width=arch.unet["block_out_channels"][0],
        dtype=dtype,
        weights=int(
            (family_gib * (1 + controlnet.WEIGHTS_SHARE * len(controls)) + ip_adapter.planned_gib_fp16(job, family))
            * memory.GIB
            * torch_bytes(dtype)
            / 2
        ),
        refine=job.refine,
        control_channels=controlnet.activation_channels(arch.unet, len(controls)),
    )
    budget = planner.budget
    vae_dtype = memory.vae_dtype(arch.vae, dtype, family)
    stages: list[dict[str, Any]] = []
    warnings = memory.device_warnings(device, dtype) + offline_gaps(job, family)
    for stage in prep.plan.stages:
        choice = planner.choose(stage.width, stage.height)
        settings, need = choice.settings, choice.estimate
        if not choice.fits and all(s["fits"] for s in stages):
            warnings.append(_over_budget(prep, stage, planner, choice))
        tile = job.vae_tile or memory.auto_vae_tile(
            arch.vae, vae_dtype, device, stage.height, stage.width, settings.vae_budget
        )
        stages.append(
            {
                "index": stage.index,
                "kind": stage.kind,
                "size": stage.size_text,
                "strength": stage.strength,
                "steps": stage.steps,
                "unet_passes": prep.plan.unet_passes(stage),
                "memory": settings.name,
                "memory_settings": settings.as_dict(),
                "estimated_peak_gib": round(need / memory.GIB, 2),
                "fits": choice.fits,
                "vae": "untiled" if tile is None else f"tiles of {tile} px",
            }
        )
    return {
        "prompt": job.prompt,
        "model": job.model,
        "family": family.label if family else "not downloaded yet: assuming SD-1.x",
        "native": prep.plan.native,
        "width": prep.target.width,
        "height": prep.target.height,
        # A seed picked at random for the plan is not the one a run will pick: no made-up seed or file name.
        "seed": job.seed,
        "scheduler": job.scheduler,
        "refine": job.refine,
        "schedule_steps": job.steps,
        "guidance": job.guidance,
        "device": str(device),
        "dtype": dtype_flag(dtype),
        "dtypes": {"unet": DTYPE_NAMES[dtype], "vae": DTYPE_NAMES[vae_dtype], "text_encoder": DTYPE_NAMES[dtype]},
        "memory_budget_gib": None if budget is None else round(budget / memory.GIB, 1),
        "fits": all(s["fits"] for s in stages),
        "stages": stages,
        "controlnets": [
            {"source": ref.source, "scale": ref.scale, "image": image}
            for ref, image in zip(controls, job.control_image or (), strict=False)
        ],
        "ip_adapters": [
            {"source": ref.source, "scale": ref.scale, "image": job.ip_image} for ref in ip_adapter.job_refs(job)
        ],
        "loras": [{"source": ref.source, "scale": ref.scale} for ref in EngineSpec.of(job).loras],
        "linfusion": job.linfusion,
        "output": None if job.seed is None else str(prep.paths.image),
        "notes": [*prep.notes, *warnings],
        "warnings": warnings,
    }


def _over_budget(prep: Prepared, stage: StagePlan, planner: MemoryPlanner, choice: MemoryChoice) -> str:
    """Say that even the most frugal settings exceed the budget, and what would fit."""
    from ..engine.memory import GIB

    text = (
        f"stage {stage.index + 1} ({stage.size_text}) needs about {choice.estimate / GIB:.1f} GiB even with the most "
        f"frugal memory settings ({choice.settings.name}, as --low-vram), over the {(choice.budget or 0) / GIB:.1f} "
        "GiB budget"
    )
    pixels = planner.largest_fitting_pixels(choice.settings)
    target = prep.target
    long_side = int((pixels * target.long_side / max(1, min(target.width, target.height))) ** 0.5) // 64 * 64
    if long_side < 64:
        return f"{text}: not even the model's weights fit; use a device with more memory"
    return f"{text}: about --size {long_side} fits at this aspect (or a device with more memory / --max-vram)"


def offline_gaps(job: JobSpec, family: Family | None) -> list[str]:
    """With HF_HUB_OFFLINE set, the hub repos this job needs that are not in the local cache, each with the
    command that fetches it (nothing is looked up online)."""
    from ..models.controlnet import job_refs
    from ..models.hub import hub_offline, missing_from_cache, model_source

    if not hub_offline():
        return []
    wanted: list[tuple[str, str, str]] = []  # (what, repo, a file every snapshot of it has)
    if model_source(job.model) == "hub":
        wanted.append(("model", job.model, "model_index.json"))
    if job.linfusion == "auto" and family is not None and family.linfusion_repo:
        wanted.append(("LinFusion weights (--linfusion auto)", family.linfusion_repo, "config.json"))
    elif job.linfusion not in ("auto", "none", "init", "random"):
        wanted.append(("LinFusion weights", job.linfusion, "config.json"))
    if job.vae:
        wanted.append(("VAE", job.vae, "config.json"))
    wanted += [("ControlNet", ref.source, "config.json") for ref in job_refs(job)]
    if job.ip_adapter:
        from ..models.ip_adapter import hub_files

        wanted.extend(hub_files(job, family))
    return missing_from_cache(wanted)


def torch_bytes(dtype: torch.dtype) -> int:
    import torch

    return torch.finfo(dtype).bits // 8


def generate(
    job: JobSpec,
    options: RunOptions,
    *,
    events: EventSink = ignore,
    cancel: CancelToken | None = None,
    dry_run: bool = False,
    init_image: np.ndarray | None = None,
) -> dict[str, Any]:
    """The whole `generate` (or `upscale`) path for one job: plan, load, run, save. Returns the report."""
    seed = pick_seed(job)
    input_size = None if init_image is None else (init_image.shape[1], init_image.shape[0])
    prep, family = plan_for(job, options, seed=seed, input_size=input_size, random_seed=job.seed is None)
    summary = plan_summary(prep, family, options.device, options.dtype)
    if dry_run:
        return {"dry_run": True, "plan": summary}

    from ..base.errors import ModelLoadError
    from ..engine.memory import resolve_device, resolve_dtype
    from ..engine.pipeline import Engine
    from ..io.writes import clean_stale_temps, prepare_folder

    gaps = offline_gaps(job, family)
    if gaps:
        raise ModelLoadError("; ".join(gaps))
    for note in prep.notes:
        events(Note("warning" if any(word in note for word in WARNING_WORDS) else "info", note))
    for warning in summary["warnings"]:
        events(Note("warning", warning))
    prep.notes.extend(summary["warnings"])
    prepare_folder(options.out)
    clean_stale_temps(options.out)
    ensure_writable_target(prep, options.overwrite)
    device = resolve_device(options.device)
    dtype = resolve_dtype(options.dtype, device)
    events(
        Note(
            "info",
            f"seed {seed}; {plural(len(prep.plan.stages), 'stage')} to {prep.target.width}x{prep.target.height}"
            f" on {device} ({str(dtype).replace('torch.', '')})",
        )
    )
    engine = Engine.for_job(job, device, dtype, options.allow_pickle, events)
    prep = replan_for(engine, prep, options)
    sidecar = run_one(engine, prep, options, events=events, cancel=cancel, init_image=init_image)
    return {"path": str(prep.paths.image), "sidecar": str(prep.paths.sidecar), **sidecar}
