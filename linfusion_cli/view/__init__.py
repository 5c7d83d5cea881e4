"""Looking at what was made: deep-zoom pages for huge images and a contact sheet for a folder of them.

    from linfusion_cli.view import build_site, serve
    report = build_site(Path("renders"))          # renders/view/index.html; rerun to add new images
    serve(report.site, 8000, ready=print)         # prints http://127.0.0.1:8000/, serves until Ctrl-C

libvips (the `view` extra: `pip install 'linfusion-cli[view]'`) cuts each image into a Deep Zoom tile pyramid
(`pyramid`), OpenSeadragon shows it (`assets` says where its JavaScript comes from), `records` reads sidecars and
batch logs, `pages` writes the HTML, `site` ties them together and keeps reruns incremental, `server` serves a site.

Nothing here imports torch, pyvips is imported only when a pyramid is cut, and the modules themselves only when a
name below is first used, so that the CLI can read DEFAULT_PORT without paying for http.server at start-up.
(`serve` lives in `server`: a lazily imported function and a module of the same name would shadow each other.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

DEFAULT_PORT = 8000  # `view --serve` and `serve()`

__all__ = ["DEFAULT_PORT", "SiteReport", "build_site", "default_site", "open_server", "serve", "site_url"]

if TYPE_CHECKING:
    from .server import open_server, serve, site_url
    from .site import SiteReport, build_site, default_site

_LAZY = {
    "SiteReport": "site",
    "build_site": "site",
    "default_site": "site",
    "open_server": "server",
    "serve": "server",
    "site_url": "server",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
