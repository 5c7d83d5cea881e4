"""linfusion: ultra-high-resolution Stable Diffusion on one GPU with LinFusion linear attention.

The library works without the CLI::

    from linfusion_cli import LinFusionPipeline          # the commands' Python API
    from linfusion_cli import apply_linfusion, TiledVAE  # the pieces
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "Generator",
    "LinFusionAttention",
    "LinFusionPatch",
    "LinFusionPipeline",
    "Result",
    "TiledVAE",
    "__version__",
    "apply_linfusion",
]

if TYPE_CHECKING:
    from .core.api import Generator, LinFusionPipeline
    from .core.result import Result
    from .engine.vae import TiledVAE
    from .linfusion.attention import LinFusionAttention
    from .linfusion.patching import LinFusionPatch, apply_linfusion

_LAZY = {
    "LinFusionPipeline": "core.api",
    "Generator": "core.api",  # deprecated: LinFusionPipeline
    "Result": "core.result",
    "LinFusionAttention": "linfusion.attention",
    "LinFusionPatch": "linfusion.patching",
    "apply_linfusion": "linfusion.patching",
    "TiledVAE": "engine.vae",
}


def __getattr__(name: str) -> Any:
    # Lazy: `import linfusion_cli` (and the CLI's --help) must not pay for importing torch.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
