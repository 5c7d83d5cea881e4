"""What a distillation run is asked to do: `DistillConfig`, its checks, and what its data and hold-out mean.

No torch here: the CLI builds a config at start-up, before it knows whether it will train at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..base.errors import UsageError
from .distill_data import Sample, find_samples

DEFAULT_LR = 1e-4
MIXED_PRECISION_NAMES = ("no", "fp16", "bf16")  # student.MIXED_PRECISION gives each its autocast dtype
AUTO_HOLDOUT_SHARE = 20  # --holdout auto: one sample in 20, at most AUTO_HOLDOUT_MAX
AUTO_HOLDOUT_MAX = 16


@dataclass
class DistillConfig:
    """Everything a distillation run needs; the CLI fills it from flags, Python callers directly."""

    model: str
    data: str | None
    out: Path
    steps: int = 1000
    batch_size: int = 1
    grad_accum: int = 1
    lr: float = DEFAULT_LR
    resolution: int | None = None  # None: the family's native size
    mixed_precision: str = "auto"  # auto (bf16 on CUDA, none elsewhere) | no | fp16 | bf16
    init: str = "auto"  # auto | init | random | a LinFusion checkpoint (folder or hub id)
    save_every: int = 500
    resume: Path | None = None  # None: resume from --out when it holds a run of this model
    seed: int = 0
    gradient_checkpointing: bool = False
    holdout: int | None = None  # None: auto
    device: str = "auto"
    allow_pickle: bool = False
    eval_data: str | None = None

    def check(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "save_every"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise UsageError(f"--lr must be positive, got {self.lr}")
        if self.seed < 0:
            raise UsageError(f"--seed must be 0 or more, got {self.seed}")
        if self.mixed_precision not in ("auto", *MIXED_PRECISION_NAMES):
            raise UsageError(f"--mixed-precision {self.mixed_precision!r}: must be auto, no, fp16 or bf16")
        if self.holdout is not None and self.holdout < 0:
            raise UsageError(f"--holdout must be 0 or more, got {self.holdout}")


def holdout_size(cfg: DistillConfig, count: int) -> int:
    """How many of `count` samples --eval-only keeps aside: --holdout, else one in AUTO_HOLDOUT_SHARE, at most AUTO_HOLDOUT_MAX."""
    if cfg.holdout is not None:
        return cfg.holdout
    return min(AUTO_HOLDOUT_MAX, count // AUTO_HOLDOUT_SHARE)


def load_samples(cfg: DistillConfig) -> list[Sample]:
    """--data's samples; --data is optional on the command line only because --eval-data can replace it."""
    if cfg.data is None:
        raise UsageError("--data is required: a folder of images with captions, or a .jsonl/.csv")
    return find_samples(cfg.data)
