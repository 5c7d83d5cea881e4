"""Measuring a block of work: its time, peak device memory and peak resident memory (what the report and the
benchmarks record for each stage)."""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass
from typing import Any

import torch

from .memory_plan import GIB, proc_bytes


def _rss_bytes() -> int:
    """Peak RSS since the last reset (VmHWM), falling back to the process lifetime peak."""
    peak = proc_bytes("/proc/self/status", "VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_rss_peak() -> None:
    try:  # Linux: writing 5 resets the peak RSS counter
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


@dataclass
class Usage:
    seconds: float
    peak_allocated: int | None  # device bytes, None off-GPU
    peak_reserved: int | None
    peak_rss: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "seconds": round(self.seconds, 4),
            "peak_vram_allocated_gib": None if self.peak_allocated is None else round(self.peak_allocated / GIB, 3),
            "peak_vram_reserved_gib": None if self.peak_reserved is None else round(self.peak_reserved / GIB, 3),
            "peak_rss_gib": round(self.peak_rss / GIB, 3),
        }


class Meter:
    """Time and peak memory of one block of work: `with Meter(device) as m: ...; m.usage`."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.usage = Usage(0.0, None, None, 0)

    def __enter__(self) -> Meter:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        _reset_rss_peak()
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            alloc: int | None = torch.cuda.max_memory_allocated(self.device)
            reserved: int | None = torch.cuda.max_memory_reserved(self.device)
        else:
            alloc = reserved = None
        self.usage = Usage(time.perf_counter() - self._start, alloc, reserved, _rss_bytes())


def peak_vram_gib(device: torch.device) -> float | None:
    """Peak VRAM allocated since the stage's Meter reset it; no synchronisation, so cheap at every step."""
    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None
