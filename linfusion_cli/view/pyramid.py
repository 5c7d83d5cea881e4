"""Tile pyramids (Deep Zoom layout) and thumbnails, cut by libvips.

libvips reads the image sequentially in strips and writes every level's tiles as the strips pass (encoding tiles on
all cores; a PNG's decoder itself is serial), so a 16384x16384 PNG (805 MB of pixels) becomes a pyramid in about
7 s with a resident set of about 170 MB: the image is never whole in memory, here or in Python. pyvips is imported inside the functions, not at module level, so that
`linfusion --help` and every other command start without loading libvips.

Layout (what OpenSeadragon's DZI tile source reads): `NAME.dzi` and `NAME_files/LEVEL/COL_ROW.jpg`, where level L
is the image shrunk by 2^(top - L), down to level 0 at 1x1 pixel, and tiles are TILE_SIZE px plus OVERLAP px
borders shared with their neighbours.
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..base.errors import UsageError

# 510 + 2 x 1 px overlap = 512 px tiles: a quarter of the files of the classic 254 px tiles (a 16K image makes
# 1,508 files instead of 5,600), still small enough for a viewer to refine a screen in a few tiles.
TILE_SIZE = 510
OVERLAP = 1
TILE_QUALITY = 85  # JPEG/WebP Q: no visible loss at 1:1 zoom, a tenth of the PNG's size
TILE_FORMATS = {"jpeg": "jpg", "webp": "webp"}  # --tiles value -> file suffix (the DZI's Format)
# Contact-sheet thumbnails' long side: the one-tile level (see make_thumbnail) is never smaller (its double would
# fit a tile too), so a thumbnail is always a shrink, never an enlargement.
THUMB_SIDE = TILE_SIZE // 2 + 1
THUMB_QUALITY = 80
PART_PREFIX = "_part-"  # a pyramid being cut: `_part-PID-NAME.dzi` and `_part-PID-NAME_files/`
WHITE_8, WHITE_16 = 255, 65535  # the background an alpha channel is flattened onto
INSTALL_HINT = "linfusion view needs libvips: pip install 'linfusion-cli[view]'"


class ImageUnreadable(Exception):
    """An image libvips cannot read to the end (truncated, damaged, not an image); the message says why."""


@dataclass(frozen=True)
class Pyramid:
    """A Deep Zoom pyramid's geometry: what a DZI file says, and what follows from it."""

    width: int
    height: int
    tile_size: int = TILE_SIZE
    overlap: int = OVERLAP
    format: str = "jpg"

    @property
    def top_level(self) -> int:
        """The full-size level: levels halve (rounding up) from here down to 1x1 at level 0."""
        return math.ceil(math.log2(max(self.width, self.height, 1)))

    def level_size(self, level: int) -> tuple[int, int]:
        scale = 2 ** (self.top_level - level)
        return math.ceil(self.width / scale), math.ceil(self.height / scale)

    def tile_grid(self, level: int) -> tuple[int, int]:
        """(columns, rows) of tiles at `level`."""
        width, height = self.level_size(level)
        return math.ceil(width / self.tile_size), math.ceil(height / self.tile_size)

    def tile_count(self) -> int:
        return sum(cols * rows for cols, rows in map(self.tile_grid, range(self.top_level + 1)))

    def one_tile_level(self) -> int:
        """The largest level that is a single tile: the whole picture at up to TILE_SIZE px, for thumbnails."""
        return max(level for level in range(self.top_level + 1) if self.tile_grid(level) == (1, 1))

    def tile_source(self, url: str) -> dict[str, Any]:
        """OpenSeadragon's inline DZI tile source: the same facts as the .dzi file, so a page opened from
        file:// needs no XMLHttpRequest (browsers block those there) before loading tiles by <img>."""
        return {
            "Image": {
                "xmlns": "http://schemas.microsoft.com/deepzoom/2008",
                "Url": url,
                "Format": self.format,
                "Overlap": str(self.overlap),
                "TileSize": str(self.tile_size),
                "Size": {"Width": str(self.width), "Height": str(self.height)},
            }
        }

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_pyvips() -> Any:
    """pyvips, or one line that says how to install it (the `view` extra ships libvips as a binary wheel)."""
    try:
        import pyvips  # lazy: keeps libvips out of every other command's start-up
    except (ImportError, OSError) as exc:  # OSError: pyvips installed but libvips itself not loadable
        raise UsageError(f"{INSTALL_HINT} ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    return pyvips


def _vips_error(exc: Exception) -> str:
    """libvips's messages are several lines of which the last names the cause ("libpng read error")."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def cut_pyramid(image: Path, base: Path, tiles: str = "jpeg") -> Pyramid:
    """Cut `image` into the pyramid `base.dzi` + `base_files/`, streaming; a damaged image raises ImageUnreadable.

    Tiles go to a temporary folder renamed into place at the end, so a damaged image or a killed run never
    leaves a half pyramid under the final name (a viewer would show grey holes)."""
    pyvips = load_pyvips()
    suffix = TILE_FORMATS[tiles]
    part = base.with_name(f"{PART_PREFIX}{os.getpid()}-{base.name}")  # no dot: libvips would take it for a suffix
    shutil.rmtree(part.with_name(part.name + "_files"), ignore_errors=True)
    try:
        # fail_on="truncated": a cut-off PNG is an error, not an image with a grey bottom
        picture = pyvips.Image.new_from_file(str(image), access="sequential", fail_on="truncated")
        picture = _displayable(picture)
        picture.dzsave(
            str(part), suffix=f".{suffix}[Q={TILE_QUALITY}]", tile_size=TILE_SIZE, overlap=OVERLAP, keep="none"
        )
    except pyvips.Error as exc:
        shutil.rmtree(part.with_name(part.name + "_files"), ignore_errors=True)
        part.with_name(part.name + ".dzi").unlink(missing_ok=True)
        raise ImageUnreadable(_vips_error(exc)) from None
    (part.with_name(part.name + "_files") / "vips-properties.xml").unlink(missing_ok=True)  # libvips's notes, unused
    final_files = base.with_name(base.name + "_files")
    shutil.rmtree(final_files, ignore_errors=True)
    os.replace(part.with_name(part.name + "_files"), final_files)
    os.replace(part.with_name(part.name + ".dzi"), base.with_name(base.name + ".dzi"))
    return Pyramid(picture.width, picture.height, format=suffix)


def _displayable(picture: Any) -> Any:
    """8-bit sRGB without alpha: what JPEG tiles hold and browsers show (16-bit or RGBA PNGs are valid input)."""
    if picture.hasalpha():
        white = WHITE_16 if picture.format == "ushort" else WHITE_8
        picture = picture.flatten(background=[white] * (picture.bands - 1))
    if picture.format != "uchar" or picture.interpretation not in ("srgb", "b-w"):
        picture = picture.colourspace("srgb")  # 16-bit, CMYK, scRGB -> 8-bit sRGB
    return picture


def make_thumbnail(pyramid: Pyramid, files: Path, out: Path) -> None:
    """A THUMB_SIDE px JPEG made from the pyramid's one-tile level, not from the full image (which would mean
    decoding a 16K PNG a second time): that tile is the whole picture at 256-510 px on its long side."""
    pyvips = load_pyvips()
    tile = files / str(pyramid.one_tile_level()) / f"0_0.{pyramid.format}"
    thumb = pyvips.Image.thumbnail(str(tile), THUMB_SIDE, size="down")
    part = out.with_name(f".{out.name}.part-{os.getpid()}")
    thumb.jpegsave(str(part), Q=THUMB_QUALITY, keep="none")
    os.replace(part, out)
