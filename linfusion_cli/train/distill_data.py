"""Training data for `linfusion distill`: image + caption pairs found the common ways, decoded to square
crops, in a data order that depends only on the seed (so a resumed run reads exactly what it would have).

Accepted layouts:
  a folder with metadata.jsonl       diffusers' imagefolder: {"file_name": "a.png", "text": "..."} a line
  a folder of images with captions   kohya: a.png + a.txt (or a.caption) side by side, subfolders too
  a .jsonl or .csv file              a path and a caption per row (path: file_name/image/path; caption:
                                     text/caption/prompt); relative paths are relative to the file
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..base.errors import InputImageError, UsageError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
CAPTION_SUFFIXES = (".txt", ".caption")
METADATA_NAME = "metadata.jsonl"
PATH_KEYS = ("file_name", "image", "path")
CAPTION_KEYS = ("text", "caption", "prompt")
MAX_TRAIN_IMAGE_PIXELS = 200_000_000  # a training image larger than this is almost surely a mistake
HOLDOUT_STREAM = 2**31  # the held-out pick uses its own random stream, apart from every epoch's order


@dataclass(frozen=True)
class Sample:
    image: Path
    caption: str


def find_samples(data: str | Path) -> list[Sample]:
    """Every (image, caption) pair of `data`, sorted by image path; a clear UsageError when there are none."""
    source = Path(data).expanduser()
    if not source.exists():
        raise UsageError(f"--data '{data}' does not exist: give a folder of images with captions, or a .jsonl/.csv")
    if source.is_file():
        samples = _from_table(source)
    elif (source / METADATA_NAME).is_file():
        samples = _from_table(source / METADATA_NAME)
    else:
        samples = _from_folder(source)
    if not samples:
        raise UsageError(
            f"--data '{data}' holds no images with captions (looked for {METADATA_NAME}, or "
            f"{'/'.join(IMAGE_SUFFIXES)} files with a .txt beside each)"
        )
    return sorted(samples, key=lambda s: str(s.image))


def _from_folder(folder: Path) -> list[Sample]:
    try:
        images = [p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    except OSError as exc:
        raise UsageError(f"--data '{folder}' cannot be read: {exc.strerror or exc}") from exc
    samples, missing = [], []
    for image in images:
        caption_file = next((c for s in CAPTION_SUFFIXES if (c := image.with_suffix(s)).is_file()), None)
        if caption_file is None:
            missing.append(image)
            continue
        try:
            samples.append(Sample(image, caption_file.read_text(encoding="utf-8").strip()))
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"caption file '{caption_file}' cannot be read: {exc}") from exc
    if missing:
        raise UsageError(
            f"{len(missing)} of {len(images)} images in '{folder}' have no caption (e.g. '{missing[0]}' has no "
            f"'{missing[0].with_suffix('.txt').name}'); add a .txt beside each image, or a {METADATA_NAME}"
        )
    return samples


def _from_table(path: Path) -> list[Sample]:
    """Rows of a .jsonl (or metadata.jsonl) or .csv file; errors name the file and the line."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--data '{path}' cannot be read: {exc}") from exc
    suffix = path.suffix.lower()
    rows: list[tuple[int, dict[str, Any]]]
    if suffix == ".jsonl":
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise UsageError(f"{path}:{number}: not valid JSON ({exc})") from None
            if not isinstance(row, dict):
                raise UsageError(f"{path}:{number}: each line must be a JSON object")
            rows.append((number, row))
    elif suffix == ".csv":
        rows = [(n, dict(r)) for n, r in enumerate(csv.DictReader(text.splitlines()), start=2)]
    else:
        raise UsageError(f"--data '{path}': a data file must be .jsonl or .csv (or give a folder)")
    samples = []
    for number, row in rows:
        image_key = next((k for k in PATH_KEYS if row.get(k)), None)
        caption_key = next((k for k in CAPTION_KEYS if row.get(k) is not None), None)
        if image_key is None:
            raise UsageError(f"{path}:{number}: no image path (one of {', '.join(PATH_KEYS)})")
        if caption_key is None:
            raise UsageError(f"{path}:{number}: caption missing (one of {', '.join(CAPTION_KEYS)})")
        image = Path(str(row[image_key])).expanduser()
        samples.append(Sample(image if image.is_absolute() else path.parent / image, str(row[caption_key]).strip()))
    return samples


