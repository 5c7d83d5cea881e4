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


class Strips:
    """Rows that come a strip at a time, of uneven heights (as a split image's processes hold them)."""

    def __init__(self, array: np.ndarray, heights: list[int]) -> None:
        self.array, self.heights = array, heights
        self.height, self.width = array.shape[:2]

    def strips(self):  # type: ignore[no-untyped-def]
        start = 0
        for height in self.heights:
            yield self.array[start : start + height]
            start += height

    def whole(self) -> np.ndarray:
        return self.array


def test_rows_streamed_in_strips_make_the_same_file() -> None:
    rng = np.random.default_rng(3)
    array = rng.integers(0, 256, size=(1300, 9, 3), dtype=np.uint8)  # 6 slices: more than 2 per thread in flight
    whole, streamed = io.BytesIO(), io.BytesIO()
    pngfast.write_png(array, {"parameters": "a fox"}, whole, threads=1)
    pngfast.write_png_rows(Strips(array, [1, 255, 300, 3, 600, 141]), {"parameters": "a fox"}, streamed, threads=1)
    assert streamed.getvalue() == whole.getvalue()
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(streamed.getvalue()))), array)


def test_rows_that_stop_short_or_run_over_are_refused() -> None:
    array = np.zeros((300, 4, 3), np.uint8)
    with pytest.raises(ValueError, match="got 299 of its 300 rows"):
        pngfast.write_png_rows(Strips(array, [299]), {}, io.BytesIO())
    taller = Strips(np.zeros((301, 4, 3), np.uint8), [200, 101])
    taller.height = 300
    with pytest.raises(ValueError, match="more than the image's 300 rows"):
        pngfast.write_png_rows(taller, {}, io.BytesIO())
