"""LoRAs: the kind (kind.py, no torch) and fusing them into the weights (fuse.py)."""

from .kind import LORA

__all__ = ["LORA"]
