"""Resume: a job is what it is (its index and settings key), whatever seed a previous run drew. Finished jobs are
found by name (or, for random-seed jobs, by index and key under any seed); a task claims a job by the name it
locks."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from ..io.names import parse_batch_stem
from ..io.output import SIDECAR_SUFFIX, OutputPaths
from .prepare import Prepared, RunOptions, with_seed

CLAIM_SUFFIX = ".claim"


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
