"""What a distillation run tells its caller, as it goes (cli/report_distill.py draws them).

Only rank 0 reports: the other ranks' sink is `drop`. No torch here, so the CLI can import these at start-up.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..base.events import Note


@dataclass(frozen=True)
class DistillStarted:
    model: str
    family: str
    layers: int
    trainable_params: int
    samples: int
    held_out: int
    start_step: int
    total_steps: int
    world_size: int
    global_batch: int
    resolution: int
    mixed_precision: str
    init: str


@dataclass(frozen=True)
class TrainStep:
    step: int  # optimizer steps done
    total: int
    loss: float
    noise: float
    kd: float
    feat: float
    steps_per_second: float
    eta_seconds: float


@dataclass(frozen=True)
class CheckpointSaved:
    step: int
    path: str
    reason: str  # "every" | "final" | "signal"


DistillEvent = DistillStarted | TrainStep | CheckpointSaved | Note
DistillSink = Callable[[Any], None]


def drop(_: object) -> None:
    """The event sink of ranks other than 0 (and of callers that want no events)."""
