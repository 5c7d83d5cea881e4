"""Output files: names, formats, A1111-style metadata, JSON sidecars, and writes that never leave a torn file.

Every write goes to a temporary file in the destination folder, is fsynced, then renamed into place; the
sidecar is written last, so "image + sidecar present and consistent" means "this job finished".
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from .config import A1111_SAMPLERS, FORMAT_SUFFIX
from .errors import OutputError

MAX_NAME_LENGTH = 120
SLUG_WORDS = 6
SLUG_LENGTH = 40
SIDECAR_SUFFIX = ".json"
TEMP_MARKER = ".part-"
# A1111's sampler names, so viewers that parse the `parameters` chunk recognise ours.
PNG_TEXT_KEY = "parameters"
PNG_JSON_KEY = "linfusion"
EXIF_IFD = 0x8769
EXIF_USER_COMMENT = 0x9286
TIFF_DESCRIPTION = 270
_UNICODE_PREFIX = b"UNICODE\x00"
_ASCII_PREFIX = b"ASCII\x00\x00\x00"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


# --- names ------------------------------------------------------------------------------------------------


def sanitize_name(text: str, max_length: int = MAX_NAME_LENGTH) -> str:
    """A file name stem that is safe everywhere: ASCII letters, digits, '.', '_', '-'; no separators, no
    leading dot (so no '..' or hidden files), no control characters, bounded length. Never empty."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    stem = _UNSAFE.sub("-", ascii_text)
    stem = re.sub(r"-{2,}", "-", stem).strip("-._")
    stem = stem[:max_length].rstrip("-._")
    return stem or "image"


def prompt_slug(prompt: str) -> str:
    words = re.findall(
        r"[a-z0-9]+", unicodedata.normalize("NFKD", prompt.lower()).encode("ascii", "ignore").decode("ascii")
    )
    slug = "-".join(words[:SLUG_WORDS])[:SLUG_LENGTH].strip("-")
    return slug or "image"


def output_stem(
    prompt: str, seed: int, width: int, height: int, *, name: str | None = None, index: int | None = None
) -> str:
    """`name` (sanitised) if given, else [index_]slug_seed_WxH: never depends on what is in the folder."""
    if name:
        return sanitize_name(name)
    parts = ([f"{index:05d}"] if index is not None else []) + [prompt_slug(prompt), str(seed), f"{width}x{height}"]
    return sanitize_name("_".join(parts))


