"""Which jobs of a prompt file this task makes: --shard K/N, a Slurm array task's position among the array's task
ids, torchrun's RANK/WORLD_SIZE, or the whole file."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from ..base.errors import UsageError


@dataclass(frozen=True)
class Shard:
    index: int
    count: int
    source: str  # where it came from, for the log line

    def holds(self, job_index: int) -> bool:
        return job_index % self.count == self.index

    def describe(self) -> str:
        return f"shard {self.index}/{self.count} ({self.source})"


WHOLE_FILE = Shard(0, 1, "whole file")
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
        return WHOLE_FILE
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
    how = "set the shard yourself with --shard K/N (K = this task's position among the N tasks, from 0)"
    if values.get("COUNT", 1) > 1 and "MIN" not in values:  # every task would take itself for the first
        raise UsageError(f"the Slurm array variables are inconsistent ({_slurm_text(values)}: no MIN); {how}")
    low, count, step_given = values.get("MIN", task), values.get("COUNT"), values.get("STEP")
    if "MAX" in values:
        high = values["MAX"]
        if count is None and step_given:  # Slurm before 15.08 sets no COUNT
            count = (high - low) // step_given + 1
    else:
        high = low + ((count or 1) - 1) * (step_given or 1)
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
