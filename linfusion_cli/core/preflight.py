"""A job's run up to the moment its model would load, without torch: what `--dry-run` prints, and every check a run
makes before loading (sizes, the model's files, adapters, weights available offline, the output folder and file).

`generate`, `upscale` and `replay` check here before importing the engine (torch, diffusers: seconds), so a bad
value, a missing model or an existing output is refused at once; `--gpus N` checks here once, in the launching
process, before any worker starts.
"""

from __future__ import annotations

from typing import Any

from ..base.errors import OutputError, OutputFolderError
from ..base.events import Note
from ..engine.placement import Placement
from ..io.images import open_image
from ..io.writes import check_folder
from .jobspec import JobSpec
from .plan_report import check_offline, plan_summary, plan_warnings, where
from .prepare import Prepared, RunOptions, pick_seed, plan_for


def input_size(job: JobSpec, max_pixels: int) -> tuple[int, int] | None:
    """An upscale's input image size, from its header (its pixels are not read here); None without one."""
    if job.image is None:
        return None
    with open_image(job.image, max_pixels) as image:
        return image.width, image.height


def ensure_writable_target(prep: Prepared, overwrite: bool) -> None:
    """The job's output name is free for it, or holds this very job's finished image (the run skips it, as a
    batch does), or --overwrite; and nothing is in the way (a folder, a link)."""
    problem = prep.paths.problem()
    if problem:
        raise OutputError(problem)
    if prep.paths.image.exists() and not overwrite and not prep.paths.complete(prep.key):  # bad input, exit 2
        raise OutputFolderError(
            f"{prep.paths.image} already exists, and is not a finished image of these settings (its sidecar is "
            "missing or says otherwise); pass --overwrite to replace it"
        )


def preflight(
    job: JobSpec,
    options: RunOptions,
    placed: Placement,
    *,
    seed: int,
    size: tuple[int, int] | None = None,
    world: int = 1,
) -> Prepared:
    """Everything a run of `job` checks before its model loads, writing nothing; the job planned and named, with
    the warnings a user should hear before it starts among its notes. `size`: an upscale's input size."""
    prep = plan_for(job, options, seed=seed, input_size=size, random_seed=job.seed is None)
    check_offline(job, prep.family)
    prep.notes.extend(Note("warning", warning) for warning in plan_warnings(prep, placed, world))
    check_folder(options.out)
    ensure_writable_target(prep, options.overwrite)
    return prep


def check_run(job: JobSpec, options: RunOptions, world: int = 1) -> Prepared:
    """`preflight` on the device the run will use (a device this machine lacks is refused, as a run refuses it)."""
    size = input_size(job, options.max_input_pixels)
    return preflight(job, options, where(options), seed=pick_seed(job), size=size, world=world)


def dry_run(job: JobSpec, options: RunOptions, world: int = 1, size: tuple[int, int] | None = None) -> dict[str, Any]:
    """`--dry-run`: the plan a run of `job` would follow, refused where the run would be refused before loading
    (the device, the output folder), nothing written and no model loaded. `size`: an upscale's input size, when
    its pixels are in memory (else read from the file's header)."""
    placed = where(options)
    size = size or input_size(job, options.max_input_pixels)
    prep = plan_for(job, options, seed=pick_seed(job), input_size=size, random_seed=job.seed is None)
    check_folder(options.out)
    return plan_summary(prep, placed, world)