def inside(folder: Path, path: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


@dataclass(frozen=True)
class OutputPaths:
    image: Path
    sidecar: Path

    @classmethod
    def for_stem(cls, folder: Path, stem: str, fmt: str) -> OutputPaths:
        image = folder / f"{stem}{FORMAT_SUFFIX[fmt]}"
        sidecar = folder / f"{stem}{SIDECAR_SUFFIX}"
        for path in (image, sidecar):
            if not inside(folder, path):
                raise OutputError(f"refusing to write {path}: outside the output folder {folder}")
        return cls(image, sidecar)

    def complete(self) -> bool:
        """Image and sidecar both present, and the sidecar vouches for this exact image file."""
        try:
            meta = json.loads(self.sidecar.read_text(encoding="utf-8"))
            return bool(meta.get("complete")) and self.image.stat().st_size == meta["file"]["bytes"]
        except (OSError, ValueError, KeyError, TypeError):
            return False


def prepare_folder(folder: Path) -> Path:
    """Create the output folder if needed and prove it is writable, before any model loads."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create output folder {folder}: {exc.strerror or exc}") from exc
    if not folder.is_dir():
        raise OutputError(f"output path {folder} exists and is not a folder")
    probe = folder / f"{TEMP_MARKER}probe-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise OutputError(f"output folder {folder} is not writable: {exc.strerror or exc}") from exc
    return folder


def clean_stale_temps(folder: Path) -> int:
    """Remove temp files left by a killed run (only ours: they carry TEMP_MARKER)."""
    removed = 0
    for path in folder.glob(f".*{TEMP_MARKER}*"):
        with contextlib.suppress(OSError):
            path.unlink()
            removed += 1
    return removed


# --- atomic writes ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[IO[bytes]]:
    """Write to a temp file beside `path`, fsync, rename into place; on any failure remove the temp file."""
    temp = path.with_name(f".{path.name}{TEMP_MARKER}{os.getpid()}")
    try:
        with os.fdopen(_create_exclusive(temp), "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)  # replaces a link at `path` itself, never what it points to
    except BaseException as exc:
        with contextlib.suppress(OSError):
            temp.unlink()
        if isinstance(exc, OSError):
            raise OutputError(f"could not write {path}: {exc.strerror or exc}") from exc
        raise
    _fsync_dir(path.parent)


def _create_exclusive(temp: Path) -> int:
    """Create the temp file anew: never follow a link planted at its name, never append to a stale one."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    try:
        return os.open(temp, flags, 0o644)
    except FileExistsError:
        temp.unlink()  # a leftover of ours (or a planted link): remove the entry itself, then create afresh
        return os.open(temp, flags, 0o644)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    with atomic_file(path) as handle:
        handle.write(data)


# --- metadata ---------------------------------------------------------------------------------------------


def a1111_parameters(meta: dict[str, Any]) -> str:
    """The AUTOMATIC1111 `parameters` text: prompt line, `Negative prompt:` line, then key: value pairs."""
    s = meta["settings"]
    stages = ", ".join(
        st["size"] + ("" if st["strength"] is None else f"@{st['strength']:g}") for st in meta.get("stages", [])
    )
    fields = [
        ("Steps", s["steps"]),
        ("Sampler", A1111_SAMPLERS.get(s["scheduler"], s["scheduler"])),
        ("CFG scale", f"{s['guidance']:g}"),
        ("Seed", meta["seed"]),
        ("Size", f"{meta['width']}x{meta['height']}"),
        *([("Model hash", meta["model_hash"])] if meta.get("model_hash") else []),
        ("Model", meta["model"]),
        *_denoising_strength(meta.get("stages", [])),
        ("LinFusion", meta["linfusion"]),
        ("Stages", f'"{stages}"'),
        *_refine_fields(s),
        *_lora_fields(meta),
        ("Version", f"linfusion {meta['versions']['linfusion']}"),
    ]
    loras = [a for a in meta.get("adapters", []) if a.get("kind") == "lora"]
    # A1111 keeps a LoRA as a <lora:name:weight> tag in the prompt; its readers find the LoRA there.
    lines = [" ".join([s["prompt"], *(f"<lora:{a['name']}:{a['scale']:g}>" for a in loras)])]
    if s.get("negative"):
        lines.append(f"Negative prompt: {s['negative']}")
    lines.append(", ".join(f"{k}: {v}" for k, v in fields))
    return "\n".join(lines)


def _denoising_strength(stages: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """A1111's img2img field: the first (strongest) refine stage's strength, if any stage refines."""
    strengths = [st["strength"] for st in stages if st.get("strength") is not None]
    return [("Denoising strength", f"{strengths[0]:g}")] if strengths else []


def _lora_fields(meta: dict[str, Any]) -> list[tuple[str, str]]:
    """A1111's `Lora hashes: "name: hash, ..."` for the LoRAs read from files."""
    hashed = [
        f"{a['name']}: {a['hash']}" for a in meta.get("adapters", []) if a.get("kind") == "lora" and a.get("hash")
    ]
    return [("Lora hashes", f'"{", ".join(hashed)}"')] if hashed else []


def _refine_fields(settings: dict[str, Any]) -> list[tuple[str, str]]:
    """The refine method, named with its parameters where it has any (absent in sidecars before it existed)."""
    method = settings.get("refine", "sdedit")
    if method != "demofusion":
        return [("Refine", method)]
    params = (
        f"cosine scales {settings['cosine_scale_1']:g}/{settings['cosine_scale_2']:g}/{settings['cosine_scale_3']:g}"
        f", sigma {settings['gaussian_sigma']:g}"
    )
    return [("Refine", f'"demofusion ({params})"')]


def _user_comment(text: str) -> bytes:
    try:
        return _ASCII_PREFIX + text.encode("ascii")
    except UnicodeEncodeError:
        return _UNICODE_PREFIX + text.encode("utf-16-be")


def _decode_user_comment(raw: Any) -> str | None:
    if isinstance(raw, str):
        return raw
    if not isinstance(raw, bytes):
        return None
    if raw.startswith(_UNICODE_PREFIX):
        body = raw[len(_UNICODE_PREFIX) :]
        return body.decode(
            "utf-16-le" if body[:1] != b"\x00" and body[1:2] == b"\x00" else "utf-16-be", errors="replace"
        )
    return raw[8:].decode("utf-8", errors="replace")


def encode_image(
    array: np.ndarray,
    fmt: str,
    parameters: str,
    settings_json: str,
    png_writer: Callable[[np.ndarray, dict[str, str], IO[bytes]], None] | None = None,
    handle: IO[bytes] | None = None,
) -> bytes | None:
    """Encode (H, W, 3) uint8 with metadata, into `handle` (or return the bytes)."""
    from PIL import Image

    out: IO[bytes] = handle if handle is not None else io.BytesIO()
    if fmt == "png":
        from .pngfast import write_png

        (png_writer or write_png)(array, {PNG_TEXT_KEY: parameters, PNG_JSON_KEY: settings_json}, out)
    else:
        image = Image.fromarray(array, "RGB")
        if fmt == "tiff":
            image.save(out, format="TIFF", tiffinfo={TIFF_DESCRIPTION: parameters})
        else:
            exif = Image.Exif()
            exif.get_ifd(EXIF_IFD)[EXIF_USER_COMMENT] = _user_comment(parameters)
            if fmt == "jpeg":
                image.save(out, format="JPEG", quality=95, subsampling=0, exif=exif.tobytes())
            else:
                image.save(out, format="WEBP", quality=95, method=4, exif=exif.tobytes())
    if handle is None:
        assert isinstance(out, io.BytesIO)
        return out.getvalue()
    return None


def read_metadata(path: Path, max_pixels: int = 1_000_000_000) -> dict[str, Any]:
    """The metadata we (or A1111) wrote into an image: {'parameters': str|None, 'linfusion': dict|None}."""
    from .images import open_image

    with open_image(path, max_pixels) as image:
        info: dict[str, Any] = {
            "format": image.format,
            "size": f"{image.width}x{image.height}",
            "parameters": None,
            "linfusion": None,
        }
        text = getattr(image, "text", None) or {}
        if image.format == "PNG":
            info["parameters"] = text.get(PNG_TEXT_KEY) or image.info.get(PNG_TEXT_KEY)
            raw_json = text.get(PNG_JSON_KEY) or image.info.get(PNG_JSON_KEY)
            if raw_json:
                with contextlib.suppress(ValueError):
                    info["linfusion"] = json.loads(raw_json)
        elif image.format == "TIFF":
            info["parameters"] = image.tag_v2.get(TIFF_DESCRIPTION)  # type: ignore[attr-defined]
        else:
            exif = image.getexif()
            raw = exif.get_ifd(EXIF_IFD).get(EXIF_USER_COMMENT)
            info["parameters"] = _decode_user_comment(raw)
    return info
