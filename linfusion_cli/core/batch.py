"""`linfusion batch`: a prompt file run as a queue a farm can trust.

Validated whole before any model loads; the model loaded once per model; seeds and names that never depend
on sharding or on what is already in the folder; resumable (finished jobs are skipped); failures reported
while the batch goes on; saving in a background worker while the next job generates.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..base.errors import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_PARTIAL,
    DiskFullError,
    InputImageError,
    JobFileError,
    LinFusionError,
    ModelLoadError,
    UsageError,
)
from ..base.events import CancelToken, EventSink, Note, ignore
from ..base.text import plural
from ..io.locks import Claim, try_claim
from ..io.names import parse_batch_stem
from ..io.output import SIDECAR_SUFFIX, OutputPaths
from ..io.writes import clean_stale_temps, prepare_folder
from .config import EngineSpec, JobSpec
from .jobs import read_job_file, resolve_job
from .runner import SCHEMA, Prepared, RunOptions, offline_gaps, pick_seed, plan_for, with_seed

JsonSink = Callable[[dict[str, Any]], None]
CLAIM_SUFFIX = ".claim"


@dataclass(frozen=True)
class Shard:
    index: int
    count: int
    source: str  # where it came from, for the log line

    def holds(self, job_index: int) -> bool:
        return job_index % self.count == self.index

    def describe(self) -> str:
        return f"shard {self.index}/{self.count} ({self.source})"


SLURM_VARS = ("ID", "MIN", "MAX", "STEP", "COUNT")


def resolve_shard(flag: str | None, env: Mapping[str, str] | None = None) -> Shard:
    """--shard K/N, else the Slurm array task's position, else torchrun's RANK/WORLD_SIZE, else the whole file."""
    env = os.environ if env is None else env
    if flag:
        try:
            k_text, n_text = flag.split("/")
            shard = Shard(int(k_text), int(n_text), "--shard")
        except ValueError:
            raise UsageError(f"--shard {flag[:40]!r}: expected K/N, for example 0/4") from None
    elif "SLURM_ARRAY_TASK_ID" in env:
        shard = slurm_shard(env)
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


def slurm_shard(env: Mapping[str, str]) -> Shard:
    """This task's position among the array's task ids, which are MIN, MIN+STEP, ... (COUNT of them, the last
    at most MAX). Task ids need not start at 0 or be contiguous (--array=0-10:2, --array=1,5,9); what cannot be
    placed (an uneven list such as 1,2,9, or a lone resubmitted task) is refused: say the shard with --shard."""
    values: dict[str, int] = {}
    for name in SLURM_VARS:
        text = env.get(f"SLURM_ARRAY_TASK_{name}")
        if text is not None:
            try:
                values[name] = int(text)
            except ValueError:
                raise UsageError(f"SLURM_ARRAY_TASK_{name}={text[:20]!r} is not a whole number") from None
    task = values["ID"]
    low, count, step_given = values.get("MIN", task), values.get("COUNT"), values.get("STEP")
    if "MAX" in values:
        high = values["MAX"]
        if count is None and step_given:  # Slurm before 15.08 sets no COUNT
            count = (high - low) // step_given + 1
    else:
        high = low + ((count or 1) - 1) * (step_given or 1)
    how = "set the shard yourself with --shard K/N (K = this task's position among the N tasks, from 0)"
    if count is None or count < 1 or not low <= task <= high:
        raise UsageError(f"the Slurm array variables are inconsistent ({_slurm_text(values)}); {how}")
    if count == 1:
        if task != 0:
            raise UsageError(
                f"Slurm array task {task} is the array's only task: a resubmitted task cannot know its shard. "
                f"To redo the shard of task {task} of the original array --array=0-{{N-1}}, run with "
                f"--shard {task}/N; to run the whole file, --shard 0/1"
            )
        return Shard(0, 1, f"Slurm array task {task}, the only one")
    # The step between ids: the given one when it explains MIN, MAX and COUNT; else (a comma list, for
    # which Slurm may report step 1) the one spacing COUNT ids evenly from MIN to MAX.
    steps = [step_given] if step_given and step_given > 0 else []
    if (high - low) % (count - 1) == 0 and (high - low) // (count - 1) > 0:
        steps.append((high - low) // (count - 1))
    for step in steps:
        last = low + (count - 1) * step
        if last <= high < last + step and (task - low) % step == 0:
            position = (task - low) // step
            return Shard(position, count, f"Slurm array task {task}, position {position} of ids {low}-{high}:{step}")
    raise UsageError(
        f"cannot place Slurm array task {task} among the array's ids ({_slurm_text(values)}): they are not "
        f"evenly spaced, so some shard would never run; {how}"
    )


def _slurm_text(values: Mapping[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in values.items())


@dataclass
class JobOutcome:
    index: int
    status: str  # "done" | "skipped" (finished before) | "claimed" (another live task has it) | "failed"
    path: str | None
    seed: int | None
    seconds: dict[str, float] = field(default_factory=dict)
    peak_vram_allocated_gib: float | None = None
    error: str | None = None

    def as_line(self) -> dict[str, Any]:
        line: dict[str, Any] = {
            "schema": SCHEMA,
            "index": self.index,
            "status": self.status,
            "path": self.path,
            "sidecar": None if self.path is None else self.path + SIDECAR_SUFFIX,
            "seed": self.seed,
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
            "peak_vram_allocated_gib": self.peak_vram_allocated_gib,
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
    """Every job of the file resolved, planned and named, and every input image's header read, before any
    model loads."""
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
            random_seed = job.seed is None and base_seed is None
            prep, family = plan_for(
                job, options, seed=seed, index=row.index, input_size=input_size, random_seed=random_seed
            )
        except UsageError as exc:
            message = str(exc)
            raise JobFileError(message if message.startswith(row.where) else f"{row.where}: {message}") from None
        # Two jobs asking for the same name: later ones get -2, -3... in file order, the same in every shard.
        stem = prep.paths.image.stem
        seen = stems.get(stem, 0)
        stems[stem] = seen + 1
        if seen:
            prep.paths = OutputPaths.for_stem(options.out, f"{stem}-{seen + 1}", job.format)
        gaps = offline_gaps(job, family)  # offline and not cached: said before any model loads
        if gaps:
            raise ModelLoadError(f"{row.where}: {'; '.join(gaps)}")
        prepared.append(prep)
    return prepared


def _input_size(job: JobSpec, options: RunOptions) -> tuple[int, int]:
    from ..io.images import open_image

    assert job.image is not None
    with open_image(job.image, options.max_input_pixels) as image:
        return image.width, image.height


# --- resume: a job is what it is (index and settings), whatever seed a previous run drew ----------------------


def _searches_by_key(prep: Prepared) -> bool:
    """A random-seed job without its own name: its file name holds a seed this run cannot know."""
    return prep.random_seed and prep.index is not None and not prep.job.name


def claim_name(prep: Prepared) -> str:
    """What a task locks while it makes this job: the output's name, or the job's identity where the name
    depends on a seed still to be found."""
    identity = f"{prep.index:05d}_{prep.key}" if _searches_by_key(prep) else prep.paths.image.name
    return f".{identity}{CLAIM_SUFFIX}"


def list_outputs(folder: Path) -> dict[tuple[int, str], list[str]]:
    """Unnamed batch outputs in `folder` by (index, key): one directory listing for the whole batch."""
    found: dict[tuple[int, str], list[str]] = {}
    with os.scandir(folder) as entries:
        for entry in entries:
            parsed = parse_batch_stem(Path(entry.name).stem)
            if parsed is not None:
                found.setdefault((parsed[0], parsed[2]), []).append(entry.name)
    return found


def resume_state(
    prep: Prepared, options: RunOptions, listing: Mapping[tuple[int, str], list[str]] | None = None
) -> tuple[OutputPaths | None, Prepared]:
    """(the finished outputs of this job or None, the job to run).

    A job is found by its own name; a random-seed job by its index and settings key, under any seed. An image
    left without its sidecar (a crash between the two renames) is not a second copy in waiting: the job is run
    again under that image's seed and name, and replaces it."""
    if prep.paths.complete(prep.key):
        return prep.paths, prep
    if not _searches_by_key(prep):
        return None, prep
    assert prep.index is not None
    folder, suffix = prep.paths.image.parent, prep.paths.image.suffix
    if listing is None:
        names = [p.name for p in folder.glob(f"{prep.index:05d}_*_{prep.key}{suffix}")]
    else:
        names = listing.get((prep.index, prep.key), [])
    orphan_seed = None
    for name in sorted(n for n in names if n.endswith(suffix)):
        image = folder / name
        candidate = OutputPaths(image, image.with_name(name + SIDECAR_SUFFIX))
        if candidate.complete(prep.key):
            return candidate, prep
        parsed = parse_batch_stem(image.stem)
        if orphan_seed is None and parsed is not None and parsed[2] == prep.key:
            orphan_seed = parsed[1]
    if orphan_seed is not None and orphan_seed != prep.seed:
        return None, with_seed(prep, orphan_seed, options)
    return None, prep


