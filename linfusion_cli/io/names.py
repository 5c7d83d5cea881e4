"""Output file names: never from what a folder holds, safe on every file system, parseable back into a
batch job's index, seed and settings key."""

from __future__ import annotations

import re
import unicodedata

MAX_NAME_LENGTH = 120


SLUG_WORDS = 6


SLUG_LENGTH = 40


KEY_LENGTH = 8  # hex digits of the settings hash in names: 4 billion values per index, prompt and size


# Names Windows (and so SMB shares) will not create, whatever the extension.
WINDOWS_RESERVED = frozenset(
    ["CON", "PRN", "AUX", "NUL"] + [f"{p}{n}" for p in ("COM", "LPT") for n in "123456789"] + ["CONIN$", "CONOUT$"]
)


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


_BATCH_STEM = re.compile(rf"^(?P<index>\d{{5,}})_[a-z0-9-]*_(?P<seed>\d+)_\d+x\d+_(?P<key>[0-9a-f]{{{KEY_LENGTH}}})$")


def sanitize_name(text: str, max_length: int = MAX_NAME_LENGTH) -> str:
    """A file name stem that is safe everywhere: ASCII letters, digits, '.', '_', '-'; no separators, no
    leading dot (so no '..' or hidden files), no control characters, no Windows device name (CON, NUL...),
    bounded length. Never empty."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    stem = _UNSAFE.sub("-", ascii_text)
    stem = re.sub(r"-{2,}", "-", stem).strip("-._")
    stem = stem[:max_length].rstrip("-._")
    head, dot, tail = stem.partition(".")
    if head.upper() in WINDOWS_RESERVED:  # reserved with any extension: CON.txt is CON too
        stem = f"{head}_{dot}{tail}"[:max_length]
    return stem or "image"


def prompt_slug(prompt: str) -> str:
    words = re.findall(
        r"[a-z0-9]+", unicodedata.normalize("NFKD", prompt.lower()).encode("ascii", "ignore").decode("ascii")
    )
    slug = "-".join(words[:SLUG_WORDS])[:SLUG_LENGTH].strip("-")
    return slug or "image"


def output_stem(
    prompt: str,
    seed: int,
    width: int,
    height: int,
    *,
    key: str,
    name: str | None = None,
    index: int | None = None,
) -> str:
    """`name` (sanitised) if given, else [index_]slug_seed_WxH_key: never depends on what is in the folder, and
    two images that differ in any setting (steps, guidance, model...) never share a name."""
    if name:
        return sanitize_name(name)
    parts = ([f"{index:05d}"] if index is not None else []) + [
        prompt_slug(prompt),
        str(seed),
        f"{width}x{height}",
        key,
    ]
    return sanitize_name("_".join(parts))


def parse_batch_stem(stem: str) -> tuple[int, int, str] | None:
    """(index, seed, key) of an unnamed batch output's stem, or None."""
    match = _BATCH_STEM.match(stem)
    return (int(match["index"]), int(match["seed"]), match["key"]) if match else None
