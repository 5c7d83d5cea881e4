"""ControlNets: the kind (kind.py, no torch), loading (load.py), LinFusion on their attention (patch.py), and the
loaded adapter's per-stage call (adapter.py)."""

from .kind import CONTROLNET

__all__ = ["CONTROLNET"]
