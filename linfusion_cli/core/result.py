"""What a call made: the one result type of the Python API (and of the job runner the commands use).

Shaped like a diffusers pipeline's output: `images` is a list of PIL images, `image` the first. The pixels as
numpy arrays are `arrays`; each image's report (what `generate --json` prints: settings, seed, stages, timings,
the files) is in `reports`, the first in `report`. Made with `save=False`, nothing is written until `save()`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from PIL import Image

Saver = Callable[[], dict[str, Any]]  # writes one image's files; returns its report with their paths


@dataclass
class Result:
    """Images made by one call, with their reports; for a dry run, each job's plan (`report["plan"]`) and no
    image. See the module docstring."""

    reports: list[dict[str, Any]] = field(default_factory=list)
    arrays: list[np.ndarray] = field(default_factory=list)  # (H, W, 3) uint8 each
    pending: list[Saver | None] = field(default_factory=list)  # per image: its files still to write (save=False)

    @property
    def images(self) -> list[Image.Image]:
        """The images as PIL images (RGB), in the order of the prompts."""
        from PIL import Image

        return [Image.fromarray(array) for array in self.arrays]

    @property
    def image(self) -> Image.Image | None:
        """The first image (None for a dry run, on a process of a split image that does not write, or for a split
        image saved as it was made: its rows went into the file and were never whole, so read `path`)."""
        from PIL import Image

        return Image.fromarray(self.arrays[0]) if self.arrays else None

    @property
    def array(self) -> np.ndarray | None:
        """The first image as a (H, W, 3) uint8 array."""
        return self.arrays[0] if self.arrays else None

    @property
    def report(self) -> dict[str, Any]:
        return self.reports[0] if self.reports else {}

    @property
    def paths(self) -> list[Path]:
        """The image files written (none before `save()` for a result made with save=False)."""
        return [Path(r["path"]) for r in self.reports if "path" in r]

    @property
    def path(self) -> Path | None:
        paths = self.paths
        return paths[0] if paths else None

    @property
    def saved(self) -> bool:
        return not any(self.pending)

    def save(self) -> list[Path]:
        """Write what a save=False call kept in memory: each image with its metadata, then its sidecar, under
        the names and in the folder the call planned (as save=True would have). Returns the image files."""
        for i, saver in enumerate(self.pending):
            if saver is not None:
                self.reports[i] = saver()
                self.pending[i] = None
        return self.paths

    def extend(self, other: Result) -> None:
        """Another job's images and reports after these (a list of prompts)."""
        self.reports += other.reports
        self.arrays += other.arrays
        self.pending += other.pending
