"""`linfusion batch`: a prompt file run as a queue a farm can trust.

Validated whole before any model loads (batch_plan.py); the model loaded once per model; seeds and names that
never depend on sharding or on what is already in the folder; resumable (finished jobs are skipped); failures
reported while the batch goes on; saving in a background worker while the next job generates. Every job of the
task gets one outcome (a JSON line with --json), also those a stop (a full disk) left unstarted; a closed stdout
(`| head -1`) stops the batch after the job being made is saved.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..base.errors import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_PARTIAL,
    EXIT_SIGINT,
    DiskFullError,
    InputImageError,
    Interrupted,
    LinFusionError,
    OutputClosedError,
    UsageError,
)
from ..base.events import CancelToken, EventSink, Note, ignore
from ..base.schema import SCHEMA
from ..base.text import plural
from ..engine.memory import device_warnings
from ..engine.parallel import Comm
from ..engine.splitting import INTERRUPTS
from ..engine.stages import PlanOutput
from ..io.images import load_rgb
from ..io.locks import Claim, try_claim
from ..io.output import SIDECAR_SUFFIX, OutputPaths
from ..io.writes import clean_stale_temps, prepare_folder
from ..models.devices import free_cached
from .batch_plan import BatchPlan
from .jobspec import JobSpec
from .plan_report import placement
from .prepare import Prepared, RunOptions, replan_for
from .resume import claim_name, list_outputs, resume_state
from .run import EngineCache, run_prepared, save_outputs
from .shards import Shard

JsonSink = Callable[[dict[str, Any]], None]


@dataclass
class JobOutcome:
    index: int
    # "done" | "skipped" (finished before) | "claimed" (another live task has it) | "failed" | "stopped" (not
    # started: the batch stopped before it, on a full disk)
    status: str
    path: str | None
    seed: int | None
    seconds: dict[str, float] = field(default_factory=dict)
    peak_vram_allocated_gib: float | None = None
    error: str | None = None
    prompt: str | None = None  # a job with no image (failed, stopped): what it was, for a log or a contact sheet

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
        if self.prompt is not None:
            line["prompt"] = self.prompt
        return line


@dataclass
class BatchSummary:
    shard: Shard
    total_jobs: int
    outcomes: list[JobOutcome] = field(default_factory=list)
    out: Path | None = None  # the output folder
    stopped: str | None = None  # why the batch stopped before its end (a full disk, Ctrl-C), if it did
    interrupted: int | None = None  # the exit code of the signal that stopped it (130: SIGINT, 143: SIGTERM)

    def count(self, status: str) -> int:
        return sum(1 for o in self.outcomes if o.status == status)

    @property
    def exit_code(self) -> int:
        failed, done = self.count("failed"), self.count("done")
        if self.interrupted is not None:
            return self.interrupted
        if self.stopped:
            return EXIT_FAILURE
        if not failed:
            return EXIT_OK
        return EXIT_PARTIAL if (done or self.count("skipped")) else EXIT_FAILURE


class _Outcomes:
    """Each job's one outcome, kept and printed as a JSON line as it comes (from this thread or the writer's). A
    stdout closed under us is noticed, not raised in the writer: the batch stops after the job being made."""

    def __init__(self, summary: BatchSummary, on_line: JsonSink | None) -> None:
        self.summary = summary
        self.on_line = on_line
        self.closed: OutputClosedError | None = None
        self._lock = threading.Lock()

    def __call__(self, outcome: JobOutcome) -> None:
        with self._lock:
            self.summary.outcomes.append(outcome)
            if self.on_line is None or self.closed is not None:
                return
            try:
                self.on_line(outcome.as_line())
            except OutputClosedError as exc:
                self.closed = exc

    def check_open(self) -> None:
        """Raise if stdout closed: every job started is saved by now; the message says up to where."""
        if self.closed is None:
            return
        saved = [o.index for o in self.summary.outcomes if o.status == "done"]
        last = f"after saving job {max(saved)}" if saved else "before any job was saved"
        raise OutputClosedError(f"{self.closed}: stopped {last}; rerun the same command to resume")


# --- resume: a job is what it is (index and settings), whatever seed a previous run drew ----------------------


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
    plan: BatchPlan,
    options: RunOptions,
    *,
    fail_fast: bool = False,
    events: EventSink = ignore,
    on_line: JsonSink | None = None,
    cancel: CancelToken | None = None,
    engines: EngineCache | None = None,
    group: Comm | None = None,
) -> BatchSummary:
    """Every job of a checked prompt file this task holds (`plan`: batch_plan.plan_batch, for its shard),
    resumable; with a `group` of processes (a split image), every process of the group makes each job together
    (the plan then holds every job: batch_plan.EVERY_JOB)."""
    cancel = cancel or CancelToken()
    group = group or Comm()
    shard = plan.shard
    events(Note("info", f"{shard.describe()}: {len(plan.jobs)} of {plural(plan.total, 'job')}"))
    summary = BatchSummary(shard, len(plan.jobs), out=options.out)
    prepare_folder(options.out)
    removed = clean_stale_temps(options.out) if group.writes else 0
    if removed:
        events(Note("info", f"removed {plural(removed, 'temp file')} left by a stopped run"))
    record = _Outcomes(summary, on_line)
    todo = _to_make(plan.jobs, plan.unavailable, options, events, record)
    if todo:
        try:
            summary.stopped = _render(todo, options, fail_fast, events, record, cancel, group, engines)
        except Interrupted as exc:  # finished jobs are kept and found again: a rerun resumes
            summary.stopped = str(Interrupted(exc.signal_name, exc.exit_code, resumable=True))
            summary.interrupted = exc.exit_code
    if summary.stopped:  # every job of the task gets its line, also those never started
        events(Note("error", summary.stopped))
        reached = {o.index for o in summary.outcomes}
        for prep in todo:
            if (prep.index or 0) not in reached:
                record(
                    JobOutcome(
                        prep.index or 0,
                        "stopped",
                        None,
                        None,
                        error=f"not started: {summary.stopped}",
                        prompt=prep.job.prompt,
                    )
                )
    summary.outcomes.sort(key=lambda o: o.index)
    record.check_open()
    return summary


def _to_make(
    jobs: list[Prepared],
    unavailable: dict[int, str],
    options: RunOptions,
    events: EventSink,
    record: Callable[[JobOutcome], None],
) -> list[Prepared]:
    """The jobs still to make: those finished before are recorded as skipped (found in one listing of the folder),
    those whose weights cannot be had here as failed; a damaged output is said before it is made again."""
    todo: list[Prepared] = []
    listing = list_outputs(options.out)
    for prep in jobs:
        index = prep.index or 0
        if index in unavailable:
            events(Note("warning", f"job {index} failed: {unavailable[index]}"))
            record(JobOutcome(index, "failed", None, prep.seed, error=unavailable[index], prompt=prep.job.prompt))
            continue
        done, prep = (None, prep) if options.overwrite else resume_state(prep, options, listing)
        if done is not None:
            record(_skipped(index, done))
            continue
        sidecar = prep.paths.found_sidecar()
        if sidecar is not None and not options.overwrite:  # at 16K a silent redo costs an hour of GPU
            problem = prep.paths.unfinished(prep.key)
            events(Note("warning", f"job {index}: sidecar {sidecar.name} unusable ({problem}): redoing job {index}"))
        todo.append(prep)
    if len(todo) + len(unavailable) < len(jobs):
        skipped = len(jobs) - len(todo) - len(unavailable)
        events(Note("info", f"{plural(skipped, 'job')} already finished: skipped (--overwrite redoes them)"))
    return todo


def _skipped(index: int, done: OutputPaths) -> JobOutcome:
    meta = done.sidecar_data() or {}
    seed = meta.get("seed")
    return JobOutcome(index, "skipped", str(done.image), seed if isinstance(seed, int) else None)


def _render(
    todo: list[Prepared],
    options: RunOptions,
    fail_fast: bool,
    events: EventSink,
    record: _Outcomes,
    cancel: CancelToken,
    group: Comm,
    engines: EngineCache | None = None,
) -> str | None:
    """Claim, run and save each job in turn; the model is loaded when the first job needs it (or reused from
    `engines`, a Python caller's). With a group of several, every process of the group makes each job's image together: the
    first decides (claims, resume) and writes, the others follow; a failed job stops the batch, since the
    processes must run the same exchanges. Returns why the batch stopped early (a full disk), or None."""
    own = engines is None
    engines = engines or EngineCache(*placement(options), options.allow_pickle)
    device = engines.device
    for warning in device_warnings(device, engines.dtype):
        events(Note("warning", warning))
    writer = Writer()
    disk_full: list[DiskFullError] = []
    warned_unlocked = False
    try:
        for prep in todo:
            stopped = bool(disk_full) or writer.error is not None or record.closed is not None
            code = group.agree(_stop_code(cancel, stopped))
            if code >= EXIT_SIGINT:  # asked to stop (on the first process, for a group): here, between jobs
                raise Interrupted(INTERRUPTS.get(code, "a signal"), code)
            if code:
                break
            index = prep.index or 0
            path = options.out / claim_name(prep)
            claim: Claim | str = try_claim(path) if group.writes else Claim(path, -1, True)  # the first claims
            if not group.agree(isinstance(claim, Claim)):
                if isinstance(claim, str):
                    events(Note("info", f"job {index}: being made by {claim}; left to it"))
                    record(JobOutcome(index, "claimed", None, None, error=f"being made by {claim}"))
                continue
            assert isinstance(claim, Claim)
            if not claim.locked and not warned_unlocked:
                warned_unlocked = True
                events(Note("warning", f"{options.out} offers no file locks: tasks sharing it may repeat a job"))
            task = _Task(prep, claim, time.perf_counter(), engines, options, events, cancel, record, disk_full, group)
            if not task.run(writer) and fail_fast:
                break
            free_cached(device)  # the device cache must not creep over a long batch
    finally:
        unexpected = writer.close()
        if own:
            engines.close()
    if unexpected is not None:
        raise unexpected
    if disk_full:
        return f"{disk_full[0]}; stopped: free some space and rerun the same command to resume"
    return None


@dataclass
class _Task:
    """One claimed job of a batch: generated here, saved by the writer, reported exactly once."""

    prep: Prepared
    claim: Claim
    start: float
    engines: EngineCache
    options: RunOptions
    events: EventSink
    cancel: CancelToken
    record: Callable[[JobOutcome], None]
    disk_full: list[DiskFullError]
    group: Comm

    def run(self, writer: Writer) -> bool:
        """Generate and hand the job to the writer; False when it failed (reported)."""
        prep, index, handed_over = self.prep, self.prep.index or 0, False
        group = self.group
        try:
            done = None
            if group.writes and not self.options.overwrite:
                done, prep = resume_state(prep, self.options)
            if group.agree(done is not None):  # finished by another task since this one looked
                if done is not None:
                    self.record(_skipped(index, done))
                return True
            problem = prep.paths.problem() if group.writes else None
            if problem:
                raise _JobProblem(problem)
            prep = replace(prep, seed=group.agree(prep.seed, "seed"))  # a resumed job's seed
            loaded = self.engines.engine
            prep, result, meta = self._generate(prep)
            if not group.writes or result.image is None:  # another process of a split image: the first writes
                return True
            peak = None
            if self.engines.device.type == "cuda":
                peak = max((s.usage.get("peak_vram_allocated_gib") or 0 for s in result.stages), default=None)
            elapsed = time.perf_counter() - self.start
            # the model's load time goes in the line of the job that loaded it, once: a sum over lines is right
            load = self.engines.engine is not loaded
            job = _writer_job(prep, result, meta, (elapsed, load), peak, self.claim, self.record, self.disk_full)
            handed_over = writer.submit(job)
            return True
        except (LinFusionError, OSError, torch.OutOfMemoryError, _JobProblem) as exc:
            if isinstance(exc, LinFusionError) and getattr(exc, "exit_code", 1) >= 128:
                raise
            if group.world > 1:
                raise  # the group's processes must run the same exchanges: the batch stops (a rerun resumes)
            if isinstance(exc, UsageError) and not isinstance(exc, InputImageError):
                raise
            self.events(Note("warning", f"job {index} failed: {exc}"))
            seconds = {"total": time.perf_counter() - self.start}
            self.record(JobOutcome(index, "failed", None, prep.seed, seconds, None, str(exc), prep.job.prompt))
            return False
        finally:
            if not handed_over:
                self.claim.release()

    def _generate(self, prep: Prepared) -> tuple[Prepared, PlanOutput, dict[str, Any]]:
        job = prep.job
        engine = self.engines.engine_for(job, self.events)
        prep = replan_for(engine.comps.native_size, prep, self.options)
        self.events(Note("info", f"job {prep.index or 0}: {job.prompt[:60]!r} -> {prep.paths.image.name}"))
        init_image = _load_input(job, self.options) if job.image else None
        result, meta = run_prepared(
            engine, prep, self.options, events=self.events, cancel=self.cancel, init_image=init_image, group=self.group
        )
        # written in the background while the next job runs (and uses the group): a split image's rows come whole
        # to the first process first
        result.whole_image()
        return prep, result, meta


def _stop_code(cancel: CancelToken, stopped: bool) -> int:
    """Why this process would stop before the next job (0: it would not)."""
    return cancel.reason[1] if cancel.reason else int(stopped)


class _JobProblem(Exception):
    """Something about one job's output names that fails that job alone."""


def _writer_job(
    prep: Prepared,
    result: Any,
    meta: dict[str, Any],
    seconds: tuple[float, bool],
    peak: float | None,
    claim: Claim,
    record: Callable[[JobOutcome], None],
    disk_full: list[DiskFullError],
) -> Callable[[], None]:
    """The background write of one job: save, release its claim, then record exactly one outcome. `seconds`: the
    job's time so far, and whether it loaded the model (only then its line counts the load)."""
    elapsed, loaded = seconds

    def write() -> None:
        index = prep.index or 0
        try:
            sidecar = save_outputs(prep, result.image, meta, result.stage_images)
        except (LinFusionError, OSError) as exc:  # a failed write fails this job, not the batch
            if isinstance(exc, DiskFullError):
                disk_full.append(exc)
            outcome = JobOutcome(
                index, "failed", None, prep.seed, {"total": elapsed}, peak, f"could not save: {exc}", prep.job.prompt
            )
        else:
            timings = {**sidecar.get("seconds", {}), "total": elapsed + sidecar["seconds"].get("write", 0.0)}
            if not loaded:
                timings.pop("model_load", None)
            outcome = JobOutcome(index, "done", str(prep.paths.image), prep.seed, timings, peak)
        finally:
            claim.release()
        record(outcome)

    return write


def _load_input(job: JobSpec, options: RunOptions) -> np.ndarray:
    assert job.image is not None
    return load_rgb(job.image, options.max_input_pixels)
