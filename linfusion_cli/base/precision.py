"""Precisions, spelled as `--dtype` spells them in every flag, report, sidecar and benchmark."""

from __future__ import annotations

from typing import Any

AUTO = "auto"
# The flag's spelling -> torch's name.
PRECISIONS = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


def dtype_flag(dtype: Any) -> str:
    """The flag spelling (fp16, bf16, fp32) of a torch dtype or its name; 'auto' for anything else."""
    name = str(dtype).replace("torch.", "")
    return next((flag for flag, long in PRECISIONS.items() if name in (flag, long)), AUTO)
