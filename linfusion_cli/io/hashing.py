"""AUTOMATIC1111's short model hash: the first 10 hex digits of the checkpoint file's sha256 ("Model hash" in
the `parameters` text, which image browsers and Civitai match against). Hashing a 7 GB SDXL file takes
seconds, so hashes are cached on disk by path, size and modification time, as A1111 does."""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path

from ..base.errors import UsageError

SHORT_HASH_CHARS = 10
CACHE_FILE = "model-hashes.json"
READ_BYTES = 1 << 24


def cache_path() -> Path:
    home = os.environ.get("LINFUSION_HOME")
    base = Path(home) if home else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "linfusion"
    return base / CACHE_FILE


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(READ_BYTES):
            digest.update(block)
    return digest.hexdigest()


@functools.lru_cache(maxsize=256)
def _content_digest(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(Path(path))


def content_digest(path: str | Path) -> str:
    """The sha256 of a file's bytes (an input image's: two images at one path are two inputs), remembered per
    path, size and modification time within a run; a file that cannot be read is a UsageError naming it."""
    try:
        info = os.stat(path)
        return _content_digest(str(Path(path).resolve()), info.st_size, info.st_mtime_ns)
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None


def model_hash(model: str) -> str | None:
    """The short hash of a single-file checkpoint; None for hub ids, folders and built-in models."""
    path = Path(model).expanduser()
    if not path.is_file():
        return None
    path = path.resolve()
    stat = path.stat()
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
    cache = _read_cache()
    if key not in cache:
        cache[key] = sha256_file(path)
        _write_cache(cache)
    return cache[key][:SHORT_HASH_CHARS]


def _read_cache() -> dict[str, str]:
    try:
        data = json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}  # no cache yet, or a damaged one: hash again
    return (
        {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, str)} if isinstance(data, dict) else {}
    )


def _write_cache(cache: dict[str, str]) -> None:
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        temp.write_text(json.dumps(cache, indent=1, sort_keys=True))
        os.replace(temp, path)
    except OSError:
        pass  # a read-only home only costs hashing again next time
