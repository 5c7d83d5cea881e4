"""`linfusion view`: deep-zoom pages and a contact sheet for images (thin: flags -> view.build_site -> render)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape

from ..base.settings import OUTPUT_PANEL
from ..view import DEFAULT_PORT
from ..view.records import IMAGE_SUFFIXES
from .boundary import boundary, emit_json, output_mode, setup_logging, stderr
from .options import FLAG, QuietOpt

if TYPE_CHECKING:
    from collections.abc import Callable

    from ..view import SiteReport
    from ..view.pyramid import Pyramid

VIEW_PANEL = "Site"
VIEW_EXAMPLES = """[bold]Examples[/]
  linfusion view renders                       [dim]# renders/view/index.html; rerun to add new images[/]
  linfusion view renders --serve               [dim]# and open http://127.0.0.1:8000/index.html[/]
  linfusion view lighthouse.png --out /tmp/site --tiles webp
  [dim]# OpenSeadragon from jsDelivr instead of the copy shipped with linfusion (a lighter site):[/]
  linfusion view renders --viewer-js cdn
  [dim]# mark a batch's failed jobs on the sheet:[/]
  linfusion view renders --jobs logs/task-0.jsonl --jobs logs/task-1.jsonl"""


# the command's flags, declared apart so its signature stays readable
SourceArg = Annotated[
    Path,
    typer.Argument(
        metavar="IMAGE|FOLDER", help="An image, or a folder of images (a batch's --out).", show_default=False
    ),
]
SiteOutOpt = Annotated[
    Path | None,
    typer.Option(
        "--out",
        "-o",
        help="Site folder \\[default: view/ in the folder, or beside the image]; reruns add what is new.",
        rich_help_panel=OUTPUT_PANEL,
    ),
]
ViewerJsOpt = Annotated[
    str | None,
    typer.Option(
        "--viewer-js",
        envvar="LINFUSION_VIEWER_JS",
        metavar="cdn|URL|PATH",
        help="Where pages get OpenSeadragon: cdn (6.1.1 from jsDelivr, pinned by an integrity hash; needs the "
        "internet), a URL, or a local copy (openseadragon.min.js, its folder, the npm package) \\[default: "
        "the copy shipped with linfusion, copied into the site: works offline].",
        rich_help_panel=VIEW_PANEL,
    ),
]
TilesOpt = Annotated[
    str,
    typer.Option(
        metavar="jpeg|webp",
        help="Tile format: jpeg, or webp (a quarter of the disk space, five times slower to cut).",
        rich_help_panel=VIEW_PANEL,
        show_default=True,
    ),
]
JobLogsOpt = Annotated[
    list[Path] | None,
    typer.Option(
        "--jobs",
        metavar="FILE",
        help="A `batch --json` log whose failed jobs the sheet lists (repeatable; the folder's *.jsonl are read too).",
        rich_help_panel=VIEW_PANEL,
    ),
]
ServeOpt = Annotated[
    bool,
    typer.Option("--serve", help="Then serve the site on 127.0.0.1 until Ctrl-C.", rich_help_panel=VIEW_PANEL, **FLAG),
]
PortOpt = Annotated[
    int,
    typer.Option(
        metavar="PORT", help="--serve's port (0: any free one).", rich_help_panel=VIEW_PANEL, show_default=True
    ),
]
JsonOutOpt = Annotated[
    bool, typer.Option("--json", help="The report as JSON on stdout.", rich_help_panel=OUTPUT_PANEL, **FLAG)
]


def view_command(
    source: SourceArg,
    out: SiteOutOpt = None,
    viewer_js: ViewerJsOpt = None,
    tiles: TilesOpt = "jpeg",
    jobs: JobLogsOpt = None,
    serve: ServeOpt = False,
    port: PortOpt = DEFAULT_PORT,
    json_out: JsonOutOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Deep-zoom pages and a contact sheet for images: a static site that works from file:// or --serve."""
    from ..view import build_site
    from ..view import serve as serve_site

    mode = output_mode(quiet)
    setup_logging(mode)
    logging.getLogger("pyvips").setLevel(logging.ERROR)  # libvips's warnings on a damaged file: the report says it
    with boundary():
        report = build_site(
            source, out, viewer_js=viewer_js, tiles=tiles, job_logs=tuple(jobs or ()), progress=_progress(mode)
        )
        _render(report, mode, json_out, source)
        if serve:
            page = report.page.relative_to(report.site).as_posix()
            try:
                serve_site(report.site, port, ready=lambda base: _announce(base + page, json_out))
            except KeyboardInterrupt:
                stderr.print("stopped serving", highlight=False)


def _progress(mode: str) -> Callable[[Path, Pyramid | None, float], None]:
    """One line per pyramid cut: a 16K image takes seconds, a night's batch minutes."""

    def show(image: Path, pyramid: Pyramid | None, seconds: float) -> None:
        if mode != "quiet" and pyramid is not None:
            size = f"{pyramid.width}x{pyramid.height}"
            stderr.print(f"pyramid: {escape(image.name)} ({size}) in {seconds:.1f} s", highlight=False, soft_wrap=True)

    return show


def _render(report: SiteReport, mode: str, json_out: bool, source: Path) -> None:
    for name, why in report.damaged:
        stderr.print(
            f"[yellow]warning:[/] {escape(name)} cannot be read ({escape(why)}); listed as damaged", highlight=False
        )
    if report.images == 0 and not report.failed_jobs:
        stderr.print(
            f"[yellow]warning:[/] no images ({', '.join(IMAGE_SUFFIXES)}) in {escape(str(source))} or its sub-folders",
            highlight=False,
            soft_wrap=True,
        )
    if json_out:
        emit_json(report.as_dict())
    if mode == "quiet":
        return
    parts = [f"{report.images} image{'s' if report.images != 1 else ''}", f"{len(report.new)} new"]
    parts += [f"{report.unchanged} unchanged"] if report.unchanged else []
    parts += [f"{len(report.damaged)} damaged"] if report.damaged else []
    parts += [f"{report.failed_jobs} failed job{'s' if report.failed_jobs != 1 else ''}"] if report.failed_jobs else []
    parts += [f"{report.unfinished_jobs} unfinished"] if report.unfinished_jobs else []
    parts += (
        [f"{report.not_images} other file{'s' if report.not_images != 1 else ''} skipped"] if report.not_images else []
    )
    stderr.print(f"site {escape(str(report.site))}: {', '.join(parts)} in {report.seconds:.1f} s", highlight=False)
    if not json_out:
        typer.echo(report.page.as_uri())


def _announce(url: str, json_out: bool) -> None:
    stderr.print(f"serving on {url} (Ctrl-C stops)", highlight=False, soft_wrap=True)
    if not json_out:
        typer.echo(url)
