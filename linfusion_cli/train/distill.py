"""`linfusion distill`: train LinFusion's attention modules on any checkpoint, the paper's way (docs/reference.md section 3).

Student = the UNet with LinFusion attn1 layers; teacher = the same UNet with its original attn1 swapped back in
for a no-grad pass (one UNet in memory). Only the LinFusion modules train:

    loss = MSE(student, noise-or-v target) + 0.5 MSE(student, teacher) + 0.5 mean_layers MSE(attn1_s, attn1_t)

AdamW (lr 1e-4, no weight decay), uniform timesteps, optional bf16/fp16 autocast with fp32 master weights.
Data parallel through torch DDP when launched by torchrun / accelerate launch (they set RANK, WORLD_SIZE,
LOCAL_RANK); only rank 0 writes and reports. Noise, timesteps and VAE samples come from generators seeded by
(seed, step, rank) and the data order from (seed, epoch), so a resumed run sees exactly what it would have.

This module is the entry point, `distill(DistillConfig(...))`, and re-exports what its callers use. The parts:
config (DistillConfig), events (what a run reports), group (processes, devices, collectives), student (the
model and its losses), loop (the optimizer steps), distill_data, distill_ckpt, and distill_eval (--eval-only).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..base.events import CancelToken, Note
from ..linfusion.patching import LinFusionPatch
from ..models.loading import Components, load_components
from .config import DistillConfig, holdout_size, load_samples
from .distill_ckpt import Saved, check_compatible, find_resume
from .distill_data import split_holdout
from .events import CheckpointSaved, DistillSink, DistillStarted, TrainStep, drop
from .group import Dist, barrier, dist_from_env, process_device, process_group
from .loop import RunData, Trainer, skipped_images, start_trainer
from .student import Student, build_student, resolve_init, resolve_mixed_precision, unet_fingerprint

__all__ = [
    "CheckpointSaved",
    "Dist",
    "DistillConfig",
    "DistillResult",
    "DistillStarted",
    "TrainStep",
    "build_student",
    "dist_from_env",
    "distill",
    "process_device",
]


@dataclass
class DistillResult:
    """What a finished run hands back: the summary the CLI prints (`as_dict`), and the trained patch still applied."""

    out: Path
    start_step: int
    steps: int
    setup_seconds: float  # loading the model and data, before the first step
    train_seconds: float  # the steps and checkpoint saves
    first_losses: dict[str, float]
    last_losses: dict[str, float]
    skipped_images: list[str]
    rank: int
    world_size: int
    patch: LinFusionPatch = field(repr=False)

    def as_dict(self) -> dict[str, Any]:
        done = self.steps - self.start_step
        return {
            "out": str(self.out),
            "start_step": self.start_step,
            "steps": self.steps,
            "setup_seconds": round(self.setup_seconds, 2),
            "train_seconds": round(self.train_seconds, 2),
            "steps_per_second": round(done / self.train_seconds, 4) if self.train_seconds > 0 else None,
            "first_losses": self.first_losses,
            "last_losses": self.last_losses,
            "skipped_images": self.skipped_images,
            "world_size": self.world_size,
        }


def distill(cfg: DistillConfig, *, events: DistillSink = drop, cancel: CancelToken | None = None) -> DistillResult:
    """Train LinFusion for `cfg.model` on `cfg.data` up to `cfg.steps` optimizer steps, resuming where a saved
    run of the same model left off. Raises Interrupted (after saving) when `cancel` is triggered."""
    # 1. Inputs, launcher, device; a saved run to continue (--resume, or one already in --out).
    cfg.check()
    dist = dist_from_env()
    events = events if dist.main else drop
    data = choose_data(cfg, events)
    device = process_device(cfg.device, dist)
    mixed = resolve_mixed_precision(cfg.mixed_precision, device)
    start = time.perf_counter()

    with process_group(dist, device):
        # 2. Model, LinFusion (the init weights or the saved ones), optimizer.
        comps = load_components(cfg.model, device=device, dtype=torch.float32, allow_pickle=cfg.allow_pickle)
        student = load_student(cfg, comps, device, dist, data.saved, mixed)
        trainer = start_trainer(cfg, dist, student, data, mixed, events)
        events(started(trainer, data, mixed))
        # 3. Optimizer steps.
        try:
            trainer.run(cancel)
            barrier(dist)
            skipped = skipped_images(trainer.stream, dist)
        finally:
            student.drop_wrapper()  # before the group goes (see there)
    student.student_tap.close()
    student.teacher_tap.close()
    return DistillResult(
        cfg.out,
        trainer.start_step,
        trainer.step,
        trainer.loop_start - start,
        time.perf_counter() - trainer.loop_start,
        trainer.first,
        trainer.last,
        skipped,
        dist.rank,
        dist.world,
        student.patch,
    )


def choose_data(cfg: DistillConfig, events: DistillSink) -> RunData:
    """The samples and the held-out split; a saved run's seed and split when resuming, to keep its data order."""
    samples = load_samples(cfg)
    saved = find_resume(cfg.resume, cfg.out)
    seed, holdout = cfg.seed, holdout_size(cfg, len(samples))
    if saved is not None:
        seed, holdout = int(saved.state["seed"]), int(saved.state["holdout"])
        if seed != cfg.seed:
            events(Note("warning", f"--seed {cfg.seed} ignored: the run being resumed uses seed {seed}"))
        if saved.state.get("samples") != len(samples):
            events(Note("warning", f"the data now has {len(samples)} samples, {saved.state.get('samples')} when saved"))
    train, held_out = split_holdout(samples, holdout, seed)
    return RunData(train, held_out, len(samples), seed, holdout, saved)


def load_student(
    cfg: DistillConfig, comps: Components, device: torch.device, dist: Dist, saved: Saved | None, mixed: str
) -> Student:
    """LinFusion on the loaded model: the saved weights when resuming (once they prove to be for this model),
    else the init source; either way the checkpoints record the init source."""
    init_source = resolve_init(cfg.init, comps)
    if saved is not None:
        check_compatible(saved, cfg, comps, unet_fingerprint(comps.unet))
        init_source = str(saved.state.get("init", init_source))
    student = build_student(cfg, comps, device, dist, str(saved.folder) if saved else init_source, mixed)
    student.init_source = init_source
    return student


def started(trainer: Trainer, data: RunData, mixed: str) -> DistillStarted:
    """The event that opens a run's report: what trains, on what, from which step."""
    student = trainer.student
    return DistillStarted(
        trainer.cfg.model,
        student.comps.family_label,
        len(student.patch.layers),
        sum(p.numel() for p in student.params),
        len(data.train),
        len(data.held_out),
        trainer.start_step,
        trainer.cfg.steps,
        trainer.dist.world,
        trainer.global_batch,
        student.resolution,
        mixed,
        student.init_source,
    )
