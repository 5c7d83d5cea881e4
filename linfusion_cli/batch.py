"""`linfusion batch`: a prompt file run as a queue a farm can trust.

Validated whole before any model loads; the model loaded once per model; seeds and names that never depend
on sharding or on what is already in the folder; resumable (finished jobs are skipped); failures reported
while the batch goes on; saving in a background worker while the next job generates.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .config import EngineSpec, JobSpec, plural
from .errors import EXIT_FAILURE, EXIT_OK, EXIT_PARTIAL, JobFileError, LinFusionError, ModelLoadError, UsageError
from .events import CancelToken, EventSink, Note, ignore
from .jobs import read_job_file, resolve_job
from .output import OutputPaths, clean_stale_temps, prepare_folder
from .runner import Prepared, RunOptions, offline_gaps, pick_seed, plan_for

JsonSink = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class Shard:
    index: int
    count: int
    source: str  # where it came from, for the log line

    def holds(self, job_index: int) -> bool:
        return job_index % self.count == self.index

    def describe(self) -> str:
        return f"shard {self.index}/{self.count} ({self.source})"


def resolve_shard(flag: str | None, env: dict[str, str] | None = None) -> Shard:
    """--shard K/N, else Slurm array variables, else torchrun's RANK/WORLD_SIZE, else the whole file."""
    env = dict(os.environ) if env is None else env
    if flag:
        try:
            k_text, n_text = flag.split("/")
            shard = Shard(int(k_text), int(n_text), "--shard")
        except ValueError:
            raise UsageError(f"--shard {flag!r}: expected K/N, for example 0/4") from None
    elif "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
        try:
            task, count = int(env["SLURM_ARRAY_TASK_ID"]), int(env["SLURM_ARRAY_TASK_COUNT"])
            first = int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
        except ValueError:
            raise UsageError("SLURM_ARRAY_TASK_ID/COUNT/MIN are not whole numbers") from None
        shard = Shard(task - first, count, f"Slurm array task {task} of {count}, first {first}")
    elif "RANK" in env and "WORLD_SIZE" in env:
        try:
            shard = Shard(int(env["RANK"]), int(env["WORLD_SIZE"]), "torchrun RANK/WORLD_SIZE")
        except ValueError:
            raise UsageError("RANK/WORLD_SIZE are not whole numbers") from None
    else:
        return Shard(0, 1, "whole file")
    if shard.count < 1 or not 0 <= shard.index < shard.count:
        raise UsageError(f"{shard.source}: shard {shard.index}/{shard.count} is impossible (need 0 <= K < N)")
    return shard


def local_rank_device(device: str, env: dict[str, str] | None = None) -> str:
    """Under torchrun, `--device auto` means this process's GPU: cuda:LOCAL_RANK."""
    env = dict(os.environ) if env is None else env
    if device == "auto" and "LOCAL_RANK" in env:
        import torch

        if torch.cuda.is_available():
            return f"cuda:{int(env['LOCAL_RANK'])}"
    return device


@dataclass
class JobOutcome:
    index: int
    status: str  # "done" | "skipped" | "failed"
    path: str | None
    seed: int | None
    seconds: float = 0.0
    peak_vram_gib: float | None = None
    error: str | None = None

    def as_line(self) -> dict[str, Any]:
        line = {
            "index": self.index,
            "status": self.status,
            "path": self.path,
            "seed": self.seed,
            "seconds": round(self.seconds, 3),
            "peak_vram_gib": self.peak_vram_gib,
        }
        if self.error:
            line["error"] = self.error
        return line


@dataclass
class BatchSummary:
    shard: Shard
    total_jobs: int
    outcomes: list[JobOutcome] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(1 for o in self.outcomes if o.status == status)

    @property
    def exit_code(self) -> int:
        failed, done = self.count("failed"), self.count("done")
        if not failed:
            return EXIT_OK
        return EXIT_PARTIAL if (done or self.count("skipped")) else EXIT_FAILURE


