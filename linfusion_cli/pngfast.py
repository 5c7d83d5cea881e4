"""PNG writing. (A faster encoder replaces this in a later step; the interface stays.)"""

from __future__ import annotations

from typing import IO

import numpy as np

PNG_COMPRESS_LEVEL = 1  # at 16K a default-level PNG costs ~30 s of CPU


def write_png(array: np.ndarray, texts: dict[str, str], handle: IO[bytes]) -> None:
    """(H, W, 3) uint8 -> PNG with text chunks."""
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    for key, value in texts.items():
        info.add_text(key, value)
    Image.fromarray(array, "RGB").save(handle, format="PNG", compress_level=PNG_COMPRESS_LEVEL, pnginfo=info)