class Writer:
    """One background thread that encodes and writes images while the next job generates.

    At most one write waits in line: a 16K image is ~400 MB of pixels, so memory stays bounded. A write
    reports its job's outcome itself; an exception that escapes one (a bug, a broken output stream) is kept in
    `error`, stops the batch, and is raised by the caller: never swallowed, never blamed on another job.
    """

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="linfusion-writer")
        self._pending: list[Future[Any]] = []
        self.error: BaseException | None = None

    def _settle(self) -> None:
        for future in self._pending:
            error = future.exception()  # waits for it
            if error is not None and self.error is None:
                self.error = error
        self._pending.clear()

    def submit(self, fn: Callable[[], Any]) -> bool:
        """Queue a write once the previous one is done; False (nothing queued) after an escaped exception."""
        self._settle()
        if self.error is not None:
            return False
        self._pending.append(self._pool.submit(fn))
        return True

    def close(self) -> BaseException | None:
        """Wait for every pending write (also on Ctrl-C: nothing is left half-written); the first exception that
        escaped one, if any."""
        self._settle()
        self._pool.shutdown(wait=True)
        return self.error


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
    cancel = cancel or CancelToken()
    shard = resolve_shard(shard_flag)
    prepared = plan_batch(path, flags, options, base_seed)
    mine = [p for p in prepared if shard.holds(p.index or 0)]
    events(Note("info", f"{shard.describe()}: {len(mine)} of {plural(len(prepared), 'job')}"))
    summary = BatchSummary(shard, len(mine))
    prepare_folder(options.out)
    removed = clean_stale_temps(options.out)
    if removed:
        events(Note("info", f"removed {plural(removed, 'temp file')} left by a stopped run"))

    lock = threading.Lock()

    def record(outcome: JobOutcome) -> None:
        with lock:
            summary.outcomes.append(outcome)
            if on_line is not None:
                on_line(outcome.as_line())

    todo: list[Prepared] = []
    listing = list_outputs(options.out)
    for prep in mine:
        done, prep = (None, prep) if options.overwrite else resume_state(prep, options, listing)
        if done is not None:
            record(_skipped(prep.index or 0, done))
        else:
            todo.append(prep)
    if len(todo) < len(mine):
        events(
            Note("info", f"{plural(len(mine) - len(todo), 'job')} already finished: skipped (--overwrite redoes them)")
        )
    if todo:
        _render(todo, options, fail_fast, events, record, cancel)
    summary.outcomes.sort(key=lambda o: o.index)
    return summary


