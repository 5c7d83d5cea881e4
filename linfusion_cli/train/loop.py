"""The optimizer steps of one process of a distillation run, from where a saved run stopped up to --steps.

A step is grad_accum micro-batches (DDP syncs gradients on the last only), one optimizer step, then one small
all-reduce: the mean losses, and whether any rank was asked to stop. A checkpoint is saved every --save-every
steps, at the end, and on SIGTERM/SIGINT (every rank takes part, rank 0 writes, then the run stops there).
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, NoReturn

import torch

from ..base.errors import EXIT_SIGTERM, Interrupted
from ..base.events import CancelToken, Note
from .config import DistillConfig
from .distill_ckpt import CheckpointWriter, Saved, restore, run_meta
from .distill_data import DataStream, Prefetcher, Sample, micro_batches
from .events import CheckpointSaved, DistillSink, TrainStep
from .group import Dist, all_sum, barrier, union
from .student import Student, step_generator

WEIGHT_DECAY = 0.0
LOSS_PARTS = ("loss", "noise", "kd", "feat")  # the order of Losses.parts()


@dataclass(frozen=True)
class RunData:
    """What a run trains on and the saved run it continues, settled before any model is loaded."""

    train: list[Sample]
    held_out: list[Sample]
    samples: int  # all of --data, the held-out ones included
    seed: int  # the saved run's when resuming: it fixes the data order
    holdout: int
    saved: Saved | None


@dataclass
class Trainer:
    """This process's optimizer, data and place in the run; `run` takes the steps."""

    cfg: DistillConfig
    dist: Dist
    student: Student
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    stream: DataStream
    writer: CheckpointWriter
    meta: dict[str, Any]  # what every checkpoint records about the run
    events: DistillSink
    seed: int
    step: int  # optimizer steps done
    position: int  # samples read by all ranks together: where the data order continues
    start_step: int = field(init=False)
    saved_step: int = field(init=False)
    loop_start: float = 0.0  # time.perf_counter() when the steps began
    first: dict[str, float] = field(default_factory=dict)  # the mean losses of the first step taken
    last: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.start_step = self.saved_step = self.step

    @property
    def global_batch(self) -> int:
        return self.cfg.batch_size * self.cfg.grad_accum * self.dist.world

    def run(self, cancel: CancelToken | None) -> None:
        """Steps up to cfg.steps. Raises Interrupted (after saving) when `cancel` is triggered on any rank."""
        cfg, dist = self.cfg, self.dist
        self.loop_start = time.perf_counter()
        batches = micro_batches(self.position, dist.world, dist.rank, cfg.batch_size, cfg.grad_accum)
        with Prefetcher(self.stream, batches) as data:
            while self.step < cfg.steps:
                sums = self.optimizer_step(data)
                if self.report(sums, cancel):
                    self.stop(cancel)
                if self.step % cfg.save_every == 0 or self.step == cfg.steps:
                    self.save("final" if self.step == cfg.steps else "every")
                    self.saved_step = self.step

    def optimizer_step(self, data: Prefetcher) -> list[float]:
        """One optimizer step over grad_accum micro-batches; returns this rank's mean loss parts."""
        cfg, student = self.cfg, self.student
        sums = [0.0, 0.0, 0.0, 0.0]
        for micro in range(cfg.grad_accum):
            pixels, captions = data.get()
            generator = step_generator(self.seed, self.step, self.dist.rank, micro)
            latents, embeds, added = student.encode(pixels, captions, generator)
            sync = nullcontext()
            if self.dist.world > 1 and micro < cfg.grad_accum - 1:
                sync = student.model.no_sync()  # type: ignore[operator]
            with sync:
                losses = student.losses(latents, embeds, added, generator)
                self.scaler.scale(losses.total / cfg.grad_accum).backward()
            sums = [a + b / cfg.grad_accum for a, b in zip(sums, losses.parts(), strict=True)]
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.position += self.global_batch
        return sums

    def report(self, sums: list[float], cancel: CancelToken | None) -> bool:
        """Average the losses over the ranks and report the step; True when any rank was asked to stop."""
        asked = 1.0 if cancel is not None and cancel.requested else 0.0
        reduced = all_sum([*sums, asked], self.dist, self.student.device)
        parts = dict(zip(LOSS_PARTS, (v / self.dist.world for v in reduced[:4]), strict=True))
        self.first = self.first or parts
        self.last = parts
        rate = (self.step - self.start_step) / max(time.perf_counter() - self.loop_start, 1e-9)
        eta = (self.cfg.steps - self.step) / rate
        self.events(
            TrainStep(self.step, self.cfg.steps, parts["loss"], parts["noise"], parts["kd"], parts["feat"], rate, eta)
        )
        return reduced[4] > 0

    def stop(self, cancel: CancelToken | None) -> NoReturn:
        """SIGTERM/SIGINT on any rank: all save (rank 0 writes) and stop at this step."""
        if self.step > self.saved_step:
            self.save("signal")
        barrier(self.dist)
        name, code = cancel.reason if cancel is not None and cancel.reason else ("SIGTERM", EXIT_SIGTERM)
        raise Interrupted(name, code, resumable=True)

    def save(self, reason: str) -> None:
        """A checkpoint of this step on every rank's say (the skipped images are gathered); rank 0 writes it."""
        skipped = skipped_images(self.stream, self.dist)  # every rank takes part in the gather
        state = {**self.meta, "step": self.step, "position": self.position, "skipped_images": skipped}
        path = self.writer.save(self.student.patch, self.optimizer, self.scaler, state)
        if path is not None:
            self.events(CheckpointSaved(self.step, str(path), reason))


def start_trainer(
    cfg: DistillConfig, dist: Dist, student: Student, data: RunData, mixed: str, events: DistillSink
) -> Trainer:
    """The optimizer (and fp16 grad scaler), restored from the saved run when resuming, and the data stream."""
    optimizer = torch.optim.AdamW(student.params, lr=cfg.lr, weight_decay=WEIGHT_DECAY)
    scaler = torch.amp.GradScaler(student.device.type, enabled=mixed == "fp16")
    step, position = 0, 0
    if data.saved is not None:
        step, position, _ = restore(data.saved, optimizer, scaler, cfg.lr)
        events(Note("info", f"resuming from {data.saved.folder} at step {step}"))
        if step >= cfg.steps:
            events(Note("warning", f"the run is already at step {step} of --steps {cfg.steps}; raise --steps"))
    stream = DataStream(data.train, data.seed, student.resolution)
    writer = CheckpointWriter(cfg.out, dist.main)
    meta = run_meta(cfg, student.comps, student, data.seed, data.holdout, data.samples, mixed)
    return Trainer(cfg, dist, student, optimizer, scaler, stream, writer, meta, events, data.seed, step, position)


def skipped_images(stream: DataStream, dist: Dist) -> list[str]:
    """Undecodable images seen by any rank (each rank reads its own share)."""
    mine = {str(stream.samples[i].image) for i in stream.skipped.copy()}  # the prefetch thread may add to it
    return union(mine, dist)
