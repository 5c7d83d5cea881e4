"""What every benchmark shares: sizes as the CLI writes them, the machine a report was measured on, and a
timer that reports the median time and the peak memory of a few runs."""

from __future__ import annotations

import datetime
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from ..base.precision import dtype_flag
from ..base.schema import SCHEMA
from ..core.run import describe_device, versions
from ..engine.meter import Meter, Usage


def parse_size(text: str) -> tuple[int, int]:
    """'1024' -> (1024, 1024); '16384x8192' -> (16384, 8192) as (width, height)."""
    parts = text.lower().split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"size '{text}' is not N or WxH") from None
    if len(values) == 1:
        values *= 2
    if len(values) != 2 or min(values) < 64 or any(v % 8 for v in values):
        raise ValueError(f"size '{text}': sides must be multiples of 8, at least 64")
    return values[0], values[1]


def environment(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Where and with what a report was measured, so that reports from different machines compare."""
    return {
        "schema": SCHEMA,
        "device": describe_device(device),
        "dtype": dtype_flag(dtype),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "threads": torch.get_num_threads(),
    }


def timed(device: torch.device, fn: Callable[[], Any], repeats: int) -> tuple[float, Usage, Any]:
    """Median seconds over `repeats` runs after one warm-up; peak memory over all of them."""
    fn()  # warm-up: kernels, allocator, lazy init
    times = []
    out = None
    with Meter(device) as meter:
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            out = fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
    return statistics.median(times), meter.usage, out


def measured(seconds: float, usage: Usage, digits: int = 4) -> dict[str, Any]:
    """One measurement in the layout every report shares: seconds and peak_vram_allocated_gib."""
    return {"seconds": round(seconds, digits), "peak_vram_allocated_gib": usage.as_dict()["peak_vram_allocated_gib"]}