def _skipped(index: int, done: OutputPaths) -> JobOutcome:
    meta = done.sidecar_data() or {}
    seed = meta.get("seed")
    return JobOutcome(index, "skipped", str(done.image), seed if isinstance(seed, int) else None)


def _render(
    todo: list[Prepared],
    options: RunOptions,
    fail_fast: bool,
    events: EventSink,
    record: Callable[[JobOutcome], None],
    cancel: CancelToken,
) -> None:
    """Claim, run and save each job in turn; the model is loaded when the first job needs it."""
    import torch

    from ..engine.memory import device_warnings, free_cached, resolve_device, resolve_dtype
    from ..engine.pipeline import Engine
    from .runner import generate_one, replan_for

    device = resolve_device(options.device)
    dtype = resolve_dtype(options.dtype, device)
    for warning in device_warnings(device, dtype):
        events(Note("warning", warning))
    engines: dict[EngineSpec, Engine] = {}
    writer = Writer()
    disk_full: list[DiskFullError] = []
    warned_unlocked = False
    try:
        for prep in todo:
            cancel.check()
            if disk_full or writer.error is not None:
                break
            index = prep.index or 0
            claim = try_claim(options.out / claim_name(prep))
            if isinstance(claim, str):
                events(Note("info", f"job {index}: being made by {claim}; left to it"))
                record(JobOutcome(index, "claimed", None, None, error=f"being made by {claim}"))
                continue
            if not claim.locked and not warned_unlocked:
                warned_unlocked = True
                events(Note("warning", f"{options.out} offers no file locks: tasks sharing it may repeat a job"))
            handed_over = False
            start = time.perf_counter()
            try:
                done, prep = (None, prep) if options.overwrite else resume_state(prep, options)
                if done is not None:  # finished by another task since this one looked
                    record(_skipped(index, done))
                    continue
                problem = prep.paths.problem()
                if problem:
                    raise _JobProblem(problem)
                job = prep.job
                spec = EngineSpec.of(job)
                if spec.base() not in engines:
                    for old in list(engines):  # one model on the device at a time
                        del engines[old]
                    free_cached(device)
                    engines[spec.base()] = Engine.for_job(job, device, dtype, options.allow_pickle, events)
                engine = engines[spec.base()]
                engine.use(spec, events)  # the job's adapters, on the loaded model
                prep = replan_for(engine, prep, options)
                events(Note("info", f"job {index}: {job.prompt[:60]!r} -> {prep.paths.image.name}"))
                init_image = _load_input(job, options) if job.image else None
                result, meta = generate_one(engine, prep, options, events=events, cancel=cancel, init_image=init_image)
                peak = None
                if device.type == "cuda":
                    peak = max((s.usage.get("peak_vram_allocated_gib") or 0 for s in result.stages), default=None)
                seconds = time.perf_counter() - start
                handed_over = writer.submit(_writer_job(prep, result, meta, seconds, peak, claim, record, disk_full))
                del result, init_image
            except (LinFusionError, OSError, torch.OutOfMemoryError, _JobProblem) as exc:
                if isinstance(exc, LinFusionError) and getattr(exc, "exit_code", 1) >= 128:
                    raise
                if isinstance(exc, UsageError) and not isinstance(exc, InputImageError):
                    raise
                events(Note("warning", f"job {index} failed: {exc}"))
                record(
                    JobOutcome(index, "failed", None, prep.seed, {"total": time.perf_counter() - start}, None, str(exc))
                )
                if fail_fast:
                    break
            finally:
                if not handed_over:
                    claim.release()
            free_cached(device)  # VRAM and RSS must not creep over a long batch
    finally:
        unexpected = writer.close()
    if unexpected is not None:
        raise unexpected
    if disk_full:
        raise DiskFullError(f"{disk_full[0]}; stopped: free some space and rerun the same command to resume")


