"""One job from its plan to files on disk: the engine it needs, the generation, its metadata, the atomic save.

Shared by `generate`, `upscale`, `replay` and batches (through api.py and batch.py); the CLI only parses and
renders. Imports torch (through the engine): the CLI imports this when a command runs, not at start-up.
"""

from __future__ import annotations

import json
import platform
import time
from typing import Any

import diffusers
import numpy as np
import torch
import transformers

from .. import __version__
from ..base.events import CancelToken, EventSink, Note, Working, ignore
from ..base.job import Job
from ..base.plan import StagePlan
from ..base.precision import dtype_flag
from ..base.schema import SCHEMA
from ..base.text import plural
from ..engine.memory import device_budget, placed
from ..engine.memory_plan import MemoryPlanner
from ..engine.parallel import Comm
from ..engine.pipeline import Engine
from ..engine.stages import PlanOutput
from ..io.hashing import model_hash
from ..io.metadata import encode_image
from ..io.pngfast import RowSource
from ..io.writes import atomic_file, clean_stale_temps, prepare_folder, write_bytes_atomic
from ..models.adapters import engine_spec
from ..models.devices import free_cached
from ..models.hub import model_source
from .jobspec import JobSpec
from .metadata import a1111_parameters
from .plan_report import check_offline, memory_planner, placement, plan_warnings
from .preflight import ensure_writable_target
from .prepare import Prepared, RunOptions, pick_seed, plan_for, replan_for
from .result import Result


class EngineCache:
    """One loaded model on the device at a time, reused while jobs ask for it; each job's adapters are switched
    on it without reloading (a batch, or a Python program calling `LinFusionPipeline.generate` again and again)."""

    def __init__(self, device: torch.device, dtype: torch.dtype, allow_pickle: bool = False) -> None:
        self.device = device
        self.dtype = dtype
        self.allow_pickle = allow_pickle
        self.engine: Engine | None = None

    def engine_for(self, job: Job, events: EventSink = ignore) -> Engine:
        spec = engine_spec(job)
        if self.engine is None or not self.engine.can_serve(spec):
            self.close()
            self.engine = Engine.for_job(job, self.device, self.dtype, self.allow_pickle, events)
        self.engine.use(spec, events)  # the job's adapters, on the loaded model
        return self.engine

    def close(self) -> None:
        if self.engine is not None:
            if model_source(self.engine.spec.model) == "memory":  # the caller's own model: give it back as it was
                self.engine.release()
            self.engine = None
            free_cached(self.device)


def versions() -> dict[str, str]:
    return {
        "linfusion": __version__,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"{device} ({platform.processor() or platform.machine()})"


def build_metadata(prep: Prepared, engine: Engine, result: PlanOutput) -> dict[str, Any]:
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
        "device": describe_device(engine.device),
        "dtype": dtype_flag(engine.dtype),
        "dtypes": engine.comps.dtypes(),
        "versions": versions(),
        "warnings": [note.message for note in prep.notes] + list(result.warnings),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **({"parallel": result.parallel} if result.parallel else {}),
    }


def _save_stage(prep: Prepared, stage: StagePlan, pixels: np.ndarray, meta: dict[str, Any]) -> str:
    """A stage's image (`--save-stages`), numbered as the log and the tables number stages (`X.stage1.png` is
    "stage 1/3"); its metadata says its own size and which stage it is, the job's settings beside them."""
    number = stage.index + 1
    path = prep.paths.image.with_name(f"{prep.paths.image.stem}.stage{number}{prep.paths.image.suffix}")
    own = {
        **meta,
        "width": stage.width,
        "height": stage.height,
        "stage": {"number": number, "of": len(prep.plan.stages)},
    }
    with atomic_file(path) as handle:
        encode_image(pixels, prep.job.format, a1111_parameters(own), json.dumps(own, sort_keys=True), handle=handle)
    return path.name


def save_outputs(
    prep: Prepared,
    image: np.ndarray | RowSource,
    meta: dict[str, Any],
    stage_images: list[tuple[StagePlan, np.ndarray]] | None = None,
) -> dict[str, Any]:
    """Write the image (atomically, with metadata), stage images if any, then the sidecar, last. A split image's
    rows (RowSource) go into the file as they come."""
    paths = prep.paths
    parameters = a1111_parameters(meta)
    start = time.perf_counter()
    with atomic_file(paths.image) as handle:
        encode_image(image, prep.job.format, parameters, json.dumps(meta, sort_keys=True), handle=handle)
    stage_files = []
    for stage, pixels in stage_images or []:
        stage_files.append(_save_stage(prep, stage, pixels, meta))
    sidecar = dict(meta)
    sidecar["seconds"] = {**meta.get("seconds", {}), "write": round(time.perf_counter() - start, 3)}
    sidecar["file"] = {"name": paths.image.name, "bytes": paths.image.stat().st_size, "format": prep.job.format}
    sidecar["stage_files"] = stage_files
    sidecar["complete"] = True
    write_bytes_atomic(paths.sidecar, (json.dumps(sidecar, indent=2, sort_keys=True) + "\n").encode())
    return sidecar


