"""Output sizes: sides in px (`4096`, `16k`, `WxH`), aspect ratios, and the target a request resolves to."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .errors import UsageError

MAX_SIDE = 65536


MIN_SIDE = 64


SIZE_MULTIPLE = 8  # the VAE's downscale: latents must have whole pixels


DEFAULT_SIZE = 2048
# The largest input image read unless --max-input-pixels says otherwise: 1 gigapixel (a 16384^2 image is 268 Mpx;
# Pillow's own guard stops at about 179 Mpx, docs/reference.md section 6).
DEFAULT_MAX_PIXELS = 1_000_000_000


PX_SUFFIX = {"k": 1024}  # 16k = 16384 px, as in "a 16K image"


def parse_px(value: Any) -> int:
    """A side in px: 4096, "4096", "4k" / "16K" (x1024) or "1.5k"; whole pixels only."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise TypeError(f"must be a whole number of px like 4096 or 16k, got {type(value).__name__} {value!r}")
    if isinstance(value, int):
        return value
    text = value.strip().lower()
    factor = PX_SUFFIX.get(text[-1:], 1)
    number = text[:-1] if factor != 1 else text
    try:
        px = float(number) * factor
    except ValueError:
        raise TypeError(f"must be a whole number of px like 4096 or 16k, got {value!r}") from None
    if not math.isfinite(px) or px != int(px):
        raise TypeError(f"must be a whole number of px like 4096 or 16k, got {value!r}")
    return int(px)


def is_two_sides(value: Any) -> bool:
    return isinstance(value, str) and "x" in value.lower()


def split_size(value: str) -> tuple[int, int]:
    """ "4096x2048" (or "8kx4k") -> (4096, 2048)."""
    parts = value.lower().split("x")
    problem = f"must be one side like 4096 or 16k, or WxH like 4096x2048, got {value!r}"
    if len(parts) != 2 or not all(part.strip() for part in parts):
        raise TypeError(problem)
    try:
        return parse_px(parts[0]), parse_px(parts[1])
    except TypeError:
        raise TypeError(problem) from None


def parse_aspect(text: str) -> tuple[float, float]:
    """'16:9' (or '16x9', or one number like '1.5') -> (16.0, 9.0); both parts positive and finite."""
    raw = text.strip().lower().replace("x", ":")
    parts = raw.split(":") if ":" in raw else [raw, "1"]
    try:
        w, h = (float(p) for p in parts)
    except ValueError:
        raise UsageError(f"aspect '{text}' is not W:H (for example 16:9)") from None
    if len(parts) != 2 or not (math.isfinite(w) and math.isfinite(h)) or w <= 0 or h <= 0:
        raise UsageError(f"aspect '{text}' needs two positive numbers W:H (for example 16:9)")
    if max(w / h, h / w) > 64:
        raise UsageError(f"aspect '{text}' is more extreme than 64:1")
    return w, h


def round_side(value: float) -> int:
    return max(SIZE_MULTIPLE, math.floor(value / SIZE_MULTIPLE + 0.5) * SIZE_MULTIPLE)


@dataclass(frozen=True)
class Target:
    width: int
    height: int
    note: str | None = None  # set when the request was rounded

    @property
    def long_side(self) -> int:
        return max(self.width, self.height)


def resolve_target(
    size: int | None,
    aspect: str = "1:1",
    width: int | None = None,
    height: int | None = None,
    default_size: int = DEFAULT_SIZE,
) -> Target:
    """Output dimensions (multiples of 8) from --size/--aspect or --width/--height, refusing impossible ones."""
    for label, value in (("size", size), ("width", width), ("height", height)):
        if value is not None and not MIN_SIDE <= value <= MAX_SIDE:
            raise UsageError(f"--{label} {value} is impossible: it must be between {MIN_SIDE} and {MAX_SIDE} px")
    if size is not None and (width is not None or height is not None):
        raise UsageError("give either --size (with --aspect) or --width/--height, not both")
    aw, ah = parse_aspect(aspect)
    if width is not None and height is not None:
        want_w, want_h = float(width), float(height)
    elif width is not None:
        want_w, want_h = float(width), width * ah / aw
    elif height is not None:
        want_w, want_h = height * aw / ah, float(height)
    else:
        long_side = float(size if size is not None else default_size)
        want_w, want_h = (long_side, long_side * ah / aw) if aw >= ah else (long_side * aw / ah, long_side)
    w, h = round_side(want_w), round_side(want_h)
    if min(w, h) < MIN_SIDE:
        raise UsageError(f"{w}x{h} is too small: each side must be at least {MIN_SIDE} px")
    if max(w, h) > MAX_SIDE:
        raise UsageError(f"{w}x{h} is too large: each side must be at most {MAX_SIDE} px")
    note = None
    if abs(w - want_w) > 1e-6 or abs(h - want_h) > 1e-6:
        note = f"requested {want_w:.0f}x{want_h:.0f} rounded to {w}x{h} (sides must be multiples of {SIZE_MULTIPLE})"
    return Target(w, h, note)
