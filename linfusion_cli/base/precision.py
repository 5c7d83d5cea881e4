"""Precisions, spelled as `--dtype` spells them in every flag, report, sidecar and benchmark."""

from __future__ import annotations

from typing import Any

AUTO = "auto"
# The flag's spelling -> torch's name.
PRECISIONS = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


# What people type for them (torch's names, "half"...) -> the flag's spelling.
PRECISION_ALIASES = {
    "float16": "fp16",
    "half": "fp16",
    "f16": "fp16",
    "bfloat16": "bf16",
    "float32": "fp32",
    "float": "fp32",
    "full": "fp32",
    "f32": "fp32",
}


def precision_name(text: str) -> str:
    """`float16`, `Half`, `FP16` -> `fp16` (and auto, bf16, fp32 likewise); anything else as given, lowercased."""
    name = text.strip().lower()
    return PRECISION_ALIASES.get(name, name)


def dtype_flag(dtype: Any) -> str:
    """The flag spelling (fp16, bf16, fp32) of a torch dtype or its name; 'auto' for anything else."""
    name = str(dtype).replace("torch.", "")
    return next((flag for flag, long in PRECISIONS.items() if name in (flag, long)), AUTO)