def job_planner(prep: Prepared, engine: Engine) -> MemoryPlanner:
    """The job's memory planner (made before loading) with what the loaded engine measures: its weights, its
    adapters' activations, and the memory free now."""
    planner = memory_planner(prep, placed(engine.device, engine.dtype))
    return planner.measured(
        engine.weight_bytes(), engine.control_channels(), device_budget(engine.device, prep.job.max_vram)
    )


def run_prepared(
    engine: Engine,
    prep: Prepared,
    options: RunOptions,
    *,
    events: EventSink = ignore,
    cancel: CancelToken | None = None,
    init_image: np.ndarray | None = None,
    group: Comm | None = None,
) -> tuple[PlanOutput, dict[str, Any]]:
    """Generate one prepared job (nothing written yet): the result and its metadata."""
    result = engine.run_plan(
        prep.job,
        prep.plan,
        prep.seed,
        planner=job_planner(prep, engine),
        events=events,
        cancel=cancel,
        init_image=init_image,
        keep_stages=options.save_stages,
        group=group,
    )
    return result, build_metadata(prep, engine, result)


def run_job(
    job: JobSpec,
    options: RunOptions,
    *,
    events: EventSink = ignore,
    cancel: CancelToken | None = None,
    save: bool = True,
    init_image: np.ndarray | None = None,
    engines: EngineCache | None = None,
    group: Comm | None = None,
) -> Result:
    """The whole `generate` (or `upscale`) path for one job: plan, load (or reuse `engines`' model), run, save
    (with `save` False, the files are written only when the result's `save()` is called; a dry run stops before
    all this: preflight.dry_run).

    With `group` (processes all running this same call) the image is split between them: they agree on the
    seed, plan per band, and the first process alone writes the files (the others' reports carry no path)."""
    group = group or Comm()
    seed = group.agree(pick_seed(job), "seed")
    input_size = None if init_image is None else (init_image.shape[1], init_image.shape[0])
    prep = plan_for(job, options, seed=seed, input_size=input_size, random_seed=job.seed is None)
    engines = engines or EngineCache(*placement(options), options.allow_pickle)
    device, dtype, world = engines.device, engines.dtype, group.world
    check_offline(job, prep.family)
    warnings = plan_warnings(prep, placed(device, dtype), world)
    prep.notes.extend(Note("warning", warning) for warning in warnings)
    for note in prep.notes:
        events(note)
    if save:
        _claim_target(prep, options, group)
        if group.agree(int(not options.overwrite and prep.paths.complete(prep.key)), "skip"):
            return made_before(prep, events)
    what = f"{plural(len(prep.plan.stages), 'stage')} to {prep.target.width}x{prep.target.height}"
    where = f"{device} ({str(dtype).replace('torch.', '')})"
    split = f", split over {plural(world, 'process', 'processes')}" if world > 1 else ""
    events(Note("info", f"seed {seed}; {what} with {job.scheduler} on {where}{split}"))
    engine = engines.engine_for(job, events)
    prep = replan_for(engine.comps.native_size, prep, options)
    result, meta = run_prepared(engine, prep, options, events=events, cancel=cancel, init_image=init_image, group=group)
    return _deliver(result, meta, prep, options, group, events, save)


def _deliver(
    result: PlanOutput,
    meta: dict[str, Any],
    prep: Prepared,
    options: RunOptions,
    group: Comm,
    events: EventSink,
    save: bool,
) -> Result:
    """A run's image to its files (now, or by the result's save() with `save` False) and to the caller."""
    rows = result.rows if save else None  # a split image written now: its rows go into the file as they come
    image = None if rows is not None else result.whole_image()
    if not group.writes:  # another process of a split image: the first one writes
        if rows is not None:
            rows.deliver()
        return Result([{"parallel": meta.get("parallel"), "seed": prep.seed}], [], [None])

    def write() -> dict[str, Any]:
        if not save:  # kept in memory so far: the folder and the name are checked now
            _claim_target(prep, options, group)
        events(Working(f"writing {prep.paths.image}"))
        if rows is None:
            assert image is not None  # the first process of a split image, or the only one
            sidecar = save_outputs(prep, image, meta, result.stage_images)
        else:
            with rows.taking():
                sidecar = save_outputs(prep, rows, meta, result.stage_images)
        return {"path": str(prep.paths.image), "sidecar": str(prep.paths.sidecar), **sidecar}

    if save:  # a split image's rows were never whole here: no array (read the file)
        return Result([write()], [] if image is None else [image], [None])
    return Result([meta], [image] if image is not None else [], [write])


def made_before(prep: Prepared, events: EventSink) -> Result:
    """The job's image exists, finished, with these settings and seed: nothing to make, as a batch skips it. The
    report is its sidecar's, marked `skipped`."""
    events(Note("info", f"{prep.paths.image} exists, made before with these settings: skipped (--overwrite redoes it)"))
    sidecar = prep.paths.sidecar_data() or {}
    paths = {"path": str(prep.paths.image), "sidecar": str(prep.paths.found_sidecar() or prep.paths.sidecar)}
    return Result([{**sidecar, **paths, "skipped": True}], [], [None])


def _claim_target(prep: Prepared, options: RunOptions, group: Comm) -> None:
    """The output folder made (its stale temp files cleaned by the first process) and the image's name free."""
    prepare_folder(options.out)
    if group.writes:
        clean_stale_temps(options.out)
    ensure_writable_target(prep, options.overwrite)
