"""`linfusion --version`: ours, then what a bug report needs (torch, diffusers, transformers, python, torch's CUDA
build and the GPUs its driver shows, the device `auto` would pick), read from package metadata and files, never
by importing torch (seconds): the answer comes in a fraction of one.
"""

from __future__ import annotations

import ast
import importlib.util
import platform
from importlib import metadata
from pathlib import Path

from .. import __version__
from ..base.text import plural
from ..engine.placement import gpu_possible

NVIDIA_GPUS = Path("/proc/driver/nvidia/gpus")  # one folder per GPU the driver found, with an `information` file
STACK = ("torch", "diffusers", "transformers")


def installed(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def torch_build() -> dict[str, str | None]:
    """What torch was built for, from its `torch/version.py` (cuda, hip: the toolkit versions, None for a CPU
    build), read as text: finding a package's files imports nothing of it."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return {}
    path = Path(next(iter(spec.submodule_search_locations))) / "version.py"
    try:
        tree = ast.parse(path.read_text())
    except (OSError, SyntaxError, ValueError):
        return {}
    found: dict[str, str | None] = {}
    for node in tree.body:
        target = (
            node.target
            if isinstance(node, ast.AnnAssign)
            else (node.targets[0] if isinstance(node, ast.Assign) else None)
        )
        value = getattr(node, "value", None)
        if isinstance(target, ast.Name) and isinstance(value, ast.Constant):
            found[target.id] = value.value if isinstance(value.value, str) else None
    return found


def nvidia_gpus() -> list[str]:
    """The names of the GPUs NVIDIA's driver found on this machine (Linux), in its order."""
    names = []
    for folder in sorted(NVIDIA_GPUS.glob("*")) if NVIDIA_GPUS.is_dir() else []:
        try:
            lines = (folder / "information").read_text().splitlines()
        except OSError:
            continue
        model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("Model:")), "an NVIDIA GPU")
        names.append(model)
    return names


def version_lines() -> list[str]:
    build = torch_build()
    gpus = nvidia_gpus()
    cuda = build.get("cuda") or build.get("hip")
    if not build:
        cuda_line, device = "CUDA: unknown (torch is not installed)", None
    elif cuda is None:
        cuda_line, device = "CUDA: none (this torch is built for the CPU)", None
    elif gpus:
        names = ", ".join(sorted(set(gpus)))
        cuda_line, device = f"CUDA: {cuda}, {plural(len(gpus), 'GPU')} ({names})", f"cuda:0 ({gpus[0]})"
    elif gpu_possible():
        cuda_line, device = f"CUDA: {cuda}; `linfusion plan` shows what torch can use", "auto (a GPU may be here)"
    else:
        cuda_line, device = f"CUDA: {cuda}, but no GPU is visible", None
    if device is None and platform.system() == "Darwin" and platform.machine() == "arm64":
        device = "mps (Apple silicon)"
    versions = ", ".join(f"{name} {installed(name)}" for name in STACK)
    return [
        f"linfusion {__version__}",
        versions,
        f"python {platform.python_version()}; {cuda_line}",
        f"device: {device or f'cpu ({platform.processor() or platform.machine()})'}",
    ]