def plan_batch(path: Path, flags: dict[str, Any], options: RunOptions, base_seed: int | None) -> list[Prepared]:
    """Every job of the file resolved, planned and named, before any model loads."""
    job_file = read_job_file(path)
    prepared: list[Prepared] = []
    stems: dict[str, int] = {}
    for row in job_file.rows:
        try:
            job = resolve_job(
                flags,
                file_defaults=job_file.defaults,
                row=row.values,
                row_label=row.where,
                defaults_label=f"{path.name} defaults",
            )
            seed = pick_seed(job, row.index, base_seed)
            input_size = _input_size(job, options) if job.image else None
            prep, family = plan_for(job, options, seed=seed, index=row.index, input_size=input_size)
        except UsageError as exc:
            message = str(exc)
            raise JobFileError(message if message.startswith(row.where) else f"{row.where}: {message}") from None
        # Two jobs asking for the same name: later ones get -2, -3... in file order, the same in every shard.
        stem = prep.paths.image.stem
        seen = stems.get(stem, 0)
        stems[stem] = seen + 1
        if seen:
            prep.paths = OutputPaths.for_stem(options.out, f"{stem}-{seen + 1}", job.format)
        prep.random_seed = job.seed is None and base_seed is None
        gaps = offline_gaps(job, family)  # offline and not cached: said before any model loads
        if gaps:
            raise ModelLoadError(f"{row.where}: {'; '.join(gaps)}")
        prepared.append(prep)
    return prepared


def _input_size(job: JobSpec, options: RunOptions) -> tuple[int, int]:
    from .images import open_image

    assert job.image is not None
    with open_image(job.image, options.max_input_pixels) as image:
        return image.width, image.height


def already_done(prep: Prepared) -> OutputPaths | None:
    """The finished outputs of this job, if a previous run wrote them completely."""
    if prep.paths.complete():
        return prep.paths
    if prep.random_seed and prep.index is not None and not prep.job.name:
        # A random seed differs on every run and is part of the name: find this job by index, size, prompt.
        folder = prep.paths.image.parent
        for sidecar in sorted(folder.glob(f"{prep.index:05d}_*_{prep.target.width}x{prep.target.height}.json")):
            candidate = OutputPaths.for_stem(folder, sidecar.stem, prep.job.format)
            if candidate.complete() and _sidecar_prompt(candidate) == prep.job.prompt:
                return candidate
    return None


class Writer:
    """One background thread that encodes and writes images while the next job generates.

    At most one write waits in line: a 16K image is ~400 MB of pixels, so memory stays bounded.
    """

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="linfusion-writer")
        self._pending: list[Future[Any]] = []

    def submit(self, fn: Callable[[], Any]) -> Future[Any]:
        while len(self._pending) >= 1:
            self._pending.pop(0).result()
        future = self._pool.submit(fn)
        self._pending.append(future)
        return future

    def close(self) -> None:
        """Wait for every pending write (also on Ctrl-C: nothing is left half-written)."""
        for future in self._pending:
            try:
                future.result()
            except Exception:
                pass  # reported through the job's own outcome
        self._pool.shutdown(wait=True)


