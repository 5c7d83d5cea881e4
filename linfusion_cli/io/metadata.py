"""Image metadata as viewers read it: the AUTOMATIC1111 `parameters` text (a PNG text chunk, EXIF
UserComment for JPEG/WebP, ImageDescription for TIFF, with an XMP copy when the text is not ASCII) and our
settings as JSON, written with the pixels and read back."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path
from typing import IO, Any
from xml.sax.saxutils import escape, unescape

import numpy as np

from ..base.errors import InputImageError
from ..base.sizes import DEFAULT_MAX_PIXELS
from ..base.text import quote
from . import pngfast
from .files import load_json
from .formats import OUTPUT_FORMATS
from .images import open_image

PNG_TEXT_KEY = "parameters"


PNG_JSON_KEY = "linfusion"


EXIF_IFD = 0x8769


EXIF_USER_COMMENT = 0x9286


TIFF_DESCRIPTION = 270


TIFF_XMP = 700  # XMLPacket: UTF-8


RDF_NS = "http://www.w3.org/1999/02/22-rdf-syntax-ns#"


XMP_DESCRIPTION = re.compile(r"<dc:description><rdf:Alt><rdf:li xml:lang=\"x-default\">(.*?)</rdf:li>", re.DOTALL)


_UNICODE_PREFIX = b"UNICODE\x00"


_ASCII_PREFIX = b"ASCII\x00\x00\x00"


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


def _xmp(text: str) -> bytes:
    """An XMP packet holding `text` as dc:description: TIFF's ImageDescription is ASCII, XMP is UTF-8."""
    return (
        f'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="{RDF_NS}"><rdf:Description rdf:about="" '
        f'xmlns:dc="http://purl.org/dc/elements/1.1/"><dc:description><rdf:Alt><rdf:li xml:lang="x-default">'
        f"{escape(text)}</rdf:li></rdf:Alt></dc:description></rdf:Description></rdf:RDF></x:xmpmeta>"
    ).encode()


def _xmp_text(raw: Any) -> str | None:
    """The dc:description `_xmp` wrote (read as text, not parsed: no XML entity is ever expanded)."""
    if not isinstance(raw, bytes):
        return None
    found = XMP_DESCRIPTION.search(raw.decode("utf-8", errors="replace"))
    return unescape(found.group(1)) if found else None


def encode_image(
    pixels: np.ndarray | pngfast.RowSource,
    fmt: str,
    parameters: str,
    settings_json: str,
    handle: IO[bytes] | None = None,
) -> bytes | None:
    """Encode (H, W, 3) uint8 with metadata, into `handle` (or return the bytes). Rows that come a strip at a time
    (a split image's) are written as they come into a PNG; the other formats' encoders take them whole."""
    from PIL import Image

    out: IO[bytes] = handle if handle is not None else io.BytesIO()
    spec = OUTPUT_FORMATS.get(fmt)
    texts = {PNG_TEXT_KEY: parameters, PNG_JSON_KEY: settings_json}
    if spec.metadata == "png-text":
        if isinstance(pixels, np.ndarray):
            pngfast.write_png(pixels, texts, out)
        else:
            pngfast.write_png_rows(pixels, texts, out)
    else:
        array = pixels if isinstance(pixels, np.ndarray) else pixels.whole()
        image = Image.fromarray(array, "RGB")
        if spec.metadata == "tiff":
            extra: dict[str, Any] = {"tiffinfo": {TIFF_DESCRIPTION: parameters}}
            if not parameters.isascii():  # ImageDescription is ASCII ("a caf?"): the exact text goes in XMP too
                extra["tiffinfo"][TIFF_XMP] = _xmp(parameters)
        else:
            exif = Image.Exif()
            exif.get_ifd(EXIF_IFD)[EXIF_USER_COMMENT] = _user_comment(parameters)
            extra = {"exif": exif.tobytes()}
        image.save(out, format=spec.pillow, **dict(spec.save_args), **extra)
    if handle is None:
        assert isinstance(out, io.BytesIO)
        return out.getvalue()
    return None


def read_metadata(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> dict[str, Any]:
    """The metadata we (or A1111) wrote into an image: {'parameters': str|None, 'linfusion': dict|None}."""
    with open_image(path, max_pixels) as image:
        try:
            return _metadata(image)
        except (OSError, SyntaxError, ValueError, EOFError) as exc:  # text chunks sit after the pixels
            raise InputImageError(f"{quote(str(path))} is damaged or cut short ({quote(str(exc))})") from None


def _metadata(image: Any) -> dict[str, Any]:
    info: dict[str, Any] = {
        "format": image.format,
        "width": image.width,
        "height": image.height,
        "parameters": None,
        "linfusion": None,
    }
    where = next((spec.metadata for spec in OUTPUT_FORMATS if spec.pillow == image.format), "exif")
    if where == "png-text":
        text = getattr(image, "text", None) or {}
        info["parameters"] = text.get(PNG_TEXT_KEY) or image.info.get(PNG_TEXT_KEY)
        raw_json = text.get(PNG_JSON_KEY) or image.info.get(PNG_JSON_KEY)
        if isinstance(raw_json, str):
            with contextlib.suppress(ValueError):
                info["linfusion"] = load_json(raw_json)
    elif where == "tiff":
        info["parameters"] = _xmp_text(image.tag_v2.get(TIFF_XMP)) or image.tag_v2.get(TIFF_DESCRIPTION)
    else:
        raw = image.getexif().get_ifd(EXIF_IFD).get(EXIF_USER_COMMENT)
        info["parameters"] = _decode_user_comment(raw)
    return info
