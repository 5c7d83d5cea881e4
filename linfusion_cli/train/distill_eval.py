"""`linfusion distill --eval-only`: how close LinFusion is to the original attention, before and after training.

On held-out samples (never trained on) at fixed timesteps and fixed noise, for the init weights and for the
distilled ones: the MSE between each LinFusion attn1 output and the original attn1 output (the teacher, the
same UNet), and the MSE between the two UNets' noise predictions. Same inputs for both, so the numbers compare.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ..base.errors import InputImageError, UsageError
from ..base.events import Note
from ..linfusion.patching import WEIGHTS_NAME
from ..models.loading import load_components
from .config import DistillConfig, holdout_size, load_samples
from .distill_ckpt import check_compatible, find_resume
from .distill_data import Sample, find_samples, load_square, split_holdout
from .events import DistillSink, drop
from .group import Dist, dist_from_env, process_device
from .student import Student, build_student, resolve_init, step_generator, unet_fingerprint

log = logging.getLogger(__name__)

EVAL_TIMESTEP_FRACTIONS = (0.1, 0.3, 0.5, 0.7, 0.9)  # of the training schedule, the same for every sample
EVAL_STREAM = 2**40  # eval noise comes from its own random stream, apart from every training step's


def held_out_samples(cfg: DistillConfig, saved_state: dict[str, Any] | None) -> list[Sample]:
    """--eval-data, else the samples --data held out of training (the split recorded in the run's state)."""
    if cfg.eval_data is not None:
        return find_samples(cfg.eval_data)
    samples = load_samples(cfg)
    seed = int(saved_state["seed"]) if saved_state else cfg.seed
    holdout = int(saved_state["holdout"]) if saved_state else holdout_size(cfg, len(samples))
    if holdout == 0:
        raise UsageError(
            "--eval-only needs samples the run did not train on: pass --eval-data DATA (images with captions), or "
            "train with --holdout N so that N samples of --data are kept aside"
        )
    return split_holdout(samples, holdout, seed)[1]


def measure(student: Student, samples: list[Sample], seed: int) -> tuple[dict[str, Any], int]:
    """Mean per-layer attn1 MSE and noise-prediction MSE against the teacher; and how many images were skipped."""
    train_steps = int(student.scheduler.config.num_train_timesteps)
    timesteps = torch.tensor([int(f * train_steps) for f in EVAL_TIMESTEP_FRACTIONS], device=student.device)
    per_layer = torch.zeros(len(student.patch.layers), dtype=torch.float64)
    noise_mse, used, skipped = 0.0, 0, 0
    for index, sample in enumerate(samples):
        try:
            pixels = load_square(sample.image, student.resolution)[None]  # (1, 3, R, R)
        except InputImageError as exc:
            log.warning("skipping %s: %s", sample.image, exc)
            skipped += 1
            continue
        generator = step_generator(seed, EVAL_STREAM, 0, index)
        latents, embeds, added = student.encode(pixels, [sample.caption], generator)
        count = len(timesteps)
        latents, embeds = latents.repeat(count, 1, 1, 1), embeds.repeat(count, 1, 1)  # (T, 4, r, r), (T, 77, D)
        if added is not None:
            added = {k: v.repeat(count, 1) for k, v in added.items()}
        noise = torch.randn(latents.shape, generator=generator).to(student.device)
        losses = student.losses_at(latents, noise, timesteps, embeds, added, train=False)
        per_layer += torch.tensor([float(v) for v in losses.per_layer], dtype=torch.float64)
        noise_mse += float(losses.kd)
        used += 1
    if used == 0:
        raise UsageError(f"none of the {len(samples)} held-out images could be decoded")
    layers = (per_layer / used).tolist()
    return {
        "feature_mse": layers,
        "feature_mse_mean": sum(layers) / len(layers),
        "noise_mse": noise_mse / used,
    }, skipped


def evaluate(cfg: DistillConfig, *, weights: str | None = None, events: DistillSink = drop) -> dict[str, Any]:
    """Compare the init weights and the distilled ones (`weights`, default: the latest in --resume or --out)."""
    cfg.check()
    saved = find_resume(cfg.resume, cfg.out)
    final = weights or (str(saved.folder) if saved else None)
    if final is None:
        if not (cfg.out / WEIGHTS_NAME).is_file():
            raise UsageError(f"--eval-only: no distilled weights in '{cfg.out}'; run the distillation first")
        final = str(cfg.out)
    samples = held_out_samples(cfg, saved.state if saved else None)
    device = process_device(cfg.device, dist_from_env())
    comps = load_components(cfg.model, device=device, dtype=torch.float32, allow_pickle=cfg.allow_pickle)
    init = str(saved.state["init"]) if saved and "init" in saved.state else resolve_init(cfg.init, comps)
    seed = int(saved.state["seed"]) if saved else cfg.seed
    if saved is not None:
        check_compatible(saved, cfg, comps, unet_fingerprint(comps.unet))
    events(Note("info", f"evaluating on {len(samples)} held-out samples x {len(EVAL_TIMESTEP_FRACTIONS)} timesteps"))

    results: dict[str, Any] = {}
    layers: list[str] = []
    skipped = 0
    for label, source in (("init", init), ("final", final)):
        # fp32 and one process: the numbers should reflect the weights, not the arithmetic.
        student = build_student(cfg, comps, device, Dist(1, 0, 0), source, "no")
        with torch.no_grad():
            results[label], skipped = measure(student, samples, seed)
        layers = student.patch.layers
        student.student_tap.close()
        student.teacher_tap.close()
        student.patch.remove()
    return {
        "model": cfg.model,
        "init": init,
        "final": final,
        "samples": len(samples) - skipped,
        "skipped_images": skipped,
        "timesteps": [
            int(f * int(comps.scheduler_config.get("num_train_timesteps", 1000))) for f in EVAL_TIMESTEP_FRACTIONS
        ],
        "layers": [
            {"layer": name, "init": results["init"]["feature_mse"][i], "final": results["final"]["feature_mse"][i]}
            for i, name in enumerate(layers)
        ],
        "feature_mse": {k: results[k]["feature_mse_mean"] for k in ("init", "final")},
        "noise_mse": {k: results[k]["noise_mse"] for k in ("init", "final")},
    }
