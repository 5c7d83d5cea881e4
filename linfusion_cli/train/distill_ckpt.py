"""Distillation checkpoints: the official LinFusion format plus the training state, written atomically.

    OUT/config.json, OUT/diffusion_pytorch_model.safetensors   the latest weights (`--linfusion OUT` loads them)
    OUT/step-00000500/                                         one complete checkpoint (the newest KEEP stay):
        config.json, diffusion_pytorch_model.safetensors       official format (`--linfusion` loads it too)
        training_state.pt                                      optimizer (and fp16 grad scaler) state
        training_state.json                                    step, data position, seed, model fingerprint...

A checkpoint is written into a hidden temp folder and renamed into place in one step; a failed save (a full
disk) removes the temp folder and leaves the previous checkpoint as it was.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from .. import __version__
from ..base.errors import OutputError, UsageError
from ..io.writes import fsync_dir
from ..linfusion.patching import CONFIG_NAME, WEIGHTS_NAME, LinFusionPatch

STATE_JSON = "training_state.json"
STATE_PT = "training_state.pt"
STEP_PREFIX = "step-"
KEEP = 2  # complete step folders kept; older ones are removed after a newer one is in place
STATE_FORMAT = 1


@dataclass
class Saved:
    folder: Path
    state: dict[str, Any]


def step_folder(out: Path, step: int) -> Path:
    return out / f"{STEP_PREFIX}{step:08d}"


def latest(folder: Path) -> Saved | None:
    """The checkpoint in `folder` itself (a step folder) or its newest complete step folder."""
    if (folder / STATE_JSON).is_file():
        return _read(folder)
    steps = sorted(p for p in folder.glob(f"{STEP_PREFIX}*") if (p / STATE_JSON).is_file())
    return _read(steps[-1]) if steps else None


def _read(folder: Path) -> Saved:
    try:
        state = json.loads((folder / STATE_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UsageError(f"{folder / STATE_JSON} cannot be read ({exc}); resume from an older step folder") from exc
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise UsageError(f"{folder / STATE_JSON} is not a linfusion distill state (format {STATE_FORMAT})")
    return Saved(folder, state)


def find_resume(resume: Path | None, out: Path) -> Saved | None:
    """`--resume PATH`, else a run already in `--out` (rerunning the same command continues it), else None."""
    if resume is None:
        return latest(out) if out.is_dir() else None
    if not resume.is_dir():
        raise UsageError(f"--resume '{resume}' is not a folder: give a distill --out folder or one of its step folders")
    saved = latest(resume)
    if saved is None:
        raise UsageError(
            f"--resume '{resume}' holds no training state ({STATE_JSON}); give a distill --out folder or one of its "
            f"{STEP_PREFIX}* folders"
        )
    return saved


def check_compatible(saved: Saved, cfg: Any, comps: Any, fingerprint: str) -> None:
    """Refuse to resume a run made for another model, naming both."""
    state = saved.state
    where = f"--resume '{cfg.resume}'" if cfg.resume is not None else f"--out '{cfg.out}'"
    if state.get("fingerprint") != fingerprint:
        raise UsageError(
            f"{where} holds a distillation of model '{state.get('model')}' ({state.get('family')}, UNet "
            f"fingerprint {state.get('fingerprint')}), but --model '{cfg.model}' is {comps.family_label} with "
            f"fingerprint {fingerprint}: resume with the model it was made for, or choose another --out"
        )


def restore(saved: Saved, optimizer: torch.optim.Optimizer, scaler: Any, lr: float) -> tuple[int, int, int]:
    """Load optimizer (and grad scaler) state; returns (step, data position, seed). --lr applies from here on."""
    try:
        blob = torch.load(saved.folder / STATE_PT, map_location="cpu", weights_only=True)
        optimizer.load_state_dict(blob["optimizer"])
    except (OSError, RuntimeError, KeyError, ValueError) as exc:
        raise UsageError(
            f"{saved.folder / STATE_PT} cannot be loaded ({exc}); resume from an older step folder"
        ) from exc
    if blob.get("scaler"):
        scaler.load_state_dict(blob["scaler"])
    for group in optimizer.param_groups:
        group["lr"] = lr
    state = saved.state
    return int(state["step"]), int(state["position"]), int(state["seed"])


def run_meta(cfg: Any, comps: Any, student: Any, seed: int, holdout: int, samples: int, mixed: str) -> dict[str, Any]:
    """What a checkpoint records about its run: enough to check a resume and to repeat the data order."""
    return {
        "format": STATE_FORMAT,
        "linfusion_version": __version__,
        "model": cfg.model,
        "family": comps.family_label,
        "fingerprint": student.fingerprint,
        "prediction_type": comps.prediction_type,
        "layers": [s.as_entry() for s in student.patch.specs],
        "init": student.init_source,
        "seed": seed,
        "holdout": holdout,
        "data": None if cfg.data is None else str(cfg.data),
        "samples": samples,
        "resolution": student.resolution,
        "batch_size": cfg.batch_size,
        "grad_accum": cfg.grad_accum,
        "lr": cfg.lr,
        "mixed_precision": mixed,
    }


class CheckpointWriter:
    """Writes checkpoints under `out` (rank 0 only: other ranks' `save` does nothing)."""

    def __init__(self, out: Path, main: bool) -> None:
        self.out = out
        self.main = main

    def save(
        self, patch: LinFusionPatch, optimizer: torch.optim.Optimizer, scaler: Any, state: dict[str, Any]
    ) -> Path | None:
        if not self.main:
            return None
        step = int(state["step"])
        final = step_folder(self.out, step)
        temp = self.out / f".tmp-{final.name}-{os.getpid()}"
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(temp, ignore_errors=True)
            patch.save(temp)
            blob = {"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler.is_enabled() else {}}
            torch.save(blob, temp / STATE_PT)
            (temp / STATE_JSON).write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
            _fsync_tree(temp)
            _replace_folder(temp, final)
            for name in (CONFIG_NAME, WEIGHTS_NAME):  # the latest, at the top, for `--linfusion OUT`
                _publish(final / name, self.out / name)
        except BaseException as exc:
            shutil.rmtree(temp, ignore_errors=True)
            if not isinstance(exc, (OSError, RuntimeError, SafetensorError)):
                raise
            previous = latest_step(self.out)
            kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise OutputError(
                f"could not save the step {step} checkpoint in {self.out}: {why}; {kept}. Free disk space and rerun "
                "the same command to resume"
            ) from exc
        self._prune()
        return final

    def _prune(self) -> None:
        steps = sorted(p for p in self.out.glob(f"{STEP_PREFIX}*") if p.is_dir())
        for old in steps[:-KEEP]:
            shutil.rmtree(old, ignore_errors=True)


def latest_step(out: Path) -> Path | None:
    saved = latest(out) if out.is_dir() else None
    return saved.folder if saved else None


def _replace_folder(temp: Path, final: Path) -> None:
    """Rename `temp` to `final` in one step; an existing `final` (the same step saved again) is set aside first."""
    aside = None
    if final.exists():
        aside = final.with_name(f".old-{final.name}-{os.getpid()}")
        os.replace(final, aside)
    os.replace(temp, final)
    fsync_dir(final.parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def _publish(source: Path, target: Path) -> None:
    """`target` becomes `source` in one rename: a hard link (no extra disk) or, where links fail, a copy."""
    temp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        temp.unlink()
    try:
        os.link(source, temp)
    except OSError:
        shutil.copyfile(source, temp)
    os.replace(temp, target)


def _fsync_tree(folder: Path) -> None:
    for path in folder.iterdir():
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
    fsync_dir(folder)
