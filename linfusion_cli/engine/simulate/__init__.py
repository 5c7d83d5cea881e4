"""Device memory and work without a device: the real engine run on PyTorch's meta device with real configs, traced
(trace.py), with what the meta device cannot see of a CUDA GPU modelled in one place (cuda.py); the host side of
the run answered by host.py, a split image's group by comm.py, a job's stages by run.py."""

from __future__ import annotations

from .cuda import ALLOCATOR_FACTOR, CARDS, Card, card, device_bytes, fused_attention
from .run import JobSimulation, StageSimulation, StepTrace, resident_bytes, simulate_job, simulate_unet_step
from .trace import FlopTrace, MemoryTrace, PhaseRecord

__all__ = [
    "ALLOCATOR_FACTOR",
    "CARDS",
    "Card",
    "FlopTrace",
    "JobSimulation",
    "MemoryTrace",
    "PhaseRecord",
    "StageSimulation",
    "StepTrace",
    "card",
    "device_bytes",
    "fused_attention",
    "resident_bytes",
    "simulate_job",
    "simulate_unet_step",
]
