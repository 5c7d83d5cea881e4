"""Looking at what was made: deep-zoom pages for huge images and a contact sheet for a folder of them.

    from linfusion_cli.view import build_site, serve
    report = build_site(Path("renders"))          # renders/view/index.html; rerun to add new images
    serve(report.site, 8000, ready=print)         # http://127.0.0.1:8000/index.html until Ctrl-C

libvips (the `view` extra: `pip install 'linfusion-cli[view]'`) cuts each image into a Deep Zoom tile pyramid
(`pyramid`), OpenSeadragon shows it (`assets` says where its JavaScript comes from), `pages` writes the HTML and
`site` ties them together and keeps reruns incremental. Nothing here imports torch, and pyvips is imported only
when a pyramid is cut.
"""

from .serve import DEFAULT_PORT, open_server, serve, site_url
from .site import SiteReport, build_site, default_site

__all__ = ["DEFAULT_PORT", "SiteReport", "build_site", "default_site", "open_server", "serve", "site_url"]
