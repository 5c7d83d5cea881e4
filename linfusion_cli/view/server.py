"""`view --serve` (`serve`): the site over HTTP on 127.0.0.1, by the standard library's file server.

file:// already works for the pages; a server is for a site on a remote machine (through an SSH tunnel:
`ssh -L 8000:127.0.0.1:8000 farm`) or a browser that restricts file:// further. Only loopback is bound, so
nothing is exposed to the network; only the site folder is served.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
from collections.abc import Callable
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from ..base.errors import UsageError
from ..io.files import quote
from . import DEFAULT_PORT

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
# Python's table lacks some of these on older versions; a tile served as octet-stream would not display
CONTENT_TYPES = {
    ".dzi": "application/xml",
    ".webp": "image/webp",
    ".js": "text/javascript",
    ".json": "application/json",
}


class _SiteHandler(SimpleHTTPRequestHandler):
    """Files of the site, never a folder's listing (a folder with an index.html gets that page, as usual; any
    other is "not found"); requests go to our log at debug level instead of one stderr line each."""

    extensions_map = {**SimpleHTTPRequestHandler.extensions_map, **CONTENT_TYPES}  # noqa: RUF012 - the base's own

    def list_directory(self, path: str | os.PathLike[str]) -> None:
        self.send_error(HTTPStatus.NOT_FOUND, "No such page")
        return None

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)


def open_server(site: Path, port: int = DEFAULT_PORT) -> ThreadingHTTPServer:
    """A server for `site` bound to 127.0.0.1:`port` (0: any free port), not yet serving.

    Its URL is `site_url(server)`; call `serve_forever()` on it (and `shutdown()` from another thread)."""
    if not (site / "index.html").is_file():
        raise UsageError(f"{quote(str(site))} is not a site built by linfusion view (no index.html)")
    handler = functools.partial(_SiteHandler, directory=str(site))
    try:
        return ThreadingHTTPServer((HOST, port), handler)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise UsageError(
                f"port {port} is in use on {HOST}: give another with --port (--port {port + 1}), or --port 0 for "
                "any free one"
            ) from None
        raise UsageError(f"cannot serve on {HOST}:{port}: {exc.strerror or exc}") from None


def site_url(server: ThreadingHTTPServer, page: str = "index.html") -> str:
    host, port = server.server_address[:2]
    return f"http://{host!s}:{port}/{page}"


def serve(site: Path, port: int = DEFAULT_PORT, ready: Callable[[str], None] | None = None) -> None:
    """Serve `site` until Ctrl-C (KeyboardInterrupt propagates to the caller); `ready(base_url)` is called
    first, with the URL of the site's root (`http://127.0.0.1:PORT/`)."""
    server = open_server(site, port)
    try:
        if ready:
            ready(site_url(server, ""))
        server.serve_forever()
    finally:
        server.server_close()
