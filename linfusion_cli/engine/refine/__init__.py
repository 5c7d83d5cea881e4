"""Refine methods: how refine stages work. One module per method, listed here; `--refine NAME`, job files and
presets pick one by name. A new method is one module plus a row in `REFINE_METHODS` (or `REFINE_METHODS.register`
from outside): nothing else in the code names a method."""

from __future__ import annotations

from ...base.registry import Registry
from .demofusion import DEMOFUSION
from .method import JobRefiner, RefineMethod, RefineStage, StageGuide, refine_ratio
from .sdedit import SDEDIT

REFINE_METHODS: Registry[RefineMethod] = Registry("refine method", [SDEDIT, DEMOFUSION])
DEFAULT_REFINE = SDEDIT.name  # plain img2img: what a job, or a sidecar from before methods existed, names none of

__all__ = [
    "DEFAULT_REFINE",
    "REFINE_METHODS",
    "JobRefiner",
    "RefineMethod",
    "RefineStage",
    "StageGuide",
    "refine_ratio",
]
