"""A prompt file checked and planned before any model loads: every job of the file checked, this task's jobs
planned and named, and (`--dry-run`) each of them as `plan` shows one.

Every task of an array checks every job, so a mistake anywhere stops every task before it starts, not one task in
the night. The checks a plan makes that can fail (sizes and formats, stage strengths, adapters' files and
families, weights available offline) depend on a job's settings, input image and the extra-network tags of its
prompt (`<lora:NAME:W>`), not on the rest of its prompt, its negative prompt, seed or name, so they run once per
distinct set of these: a 50,000-line file under a 1,000-task array is checked in seconds, and each task plans and
names its own 50 in full.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..base.errors import JobFileError, UsageError
from ..io.images import open_image
from ..io.output import OutputPaths
from ..io.writes import check_folder
from .jobs import read_job_file, resolve_job, said_together
from .jobspec import JobSpec
from .plan_report import offline_gaps, plan_anywhere
from .prepare import Prepared, RunOptions, pick_seed, plan_for
from .shards import WHOLE_FILE, Shard
from .tags import EXTRA_NETWORK

PER_IMAGE = ("prompt", "negative", "seed", "name")  # what one job's checks never depend on
EVERY_JOB = Shard(0, 1, "every job, split over the group's processes")  # --split-image: all make each job


@dataclass
class BatchPlan:
    """This task's jobs of a prompt file, planned and named; `total`: the file's jobs."""

    jobs: list[Prepared]
    total: int
    shard: Shard = WHOLE_FILE
    # index -> why its weights cannot be had here (offline and not cached): that job fails, the batch goes on
    unavailable: dict[int, str] = field(default_factory=dict)


def plan_batch(
    path: Path, flags: dict[str, Any], options: RunOptions, base_seed: int | None, shard: Shard = WHOLE_FILE
) -> BatchPlan:
    """Every job of the file resolved and checked, and every input image's header read; this shard's jobs (and
    every named job: names are made unique over the whole file) planned and named."""
    job_file = read_job_file(path, collect=True)
    checked: dict[str, str] = {}  # a job's settings (PER_IMAGE aside) -> what it lacks offline ("" for nothing)
    failed: dict[str, str] = {}  # a job's settings -> why its checks failed (the same for every such job)
    problems = dict(job_file.problems)  # job index -> its mistake: all are said at once, in line order
    stems: dict[str, int] = {}
    plan = BatchPlan([], job_file.total, shard)
    for row in job_file.rows:
        signature = ""
        try:
            job = resolve_job(
                flags,
                file_defaults=job_file.defaults,
                row=row.values,
                row_label=row.where,
                defaults_label=f"{path.name} defaults",
            )
            input_size = _input_size(job, options) if job.image else None
            signature = _signature(job, input_size)
            if signature in failed:
                raise UsageError(failed[signature])
            if not (shard.holds(row.index) or job.name or signature not in checked):
                continue  # checked already, as a job of the same settings
            random_seed = job.seed is None and base_seed is None
            seed = pick_seed(job, row.index, base_seed) if shard.holds(row.index) else 0
            prep = plan_for(job, options, seed=seed, index=row.index, input_size=input_size, random_seed=random_seed)
        except UsageError as exc:
            message = str(exc)
            if signature and not message.startswith(row.where):
                failed[signature] = message
            problems[row.index] = message if message.startswith(row.where) else f"{row.where}: {message}"
            continue
        if signature not in checked:
            checked[signature] = "; ".join(offline_gaps(job, prep.family))
        if job.name:  # two jobs asking for one name: later ones get -2, -3... in file order, the same in every shard
            stem = prep.paths.image.stem
            seen = stems.get(stem, 0)
            stems[stem] = seen + 1
            if seen:
                prep.paths = OutputPaths.for_stem(options.out, f"{stem}-{seen + 1}", job.format)
        if shard.holds(row.index):
            plan.jobs.append(prep)
            if checked[signature]:
                plan.unavailable[row.index] = f"{row.where}: {checked[signature]}"
    if problems:
        raise JobFileError(said_together(problems))
    return plan


def _signature(job: JobSpec, input_size: tuple[int, int] | None) -> str:
    """What a job's checks depend on: its settings but the per-image ones, which layers set them (an upscale keeps
    its input's aspect unless one did), its input image's size, and the adapters its prompt's tags name (a LoRA tag
    not found is that job's mistake, not its neighbours')."""
    settings = [(k, v) for k, v in job.settings().items() if k not in PER_IMAGE]  # in the table's order
    return repr([settings, sorted(job.sources), input_size, EXTRA_NETWORK.findall(job.prompt)])


def _input_size(job: JobSpec, options: RunOptions) -> tuple[int, int]:
    assert job.image is not None
    with open_image(job.image, options.max_input_pixels) as image:
        return image.width, image.height


def batch_dry_run(
    path: Path, flags: dict[str, Any], options: RunOptions, base_seed: int | None, shard: Shard = WHOLE_FILE
) -> list[dict[str, Any]]:
    """`batch --dry-run`: the whole file checked as a run checks it, the output folder too, and this task's jobs
    each planned as `plan` shows one (with its index and output file); nothing loads, nothing is written."""
    plan = plan_batch(path, flags, options, base_seed, shard)
    check_folder(options.out)
    plans = []
    for prep in plan.jobs:
        summary = plan_anywhere(prep, options)  # its warnings name what is not cached offline (plan.unavailable)
        # a seed drawn at random is drawn by the run: no made-up seed or file name here
        known = not prep.random_seed
        output = str(prep.paths.image) if known else None
        plans.append({**summary, "index": prep.index, "seed": prep.seed if known else None, "output": output})
    return plans
