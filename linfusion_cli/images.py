"""Reading input images safely: our own pixel cap instead of Pillow's bomb error, clear errors for files that
are not images or are cut short, and every common mode converted to 8-bit RGB with EXIF rotation applied."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputImageError

DEFAULT_MAX_PIXELS = 1_000_000_000  # 1 gigapixel; a 16384^2 image is 268 Mpx


@contextlib.contextmanager
def open_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Iterator[Any]:
    """Open lazily (header only) and refuse more than `max_pixels` before decoding anything."""
    from PIL import Image, UnidentifiedImageError

    file = Path(path)
    if not file.is_file():
        raise InputImageError(f"image '{path}' does not exist or is not a file")
    # Our cap replaces Pillow's DecompressionBombError (raised from ~179 Mpx, below a 16K image).
    Image.MAX_IMAGE_PIXELS = None
    try:
        image = Image.open(file)
    except UnidentifiedImageError:
        raise InputImageError(f"'{path}' is not an image Pillow can read (PNG, JPEG, WebP, TIFF, BMP...)") from None
    except OSError as exc:
        raise InputImageError(f"cannot read image '{path}': {exc}") from exc
    try:
        pixels = image.width * image.height
        if pixels > max_pixels:
            raise InputImageError(
                f"'{path}' is {image.width}x{image.height} ({pixels / 1e6:.0f} Mpx), above the limit of "
                f"{max_pixels / 1e6:.0f} Mpx; raise it with --max-input-pixels if you trust the file"
            )
        yield image
    finally:
        image.close()


def load_rgb(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """(H, W, 3) uint8 RGB: EXIF orientation applied; alpha composited over white; 16-bit scaled to 8."""
    from PIL import ImageOps

    with open_image(path, max_pixels) as image:
        try:
            image.load()
            image = ImageOps.exif_transpose(image)
            rgb = _to_rgb(image)
        except (OSError, SyntaxError, ValueError) as exc:
            raise InputImageError(f"'{path}' is damaged or cut short ({exc}); re-export it") from exc
    array = np.array(rgb, dtype=np.uint8)  # a writable copy (torch refuses read-only arrays)
    if array.ndim != 3 or array.shape[2] != 3:
        raise InputImageError(f"'{path}': could not convert mode {image.mode} to RGB")
    return array


def _to_rgb(image: Any) -> Any:
    from PIL import Image

    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        data = np.asarray(image, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or data.max() > 255 else 255.0
        return Image.fromarray(np.clip(data / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        data = np.asarray(image, dtype=np.float64)
        top = 1.0 if data.max() <= 1.0 else 255.0
        return Image.fromarray(np.clip(data / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "P":
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "RGBa", "La", "PA"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")
