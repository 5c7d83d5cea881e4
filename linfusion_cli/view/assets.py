"""Where the pages get OpenSeadragon (the deep-zoom viewer) from: by default the copy shipped inside this package,
copied into the site, so a site works with no network (a render node, a laptop on a train, CI).

The shipped copy is OpenSeadragon's npm package at `OSD_VERSION`, byte for byte (`openseadragon/`: the minified
script, its button images, its BSD-3-Clause licence; `.ci/vendor-openseadragon` refreshes it and writes
`MANIFEST.sha256`); its script's SHA-384 is the Subresource Integrity hash below, the one jsDelivr serves the same
file under. `--viewer-js` (or `$LINFUSION_VIEWER_JS`) chooses otherwise: `cdn` (that pinned jsDelivr file, checked
by the browser against the hash; needs the internet), a URL, or a local copy (the file, its folder, or an unpacked
npm package). A site keeps a local copy it already holds when run again without the flag.
"""

from __future__ import annotations

import os
import shutil
from contextlib import ExitStack
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..base.errors import UsageError
from ..io.files import quote, read_regular

OSD_VERSION = "6.1.1"
OSD_CDN = f"https://cdn.jsdelivr.net/npm/openseadragon@{OSD_VERSION}/build/openseadragon/"
OSD_FILE = "openseadragon.min.js"
OSD_INTEGRITY = "sha384-KKly+4vqqBHitr2XfNKWa3+0asIVpzYs2HijkM/zz0X6rgnyLuQEVERX9HqkM5/P"
SHIPPED_DIR = "openseadragon"  # inside this package
VIEWER_JS_ENV = "LINFUSION_VIEWER_JS"
CDN_CHOICE = "cdn"
URL_PREFIXES = ("https://", "http://")
ASSETS_DIR = "assets"
MAX_VIEWER_JS_BYTES = 8 << 20  # the 6.x file is 0.35 MiB; anything far larger is not it
MAX_BUTTON_BYTES = 1 << 20
LICENCE_FILE = "LICENSE.txt"  # OpenSeadragon's, as its package names it
SITE_LICENCE = "openseadragon-LICENSE.txt"  # in a site's assets, beside the code
# where a viewer file may sit inside what the flag names: the file itself, its folder, the npm package's root
_PACKAGE_PATHS = (
    Path(OSD_FILE),
    Path("build/openseadragon") / OSD_FILE,
    Path("package/build/openseadragon") / OSD_FILE,
)


@dataclass(frozen=True)
class Viewer:
    """How a page at depth 1 under the site root (`pages/x.html`) loads the viewer.

    `script` is the `src` of its script tag, `integrity` the SRI hash when it comes from the CDN, `buttons` the
    URL prefix of the navigation buttons' images (None: the site has none, so the page hides them), and `source`
    what the page says of it."""

    script: str
    integrity: str | None
    buttons: str | None
    local: bool
    source: str = ""


CDN_VIEWER = Viewer(
    OSD_CDN + OSD_FILE,
    OSD_INTEGRITY,
    OSD_CDN + "images/",
    local=False,
    source=f"OpenSeadragon {OSD_VERSION} from jsDelivr, pinned by its integrity hash (needs the internet)",
)


def find_viewer_file(given: Path) -> Path:
    """The `openseadragon.min.js` that `given` names: the file, or a folder holding it (npm package layouts)."""
    if given.is_dir():
        for relative in _PACKAGE_PATHS:
            if (given / relative).is_file():
                return given / relative
        raise UsageError(f"--viewer-js: no {OSD_FILE} in the folder {quote(str(given))} (nor in build/openseadragon/)")
    if not given.exists():
        raise UsageError(
            f"--viewer-js: {quote(str(given))} does not exist (give cdn, a URL, or a local openseadragon.min.js)"
        )
    return given


def install_viewer(site: Path, given: str | Path | None) -> Viewer:
    """Put the viewer where the site's pages will load it from, and say how they load it.

    `given` (the flag, else the environment variable): `cdn`, a URL, or a local copy, copied in. Without it, a
    copy the site already holds is kept, else the copy shipped in this package is copied in."""
    choice = str(given if given is not None else os.environ.get(VIEWER_JS_ENV) or "").strip()
    if choice.lower() == CDN_CHOICE:
        return CDN_VIEWER
    if choice.lower().startswith(URL_PREFIXES):
        folder = choice.rsplit("/", 1)[0] + "/"
        return Viewer(choice, None, folder + "images/", local=False, source=f"OpenSeadragon from {choice}")
    assets = site / ASSETS_DIR
    if choice:
        _copy_viewer(find_viewer_file(Path(choice).expanduser()), assets)
        source = f"a local copy of OpenSeadragon ({ASSETS_DIR}/{OSD_FILE}, from {choice})"
    elif (assets / OSD_FILE).is_file():
        source = f"the site's local copy of OpenSeadragon ({ASSETS_DIR}/{OSD_FILE})"
    else:
        with ExitStack() as stack:
            shipped = stack.enter_context(resources.as_file(resources.files(__package__) / SHIPPED_DIR / OSD_FILE))
            _copy_viewer(shipped, assets)
        source = f"a local copy of OpenSeadragon ({ASSETS_DIR}/{OSD_FILE})"
    if _is_shipped(assets / OSD_FILE):
        source = f"OpenSeadragon {OSD_VERSION}, shipped with linfusion ({ASSETS_DIR}/{OSD_FILE}: works offline)"
    buttons = f"../{ASSETS_DIR}/images/" if (assets / "images").is_dir() else None
    return Viewer(f"../{ASSETS_DIR}/{OSD_FILE}", None, buttons, local=True, source=source)


def _copy_viewer(source: Path, assets: Path) -> None:
    code = read_regular(source, MAX_VIEWER_JS_BYTES, "the viewer's JavaScript")
    if b"OpenSeadragon" not in code:
        raise UsageError(f"--viewer-js: {quote(str(source))} is not OpenSeadragon's JavaScript")
    assets.mkdir(parents=True, exist_ok=True)
    (assets / OSD_FILE).write_bytes(code)
    _copy_buttons(source.parent / "images", assets / "images")
    # its BSD-3 licence goes wherever the code goes: beside it here, at the root of an unpacked npm package
    for licence in (folder / LICENCE_FILE for folder in (source.parent, source.parent.parent.parent)):
        if licence.is_file() and not licence.is_symlink() and licence.stat().st_size <= MAX_BUTTON_BYTES:
            shutil.copyfile(licence, assets / SITE_LICENCE)
            break


def _is_shipped(path: Path) -> bool:
    """Whether the site's copy is the one this package ships (the page then names its version)."""
    shipped = resources.files(__package__) / SHIPPED_DIR / OSD_FILE
    try:
        return path.stat().st_size == len(data := shipped.read_bytes()) and path.read_bytes() == data
    except OSError:
        return False


def _copy_buttons(source: Path, target: Path) -> None:
    """The navigation buttons' PNGs (40 small files), if the copy came with them; regular files only."""
    if not source.is_dir():
        return
    target.mkdir(exist_ok=True)
    for image in sorted(source.glob("*.png")):
        if image.is_file() and not image.is_symlink() and image.stat().st_size <= MAX_BUTTON_BYTES:
            shutil.copyfile(image, target / image.name)
