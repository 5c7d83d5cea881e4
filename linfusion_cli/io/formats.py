"""Output file formats: one table of what each needs to write and read it back."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..base.errors import UsageError
from ..base.registry import Registry
from ..base.sizes import Target

FORMAT_ALIASES = {"jpg": "jpeg", "tif": "tiff"}


@dataclass(frozen=True)
class OutputFormat:
    """One output file format: everything the writers and readers need (metadata.py)."""

    name: str
    suffix: str
    pillow: str  # Pillow's format name (as `Image.format` reports it)
    metadata: str  # where the A1111 text goes: "png-text" chunks, "exif" UserComment, "tiff" ImageDescription
    max_side: int | None = None
    save_args: tuple[tuple[str, Any], ...] = ()


OUTPUT_FORMATS: Registry[OutputFormat] = Registry(
    "output format",
    [
        OutputFormat("png", ".png", "PNG", "png-text"),
        OutputFormat("jpeg", ".jpg", "JPEG", "exif", 65535, (("quality", 95), ("subsampling", 0))),
        OutputFormat("tiff", ".tif", "TIFF", "tiff"),
        OutputFormat("webp", ".webp", "WEBP", "exif", 16383, (("quality", 95), ("method", 4))),
    ],
)


def format_name(value: str) -> str:
    wanted = value.strip().lower().lstrip(".")
    return FORMAT_ALIASES.get(wanted, wanted)


def check_format_fits(fmt: str, target: Target) -> None:
    limit = OUTPUT_FORMATS.get(fmt).max_side
    if limit is not None and target.long_side > limit:
        raise UsageError(
            f"{fmt} cannot store {target.width}x{target.height}: at most {limit} px a side; use --format png or tiff"
        )
