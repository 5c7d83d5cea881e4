"""Output files: names, formats, A1111-style metadata, JSON sidecars, and writes that never leave a torn file.

Every write goes to a temporary file in the destination folder, is fsynced, then renamed into place; the
sidecar is written last, so "image + sidecar present and consistent" means "this job finished".
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import re
import stat
import time
import unicodedata
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from ..core.config import A1111_SAMPLERS, OUTPUT_FORMATS
from ..core.errors import DiskFullError, InputImageError, LinFusionError, OutputError, OutputFolderError
from .files import load_json, quote, read_regular
from .locks import host_name, lock_fd, pid_alive

MAX_NAME_LENGTH = 120
SLUG_WORDS = 6
SLUG_LENGTH = 40
SIDECAR_SUFFIX = ".json"  # appended to the image's whole name: x.png.json, so formats never share one
MAX_SIDECAR_BYTES = 16 << 20
TEMP_MARKER = ".part-"
STALE_FOREIGN_TEMP_SECONDS = 60  # another host's unlocked temp file: stale once this old (see clean_stale_temps)
KEY_LENGTH = 8  # hex digits of the settings hash in names: 4 billion values per index, prompt and size
# Settings that do not decide an image's pixels (the size is hashed as the resolved width x height, the seed
# apart). Every other setting does, including ones added later: a new setting can only split names, never
# merge two different images under one.
NOT_IMAGE_SETTINGS = frozenset(
    ("seed", "name", "format", "preset", "size", "aspect", "width", "height", "vae_tile", "low_vram", "max_vram")
)
DEMOFUSION_SETTINGS = frozenset(("cosine_scale_1", "cosine_scale_2", "cosine_scale_3", "gaussian_sigma"))
# Names Windows (and so SMB shares) will not create, whatever the extension.
WINDOWS_RESERVED = frozenset(
    ["CON", "PRN", "AUX", "NUL"] + [f"{p}{n}" for p in ("COM", "LPT") for n in "123456789"] + ["CONIN$", "CONOUT$"]
)
ENOSPC_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
PNG_TEXT_KEY = "parameters"
PNG_JSON_KEY = "linfusion"
EXIF_IFD = 0x8769
EXIF_USER_COMMENT = 0x9286
TIFF_DESCRIPTION = 270
_UNICODE_PREFIX = b"UNICODE\x00"
_ASCII_PREFIX = b"ASCII\x00\x00\x00"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_BATCH_STEM = re.compile(rf"^(?P<index>\d{{5,}})_[a-z0-9-]*_(?P<seed>\d+)_\d+x\d+_(?P<key>[0-9a-f]{{{KEY_LENGTH}}})$")


# --- names ------------------------------------------------------------------------------------------------


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


def settings_key(settings: Mapping[str, Any], width: int, height: int, seed: int | None) -> str:
    """A short hash of what decides the image: its settings, size and seed (None: a seed drawn at random, so
    that a rerun recognises the job whatever seed the last run drew). Names, resume and replay all use it."""
    chosen = {k: v for k, v in settings.items() if k not in NOT_IMAGE_SETTINGS and v is not None}
    if chosen.get("refine", "sdedit") != "demofusion":  # its parameters change nothing under another method
        chosen = {k: v for k, v in chosen.items() if k not in DEMOFUSION_SETTINGS}
    text = json.dumps({**chosen, "size": [width, height], "seed": seed}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:KEY_LENGTH]


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


def inside(folder: Path, path: Path) -> bool:
    """`path` is an entry directly in `folder`. The entry itself is not resolved: a link planted at an output name
    is replaced by the rename, never written through."""
    return path.name not in ("", ".", "..") and path.parent.resolve() == folder.resolve()


@dataclass(frozen=True)
class OutputPaths:
    image: Path
    sidecar: Path

    @classmethod
    def for_stem(cls, folder: Path, stem: str, fmt: str) -> OutputPaths:
        image = folder / f"{stem}{OUTPUT_FORMATS[fmt].suffix}"
        sidecar = folder / f"{image.name}{SIDECAR_SUFFIX}"
        for path in (image, sidecar):
            if not inside(folder, path):
                raise OutputError(f"refusing to write {path}: outside the output folder {folder}")
        return cls(image, sidecar)

    def problem(self) -> str | None:
        """Why these names cannot be written (something other than a file sits there), or None."""
        for path in (self.image, self.sidecar):
            try:
                mode = os.lstat(path).st_mode
            except FileNotFoundError:
                continue
            except OSError as exc:
                return f"cannot check {path}: {exc.strerror or exc}"
            if stat.S_ISLNK(mode):
                return f"{path} is a symbolic link; remove it (or choose another name) so the job can write there"
            if not stat.S_ISREG(mode):
                return f"{path} exists and is not a file (a folder or device); move it away"
        return None

    def sidecar_data(self) -> dict[str, Any] | None:
        """The sidecar's JSON object, or None if it is missing, not a regular file, too large or not JSON."""
        try:
            data = load_json(read_regular(self.sidecar, MAX_SIDECAR_BYTES, "sidecar").decode("utf-8"))
        except (LinFusionError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def complete(self, key: str | None = None) -> bool:
        """Image and sidecar both present, the sidecar vouching for this exact image file (and, given `key`,
        recording the same settings key: an old sidecar without one is trusted)."""
        meta = self.sidecar_data()
        if meta is None or meta.get("complete") is not True:
            return False
        file = meta.get("file")
        if not isinstance(file, dict) or (key is not None and meta.get("key", key) != key):
            return False
        try:
            info = os.lstat(self.image)
        except OSError:
            return False
        return stat.S_ISREG(info.st_mode) and info.st_size == file.get("bytes")


def prepare_folder(folder: Path) -> Path:
    """Create the output folder if needed and prove it is writable, before any model loads (bad input: exit 2)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputFolderError(f"cannot create output folder {folder}: {exc.strerror or exc}") from exc
    if not folder.is_dir():
        raise OutputFolderError(f"output path {folder} exists and is not a folder")
    probe = folder / f".probe-{host_name()}-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise OutputFolderError(f"output folder {folder} is not writable: {exc.strerror or exc}") from exc
    return folder


def _temp_owner() -> str:
    return f"{host_name()}-{os.getpid()}"


def clean_stale_temps(folder: Path) -> int:
    """Remove temp files whose writer is provably gone; never another live writer's.

    A writer holds a lock on its temp file while it writes (see `atomic_file`), so a temp file we can lock has
    no live writer, except in the instant between its creation and its lock. To rule that instant out: a temp
    file of this host is removed only if its process is gone; another host's, only when also a minute old."""
    removed = 0
    mine = _temp_owner()
    for path in folder.glob(f".*{TEMP_MARKER}*"):
        owner = path.name.rsplit(TEMP_MARKER, 1)[-1]
        host, _, pid_text = owner.rpartition("-")
        if owner == mine or not pid_text.isdigit():
            continue
        if host == host_name() and pid_alive(int(pid_text)):
            continue
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            continue  # a planted link or a vanished file: leave it alone
        try:
            info = os.fstat(fd)
            foreign_and_young = host != host_name() and time.time() - info.st_mtime < STALE_FOREIGN_TEMP_SECONDS
            if stat.S_ISREG(info.st_mode) and lock_fd(fd) is True and not foreign_and_young:
                path.unlink()
                removed += 1
        except OSError:
            pass
        finally:
            os.close(fd)
    return removed


# --- atomic writes ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[IO[bytes]]:
    """Write to a locked temp file beside `path`, fsync, rename into place; on any failure remove the temp file.

    The temp file's name says which host and process write it, and the writer holds a lock on it until the
    rename: `clean_stale_temps` in another task can tell a live write from a dead one."""
    temp = path.with_name(f".{path.name}{TEMP_MARKER}{_temp_owner()}")
    try:
        with os.fdopen(_create_exclusive(temp), "wb") as handle:
            lock_fd(handle.fileno())
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
            os.replace(temp, path)  # replaces a link at `path` itself, never what it points to (lock still held)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            temp.unlink()
        if isinstance(exc, OSError):
            kind = DiskFullError if exc.errno in ENOSPC_ERRNOS else OutputError
            raise kind(f"could not write {path}: {exc.strerror or exc}") from exc
        raise
    _fsync_dir(path.parent)


def _create_exclusive(temp: Path) -> int:
    """Create the temp file anew: never follow a link planted at its name, never append to a stale one."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    try:
        return os.open(temp, flags, 0o644)
    except FileExistsError:
        temp.unlink()  # ours by name (this host, this pid: a dead namesake's) or a planted link: remove, recreate
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
        *_ip_adapter_fields(meta.get("adapters", [])),
        *_controlnet_fields(meta),
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


def _controlnet_fields(meta: dict[str, Any]) -> list[tuple[str, str]]:
    """A1111's ControlNet extension fields, one per unit: `ControlNet 0: "Module: none, Model: ..., Weight: ...,
    Guidance Start: ..., Guidance End: ..."` (no preprocessor module: control images are given ready-made)."""
    units = [a for a in meta.get("adapters", []) if a.get("kind") == "controlnet"]
    return [
        (
            f"ControlNet {i}",
            f'"Module: none, Model: {a["model"]}, Weight: {a["scale"]:g}, '
            f'Guidance Start: {a.get("guidance_start", 0.0):g}, Guidance End: {a.get("guidance_end", 1.0):g}"',
        )
        for i, a in enumerate(units)
    ]


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


def _ip_adapter_fields(adapters: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """`IP-Adapter: "ip-adapter_sd15, Weight: 0.6"` for the IP-Adapter that ran (named by its weight file)."""
    return [
        ("IP-Adapter", f'"{Path(str(a.get("weights") or a["source"])).stem}, Weight: {a["scale"]:g}"')
        for a in adapters
        if a.get("kind") == "ip_adapters"
    ]


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
    spec = OUTPUT_FORMATS[fmt]
    if spec.metadata == "png-text":
        from .pngfast import write_png

        (png_writer or write_png)(array, {PNG_TEXT_KEY: parameters, PNG_JSON_KEY: settings_json}, out)
    else:
        image = Image.fromarray(array, "RGB")
        if spec.metadata == "tiff":
            extra: dict[str, Any] = {"tiffinfo": {TIFF_DESCRIPTION: parameters}}
        else:
            exif = Image.Exif()
            exif.get_ifd(EXIF_IFD)[EXIF_USER_COMMENT] = _user_comment(parameters)
            extra = {"exif": exif.tobytes()}
        image.save(out, format=spec.pillow, **dict(spec.save_args), **extra)
    if handle is None:
        assert isinstance(out, io.BytesIO)
        return out.getvalue()
    return None


def read_metadata(path: Path, max_pixels: int = 1_000_000_000) -> dict[str, Any]:
    """The metadata we (or A1111) wrote into an image: {'parameters': str|None, 'linfusion': dict|None}."""
    from .images import open_image

    with open_image(path, max_pixels) as image:
        try:
            return _metadata(image)
        except (OSError, SyntaxError, ValueError, EOFError) as exc:  # text chunks sit after the pixels
            raise InputImageError(f"{quote(str(path))} is damaged or cut short ({quote(str(exc))})") from None


def _metadata(image: Any) -> dict[str, Any]:
    info: dict[str, Any] = {
        "format": image.format,
        "size": f"{image.width}x{image.height}",
        "parameters": None,
        "linfusion": None,
    }
    where = next((spec.metadata for spec in OUTPUT_FORMATS.values() if spec.pillow == image.format), "exif")
    if where == "png-text":
        text = getattr(image, "text", None) or {}
        info["parameters"] = text.get(PNG_TEXT_KEY) or image.info.get(PNG_TEXT_KEY)
        raw_json = text.get(PNG_JSON_KEY) or image.info.get(PNG_JSON_KEY)
        if isinstance(raw_json, str):
            with contextlib.suppress(ValueError):
                info["linfusion"] = load_json(raw_json)
    elif where == "tiff":
        info["parameters"] = image.tag_v2.get(TIFF_DESCRIPTION)
    else:
        raw = image.getexif().get_ifd(EXIF_IFD).get(EXIF_USER_COMMENT)
        info["parameters"] = _decode_user_comment(raw)
    return info