def run_batch(
    path: Path,
    flags: dict[str, Any],
    options: RunOptions,
    *,
    base_seed: int | None = None,
    shard_flag: str | None = None,
    fail_fast: bool = False,
    events: EventSink = ignore,
    on_line: JsonSink | None = None,
    cancel: CancelToken | None = None,
) -> BatchSummary:
    import torch

    from .memory import free_cached, resolve_device, resolve_dtype
    from .pipeline import Engine
    from .runner import generate_one, replan_for, save_outputs

    cancel = cancel or CancelToken()
    shard = resolve_shard(shard_flag)
    options = replace(options, device=local_rank_device(options.device))
    prepared = plan_batch(path, flags, options, base_seed)
    mine = [p for p in prepared if shard.holds(p.index or 0)]
    events(Note("info", f"{shard.describe()}: {len(mine)} of {plural(len(prepared), 'job')}"))
    summary = BatchSummary(shard, len(mine))
    prepare_folder(options.out)
    clean_stale_temps(options.out)

    lock = threading.Lock()

    def record(outcome: JobOutcome) -> None:
        with lock:
            summary.outcomes.append(outcome)
            if on_line is not None:
                on_line(outcome.as_line())

    todo: list[Prepared] = []
    for prep in mine:
        done = None if options.overwrite else already_done(prep)
        if done is not None:
            record(JobOutcome(prep.index or 0, "skipped", str(done.image), _sidecar_seed(done)))
        else:
            todo.append(prep)
    if len(todo) < len(mine):
        events(
            Note("info", f"{plural(len(mine) - len(todo), 'job')} already finished: skipped (--overwrite redoes them)")
        )

    device = resolve_device(options.device)
    dtype = resolve_dtype(options.dtype, device)
    engines: dict[EngineSpec, Engine] = {}
    writer = Writer()
    try:
        for prep in todo:
            cancel.check()
            job = prep.job
            spec = EngineSpec.of(job)
            start = time.perf_counter()
            try:
                if spec.base() not in engines:
                    for old in list(engines):  # one model on the device at a time
                        del engines[old]
                    free_cached(device)
                    engines[spec.base()] = Engine.for_job(job, device, dtype, options.allow_pickle, events)
                engine = engines[spec.base()]
                engine.use(spec, events)  # the job's adapters, on the loaded model
                prep = replan_for(engine, prep, options)
                events(Note("info", f"job {prep.index}: {job.prompt[:60]!r} -> {prep.paths.image.name}"))
                init_image = _load_input(job, options) if job.image else None
                result, meta = generate_one(engine, prep, options, events=events, cancel=cancel, init_image=init_image)
                peak = max((s.usage.get("peak_vram_allocated_gib") or 0 for s in result.stages), default=None)
                peak = peak if device.type == "cuda" else None
                seconds = time.perf_counter() - start

                def write(
                    prep: Prepared = prep,
                    result: Any = result,
                    meta: dict[str, Any] = meta,
                    seconds: float = seconds,
                    peak: float | None = peak,
                ) -> None:
                    try:
                        save_outputs(prep, result.image, meta, result.stage_images)
                        record(JobOutcome(prep.index or 0, "done", str(prep.paths.image), prep.seed, seconds, peak))
                    except Exception as exc:  # a failed write fails this job, not the batch
                        record(
                            JobOutcome(
                                prep.index or 0, "failed", None, prep.seed, seconds, peak, f"could not save: {exc}"
                            )
                        )

                writer.submit(write)
                del result, init_image
            except (LinFusionError, OSError, torch.OutOfMemoryError) as exc:
                if isinstance(exc, UsageError) or getattr(exc, "exit_code", 1) >= 128:
                    raise
                events(Note("warning", f"job {prep.index} failed: {exc}"))
                record(
                    JobOutcome(prep.index or 0, "failed", None, prep.seed, time.perf_counter() - start, None, str(exc))
                )
                if fail_fast:
                    break
            free_cached(device)  # VRAM and RSS must not creep over a long batch
    finally:
        writer.close()
    summary.outcomes.sort(key=lambda o: o.index)
    return summary


def _load_input(job: JobSpec, options: RunOptions) -> Any:
    from .images import load_rgb

    assert job.image is not None
    return load_rgb(job.image, options.max_input_pixels)


def _sidecar(paths: OutputPaths) -> dict[str, Any]:
    try:
        data = json.loads(paths.sidecar.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _sidecar_seed(paths: OutputPaths) -> int | None:
    seed = _sidecar(paths).get("seed")
    return seed if isinstance(seed, int) else None


def _sidecar_prompt(paths: OutputPaths) -> str | None:
    settings = _sidecar(paths).get("settings")
    return settings.get("prompt") if isinstance(settings, dict) else None