class _JobProblem(Exception):
    """Something about one job's output names that fails that job alone."""


def _writer_job(
    prep: Prepared,
    result: Any,
    meta: dict[str, Any],
    seconds: float,
    peak: float | None,
    claim: Claim,
    record: Callable[[JobOutcome], None],
    disk_full: list[DiskFullError],
) -> Callable[[], None]:
    """The background write of one job: save, release its claim, then record exactly one outcome."""
    from .runner import save_outputs

    def write() -> None:
        index = prep.index or 0
        try:
            sidecar = save_outputs(prep, result.image, meta, result.stage_images)
        except (LinFusionError, OSError) as exc:  # a failed write fails this job, not the batch
            if isinstance(exc, DiskFullError):
                disk_full.append(exc)
            outcome = JobOutcome(index, "failed", None, prep.seed, {"total": seconds}, peak, f"could not save: {exc}")
        else:
            timings = {**sidecar.get("seconds", {}), "total": seconds + sidecar["seconds"].get("write", 0.0)}
            outcome = JobOutcome(index, "done", str(prep.paths.image), prep.seed, timings, peak)
        finally:
            claim.release()
        record(outcome)

    return write


def _load_input(job: JobSpec, options: RunOptions) -> Any:
    from ..io.images import load_rgb

    assert job.image is not None
    return load_rgb(job.image, options.max_input_pixels)