def load_square(path: Path, resolution: int) -> np.ndarray:
    """(3, R, R) float32 in [-1, 1]: shorter side resized to R (Lanczos), then centre-cropped."""
    from PIL import Image

    from ..io.images import load_rgb

    rgb = load_rgb(path, MAX_TRAIN_IMAGE_PIXELS)  # (H, W, 3) uint8; raises InputImageError
    height, width = rgb.shape[:2]
    scale = resolution / min(height, width)
    new_w, new_h = max(resolution, round(width * scale)), max(resolution, round(height * scale))
    image = Image.fromarray(rgb).resize((new_w, new_h), Image.Resampling.LANCZOS)
    left, top = (new_w - resolution) // 2, (new_h - resolution) // 2
    crop = np.asarray(image.crop((left, top, left + resolution, top + resolution)), dtype=np.float32)
    return crop.transpose(2, 0, 1) / 127.5 - 1.0  # (3, R, R)


def epoch_order(count: int, seed: int, epoch: int) -> np.ndarray:
    """The sample order of one epoch: a permutation fixed by (seed, epoch), the same on every machine."""
    return np.random.Generator(np.random.PCG64([seed, epoch])).permutation(count)


class DataStream:
    """Samples by global position: position p is sample `epoch_order(n, seed, p // n)[p % n]`.

    A run's whole data order is therefore a function of the seed; resuming needs only the position. An image
    that fails to decode is remembered and replaced by the next good one in the order (the batch keeps its
    size and every rank keeps the same positions); `skipped` names the files.
    """

    def __init__(self, samples: list[Sample], seed: int, resolution: int) -> None:
        self.samples = samples
        self.seed = seed
        self.resolution = resolution
        self.skipped: dict[int, str] = {}  # sample index -> why it could not be read
        self._orders: dict[int, np.ndarray] = {}

    def index_at(self, position: int) -> int:
        epoch, offset = divmod(position, len(self.samples))
        if epoch not in self._orders:
            self._orders = {epoch: epoch_order(len(self.samples), self.seed, epoch)}
        return int(self._orders[epoch][offset])

    def load(self, position: int) -> tuple[np.ndarray, str, int]:
        """(pixels, caption, sample index) at `position`, or at the next decodable position after it."""
        for probe in range(position, position + len(self.samples)):
            index = self.index_at(probe)
            if index in self.skipped:
                continue
            sample = self.samples[index]
            try:
                return load_square(sample.image, self.resolution), sample.caption, index
            except InputImageError as exc:
                self.skipped[index] = str(exc)
                log.warning("skipping %s: %s", sample.image, exc)
        raise UsageError(f"none of the {len(self.samples)} training images could be decoded, e.g. {self._example()}")

    def batch(self, positions: list[int]) -> tuple[np.ndarray, list[str]]:
        pixels, captions = [], []
        for position in positions:
            image, caption, _ = self.load(position)
            pixels.append(image)
            captions.append(caption)
        return np.stack(pixels), captions  # (B, 3, R, R)

    def _example(self) -> str:
        index, why = next(iter(self.skipped.items()))
        return f"'{self.samples[index].image}': {why}"


def split_holdout(samples: list[Sample], holdout: int, seed: int) -> tuple[list[Sample], list[Sample]]:
    """(training, held out): `holdout` samples picked by the seed, never trained on, for `--eval-only`."""
    if holdout <= 0:
        return samples, []
    if holdout >= len(samples):
        raise UsageError(f"--holdout {holdout} leaves nothing to train on ({len(samples)} samples); lower it")
    chosen = set(epoch_order(len(samples), seed, HOLDOUT_STREAM)[:holdout].tolist())
    train = [s for i, s in enumerate(samples) if i not in chosen]
    held = [s for i, s in enumerate(samples) if i in chosen]
    return train, held


def micro_batches(position: int, world: int, rank: int, batch_size: int, grad_accum: int) -> Iterator[list[int]]:
    """One rank's micro-batches from `position` on: an optimizer step reads batch x accum x world samples, and
    micro-batch m of rank r takes the r-th slice of the m-th block of batch x world."""
    while True:
        for micro in range(grad_accum):
            first = position + (micro * world + rank) * batch_size
            yield list(range(first, first + batch_size))
        position += batch_size * grad_accum * world


class Prefetcher:
    """Decodes the next micro-batch in a background thread while the current one trains. The batches and their
    order are those of reading `stream` in turn: one worker, one batch ahead."""

    def __init__(self, stream: DataStream, batches: Iterator[list[int]]) -> None:
        self._stream = stream
        self._batches = batches
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="linfusion-data")
        self._next: Future[tuple[np.ndarray, list[str]]] = self._pool.submit(stream.batch, next(batches))

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def get(self) -> tuple[np.ndarray, list[str]]:
        current = self._next.result()  # (B, 3, R, R), captions
        self._next = self._pool.submit(self._stream.batch, next(self._batches))
        return current
