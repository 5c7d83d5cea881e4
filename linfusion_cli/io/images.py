"""Reading input images safely: our own pixel cap instead of Pillow's bomb error, clear errors for files that
are not images or are cut short, and every common mode converted to 8-bit RGB with EXIF rotation applied."""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..base.errors import InputImageError
from ..base.sizes import DEFAULT_MAX_PIXELS
from ..base.text import quote
from .files import open_regular

# No image format needs more than 16 bytes a pixel (RGBA, 32-bit float); headers and metadata on top.
MAX_BYTES_PER_PIXEL = 16
MAX_METADATA_BYTES = 64 << 20
_PILLOW_CAP = threading.RLock()


@contextlib.contextmanager
def _pillow_pixel_cap(max_pixels: int) -> Iterator[None]:
    """Pillow's bomb guard (a module global, raised from ~179 Mpx: below a 16K image) moved to our cap while we
    open and decode, then put back: a library user's own guard is never switched off."""
    from PIL import Image

    with _PILLOW_CAP, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        previous = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = max_pixels
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = previous


@contextlib.contextmanager
def open_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Iterator[Any]:
    """Open lazily (header only) and refuse more than `max_pixels` before decoding anything."""
    from PIL import Image, UnidentifiedImageError

    name = quote(str(path))
    limit = max_pixels * MAX_BYTES_PER_PIXEL + MAX_METADATA_BYTES
    with open_regular(path, limit, "image", InputImageError) as handle, _pillow_pixel_cap(max_pixels):
        try:
            image = Image.open(handle)
        except UnidentifiedImageError:
            raise InputImageError(f"{name} is not an image Pillow can read (PNG, JPEG, WebP, TIFF, BMP...)") from None
        except Image.DecompressionBombError:  # Pillow's guard, at twice our cap: the size is not known here
            raise InputImageError(
                f"{name} is above the limit of {_mpx(max_pixels)}; raise it with --max-input-pixels if you trust "
                "the file"
            ) from None
        except (OSError, SyntaxError, ValueError) as exc:
            raise InputImageError(f"cannot read image {name}: {quote(str(exc))}") from None
        try:
            pixels = image.width * image.height
            if pixels > max_pixels:
                raise InputImageError(
                    f"{name} is {image.width}x{image.height} ({_mpx(pixels)}), above the limit of "
                    f"{_mpx(max_pixels)}; raise it with --max-input-pixels if you trust the file"
                )
            yield image
        finally:
            image.close()


def _mpx(pixels: int) -> str:
    return f"{pixels / 1e6:.3g} Mpx"


def load_rgb(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """(H, W, 3) uint8 RGB: EXIF orientation applied; alpha composited over white; 16-bit scaled to 8."""
    from PIL import ImageOps

    with open_image(path, max_pixels) as image:
        try:
            image.load()
            image = ImageOps.exif_transpose(image)
            rgb = _to_rgb(image)
        except (OSError, SyntaxError, ValueError) as exc:
            raise InputImageError(
                f"{quote(str(path))} is damaged or cut short ({quote(str(exc))}); re-export it"
            ) from exc
    array = np.array(rgb, dtype=np.uint8)  # a writable copy (torch refuses read-only arrays)
    if array.ndim != 3 or array.shape[2] != 3:
        raise InputImageError(f"{quote(str(path))}: could not convert mode {image.mode} to RGB")
    return array


def pixels_of(image: Any, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """An image given in memory -> (H, W, 3) uint8 RGB, as `load_rgb` reads a file: a PIL image (any mode, alpha
    over white), or an array (H, W, 3) or (H, W) of uint8, or of floats in [0, 1]."""
    from PIL import Image

    if isinstance(image, Image.Image):
        array = np.array(_to_rgb(image), dtype=np.uint8)
    elif isinstance(image, np.ndarray):
        array = _array_rgb(image)
    else:
        raise InputImageError(f"an image must be a file path, a PIL image or a numpy array, not {type(image).__name__}")
    if array.shape[0] * array.shape[1] > max_pixels:
        raise InputImageError(f"the image is {array.shape[1]}x{array.shape[0]}, above the limit of {_mpx(max_pixels)}")
    return array


def _array_rgb(array: np.ndarray) -> np.ndarray:
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] != 3:
        raise InputImageError(f"an image array must be (H, W, 3) or (H, W), not {tuple(array.shape)}")
    if array.dtype == np.uint8:
        return np.array(array)  # a writable copy
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
            raise InputImageError("a float image array must hold values in [0, 1]")
        return (array * 255.0 + 0.5).astype(np.uint8)
    raise InputImageError(f"an image array must be uint8, or floats in [0, 1]; not {array.dtype}")


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
