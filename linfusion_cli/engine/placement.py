"""Where a job runs, as plain text and numbers: the device `--device` names, the precision, the memory free there.

A plan, a dry run and the checks before a model loads need only this. On a machine where no GPU can be (no
NVIDIA or AMD device node, not a Mac) it is found without importing torch, which takes seconds: `auto` is the
CPU there, and `--device cuda` names a device this machine does not have (a plan for a farm's GPU nodes made on
its login node). Elsewhere torch is asked (memory.placed), since only it knows what it can use.
"""

from __future__ import annotations

import glob
import os
import re
import sys
from dataclasses import dataclass
from importlib import metadata

from ..base.errors import UsageError
from ..base.precision import AUTO
from .memory_plan import PRECISION_BYTES, budget_bytes, cpu_available_bytes

# Device nodes a GPU that torch can use leaves on Linux: NVIDIA's driver, AMD's ROCm, WSL2's GPU bridge.
GPU_NODES = ("/dev/nvidiactl", "/dev/nvidia[0-9]*", "/dev/kfd", "/dev/dxg")
DEVICE_TEXT = re.compile(r"(cpu|cuda|mps)(:\d+)?")
ACCELERATORS = ("cuda", "mps")  # fp16 by default there, fp32 on the CPU


@dataclass(frozen=True)
class Placement:
    """A device as torch spells it ("cpu", "cuda:0", "mps"), the run's precision as --dtype spells it, the bytes
    free there (None: not measurable here), and whether this machine has the device at all."""

    device: str
    precision: str
    free: int | None = None
    here: bool = True

    @property
    def kind(self) -> str:
        """The device's type: cpu, cuda or mps."""
        return self.device.split(":")[0]

    @property
    def itemsize(self) -> int:
        return PRECISION_BYTES[self.precision]

    def budget(self, max_vram: float | None) -> int | None:
        """Bytes a run may plan with: --max-vram GB, else what is free here."""
        return budget_bytes(max_vram, self.free)

    def warnings(self) -> list[str]:
        """Settings that work but that a user would not want without knowing."""
        if self.kind == "cpu" and self.precision == "fp16":
            return ["--dtype fp16 on the CPU is many times slower than fp32 there (the CPU default); use --dtype fp32"]
        return []


def run_precision(device_type: str, dtype: str) -> str:
    """--dtype auto: fp16 on a GPU, fp32 on the CPU; anything else as given."""
    if dtype != AUTO:
        return dtype
    return "fp16" if device_type in ACCELERATORS else "fp32"


def gpu_possible() -> bool:
    """Whether this machine may have a GPU torch could use. False only where none can be: a Linux machine without
    an NVIDIA, AMD or WSL GPU device node."""
    if not sys.platform.startswith("linux"):
        return True  # a Mac's MPS, Windows' CUDA: torch knows
    return any(glob.glob(pattern) for pattern in GPU_NODES)


def without_gpu(device: str, dtype: str, *, here_only: bool) -> Placement | None:
    """`device` and `dtype` resolved with no torch, on a machine where `gpu_possible` is false; None where torch
    must be asked (a GPU may be here, or the device is spelt in a way only torch reads). `here_only`: a device
    this machine does not have is a usage error (a run, a dry run), not a plan for another machine."""
    if gpu_possible():
        return None
    name = "cpu" if device == AUTO else device
    if not DEVICE_TEXT.fullmatch(name):
        return None
    kind = name.split(":")[0]
    precision = run_precision(kind, dtype)
    if kind == "cpu":
        return Placement(name, precision, cpu_available_bytes())
    if here_only:
        raise UsageError(missing_device(name))
    return Placement(name, precision, None, here=False)


def missing_device(name: str, torch_version: str | None = None) -> str:
    """The one-line refusal of a device this machine does not have."""
    if name.startswith("mps"):
        return f"--device {name}: Apple's MPS is not available here; use --device cpu or auto"
    try:
        version = torch_version or metadata.version("torch")
    except metadata.PackageNotFoundError:
        version = "?"
    return (
        f"--device {name}: CUDA is not available here (no NVIDIA GPU, driver or CUDA build of torch "
        f"{version}); use --device cpu or auto"
    )


def world_from_env() -> int:
    """How many processes torchrun (or --gpus) started, from WORLD_SIZE (1 outside a launcher)."""
    text = os.environ.get("WORLD_SIZE", "1").strip()
    return int(text) if text.isdigit() and int(text) > 0 else 1
