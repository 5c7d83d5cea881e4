"""The fast PNG writer produces ordinary PNGs: pixels and text read back exactly by Pillow."""

from __future__ import annotations

import io
import zlib

import numpy as np
import pytest
from PIL import Image

import linfusion_cli.io.pngfast as pngfast


def roundtrip(array: np.ndarray, texts: dict[str, str]) -> Image.Image:
    buffer = io.BytesIO()
    pngfast.write_png(array, texts, buffer, threads=2)
    image = Image.open(io.BytesIO(buffer.getvalue()))
    image.load()
    return image


@pytest.mark.parametrize("shape", [(1, 1), (7, 5), (300, 17), (1031, 64)])  # several slices when tall
def test_pixels_and_text_survive(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(sum(shape))
    array = rng.integers(0, 256, size=(*shape, 3), dtype=np.uint8)
    image = roundtrip(array, {"parameters": "a fox\nSteps: 5", "linfusion": '{"prompt": "café ☕"}'})
    assert image.mode == "RGB" and image.size == (shape[1], shape[0])
    assert np.array_equal(np.asarray(image), array)
    assert image.text == {"parameters": "a fox\nSteps: 5", "linfusion": '{"prompt": "café ☕"}'}


def test_standard_zlib_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pngfast, "_deflate_lib", zlib)
    array = np.arange(600 * 40 * 3, dtype=np.uint32).astype(np.uint8).reshape(600, 40, 3)
    assert np.array_equal(np.asarray(roundtrip(array, {})), array)


def test_adler32_combine_matches_zlib() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.bytes(100_003), rng.bytes(70_001)
    assert pngfast.adler32_combine(zlib.adler32(a), zlib.adler32(b), len(b)) == zlib.adler32(a + b)
    assert pngfast.adler32_combine(1, zlib.adler32(b), len(b)) == zlib.adler32(b)


def test_rejects_wrong_arrays() -> None:
    with pytest.raises(ValueError, match="uint8"):
        pngfast.write_png(np.zeros((4, 4, 3), np.float32), {}, io.BytesIO())
    with pytest.raises(ValueError, match="uint8"):
        pngfast.write_png(np.zeros((4, 4, 4), np.uint8), {}, io.BytesIO())
