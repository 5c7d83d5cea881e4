"""Where the pages get OpenSeadragon (the deep-zoom viewer) from: a pinned CDN file, or a local copy in the site.

The default is one pinned version on jsDelivr with a Subresource Integrity hash, so a browser runs exactly the
file this project tested and nothing else; the hash is the SHA-384 of `build/openseadragon/openseadragon.min.js`
in the npm package of that version (jsDelivr serves npm files byte for byte). A site that must work offline
(`file://` on an air-gapped machine, CI) gets a local copy instead: `--viewer-js PATH` or `$LINFUSION_VIEWER_JS`
names the file, its folder, or the unpacked npm package (`npm pack openseadragon@6.1.1`), and the file and its
button images are copied into `SITE/assets/`. Once a site has a local copy, later runs keep using it.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..base.errors import UsageError
from ..io.files import quote, read_regular

OSD_VERSION = "6.1.1"
OSD_CDN = f"https://cdn.jsdelivr.net/npm/openseadragon@{OSD_VERSION}/build/openseadragon/"
OSD_FILE = "openseadragon.min.js"
OSD_INTEGRITY = "sha384-KKly+4vqqBHitr2XfNKWa3+0asIVpzYs2HijkM/zz0X6rgnyLuQEVERX9HqkM5/P"
VIEWER_JS_ENV = "LINFUSION_VIEWER_JS"
ASSETS_DIR = "assets"
MAX_VIEWER_JS_BYTES = 8 << 20  # the 6.x file is 0.35 MiB; anything far larger is not it
MAX_BUTTON_BYTES = 1 << 20
# where a viewer file may sit inside what the flag names: the file itself, its folder, the npm package's root
_PACKAGE_PATHS = (
    Path(OSD_FILE),
    Path("build/openseadragon") / OSD_FILE,
    Path("package/build/openseadragon") / OSD_FILE,
)


@dataclass(frozen=True)
class Viewer:
    """How a page at depth 1 under the site root (`pages/x.html`) loads the viewer.

    `script` is the `src` of its script tag, `integrity` the SRI hash when it comes from the CDN, and
    `buttons` the URL prefix of the navigation buttons' images (None: the site has none, so the page hides them).
    """

    script: str
    integrity: str | None
    buttons: str | None
    local: bool


CDN_VIEWER = Viewer(OSD_CDN + OSD_FILE, OSD_INTEGRITY, OSD_CDN + "images/", local=False)


def find_viewer_file(given: Path) -> Path:
    """The `openseadragon.min.js` that `given` names: the file, or a folder holding it (npm package layouts)."""
    if given.is_dir():
        for relative in _PACKAGE_PATHS:
            if (given / relative).is_file():
                return given / relative
        raise UsageError(f"--viewer-js: no {OSD_FILE} in the folder {quote(str(given))} (nor in build/openseadragon/)")
    if not given.exists():
        raise UsageError(f"--viewer-js: {quote(str(given))} does not exist")
    return given


def install_viewer(site: Path, given: Path | None) -> Viewer:
    """Put the viewer where the site's pages will load it from, and say how they load it.

    `given` (the flag, else the environment variable) is copied in; without it, a copy the site already holds is
    kept (a rerun must not silently make an offline site depend on the network); else the pinned CDN file."""
    if given is None and os.environ.get(VIEWER_JS_ENV):
        given = Path(os.environ[VIEWER_JS_ENV]).expanduser()
    assets = site / ASSETS_DIR
    if given is not None:
        source = find_viewer_file(given)
        code = read_regular(source, MAX_VIEWER_JS_BYTES, "the viewer's JavaScript")
        if b"OpenSeadragon" not in code:
            raise UsageError(f"--viewer-js: {quote(str(source))} is not OpenSeadragon's JavaScript")
        assets.mkdir(parents=True, exist_ok=True)
        (assets / OSD_FILE).write_bytes(code)
        _copy_buttons(source.parent / "images", assets / "images")
    if not (assets / OSD_FILE).is_file():
        return CDN_VIEWER
    buttons = f"../{ASSETS_DIR}/images/" if (assets / "images").is_dir() else None
    return Viewer(f"../{ASSETS_DIR}/{OSD_FILE}", None, buttons, local=True)


def _copy_buttons(source: Path, target: Path) -> None:
    """The navigation buttons' PNGs (40 small files), if the copy came with them; regular files only."""
    if not source.is_dir():
        return
    target.mkdir(exist_ok=True)
    for image in sorted(source.glob("*.png")):
        if image.is_file() and not image.is_symlink() and image.stat().st_size <= MAX_BUTTON_BYTES:
            shutil.copyfile(image, target / image.name)
