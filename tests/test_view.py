"""`linfusion view`: pyramids, pages, the contact sheet, reruns, bad input; and the pages in a real browser.

The folder under test is what a night on a farm leaves: images from `batch` with the tiny model (one with a
hostile prompt), its JSON log with a failed job, a larger picture that makes a multi-tile pyramid, a damaged PNG,
an image without a sidecar under a non-ASCII name with spaces, and a file that is not an image.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pyvips = pytest.importorskip("pyvips", reason="the view extra is not installed: pip install '.[view]'")

from linfusion_cli.base.errors import UsageError  # noqa: E402
from linfusion_cli.cli.commands import app  # noqa: E402
from linfusion_cli.view import build_site, open_server, site_url  # noqa: E402
from linfusion_cli.view.assets import OSD_CDN, OSD_INTEGRITY, VIEWER_JS_ENV  # noqa: E402
from linfusion_cli.view.pyramid import THUMB_SIDE, TILE_SIZE, Pyramid  # noqa: E402

FAST = ["--model", "tiny", "--size", "128", "--steps", "2", "--seed", "5"]
HOSTILE = '<script>alert(1)</script> "quotes" </title> <img src=x onerror=alert(2)>'
PATTERN_SIZE = (2048, 1024)  # 5 x 3 tiles at full size: a pyramid with real depth
PATTERN_CREATED = "2030-01-01T00:00:00+0000"  # later than the batch's images: first on the sheet
ODD_NAME = "ünï côde 狐 lake.png"


def make_pattern(path: Path) -> None:
    """Left half red, right half blue: zoomed out both show, zoomed into the right half only blue."""
    half = pyvips.Image.black(PATTERN_SIZE[0] // 2, PATTERN_SIZE[1], bands=3).cast("uchar")
    half.new_from_image([230, 20, 20]).join(half.new_from_image([20, 20, 230]), "horizontal").pngsave(str(path))
    sidecar = {
        "schema": 1,
        "seed": 42,
        "width": PATTERN_SIZE[0],
        "height": PATTERN_SIZE[1],
        "model": "pattern-model",
        "created": PATTERN_CREATED,
        "complete": True,
        "settings": {"prompt": "a red and blue flag", "negative": "blurry", "steps": 30, "scheduler": "euler"}
        | {"lora": ["tiny:0.7", "ink.safetensors:0.3"]},
        "seconds": {"generate": 12.5, "write": 0.25},
        "stages": [{"kind": "base", "size": "2048x1024", "steps": 30, "seconds": 12.0}],
    }
    path.with_name(path.name + ".json").write_text(json.dumps(sidecar))


@pytest.fixture(scope="module")
def renders(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A render folder as a farm leaves it (see the module docstring)."""
    from typer.testing import CliRunner

    root = tmp_path_factory.mktemp("renders")
    folder = root / "renders"
    prompts = root / "prompts.txt"
    prompts.write_text(f"a red fox\n{HOSTILE}\n")
    result = CliRunner().invoke(app, ["batch", str(prompts), *FAST, "--out", str(folder), "--json", "-q"])
    assert result.exit_code == 0, result.stderr
    failed = {"schema": 1, "index": 9, "status": "failed", "path": None, "seed": 14, "error": "out of <b>memory</b>"}
    failed["prompt"] = "a lost <i>fox</i>"
    (folder / "night.jsonl").write_text(result.stdout + json.dumps(failed) + "\n")
    fox = next(folder.glob("00000_*.png"))
    (folder / "damaged fox.png").write_bytes(fox.read_bytes()[: fox.stat().st_size // 2])
    shutil.copyfile(fox, folder / ODD_NAME)  # no sidecar
    (folder / "notes.txt").write_text("not an image")
    make_pattern(folder / "flag.png")
    return folder


@pytest.fixture(scope="module")
def site(renders: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site") / "site"
    report = build_site(renders, out)  # OpenSeadragon: the copy shipped in the package
    assert sorted(report.new) == sorted(p.name for p in renders.glob("*.png") if p.name != "damaged fox.png")
    assert [name for name, _ in report.damaged] == ["damaged fox.png"]
    assert "png" in report.damaged[0][1]  # libvips's reason ("vipspng: libpng read error" in 8.18)
    assert (report.failed_jobs, report.not_images) == (1, 1)  # notes.txt; sidecars and logs are not "other"
    return out


def page_of(site: Path, image_name: str) -> str:
    state = json.loads((site / "site.json").read_text())
    slug = next(entry["slug"] for path, entry in state["images"].items() if Path(path).name == image_name)
    return (site / "pages" / f"{slug}.html").read_text()


def test_pyramid_levels_tiles_and_thumbnail_match_the_dzi(site: Path, renders: Path) -> None:
    state = json.loads((site / "site.json").read_text())
    slug = state["images"][str(renders / "flag.png")]["slug"]
    dzi = (site / "tiles" / f"{slug}.dzi").read_text()
    assert f'TileSize="{TILE_SIZE}"' in dzi and 'Width="2048"' in dzi and 'Height="1024"' in dzi
    pyramid = Pyramid(*PATTERN_SIZE)
    assert pyramid.top_level == 11 and pyramid.tile_grid(11) == (5, 3) and pyramid.tile_grid(10) == (3, 2)
    files = site / "tiles" / f"{slug}_files"
    assert sorted(int(p.name) for p in files.iterdir()) == list(range(12))  # 2048 px halves 11 times to 1 px
    for level in range(12):
        cols, rows = pyramid.tile_grid(level)
        names = {p.name for p in (files / str(level)).iterdir()}
        assert names == {f"{c}_{r}.jpg" for c in range(cols) for r in range(rows)}, level
    assert sum(1 for _ in files.rglob("*.jpg")) == pyramid.tile_count()
    top = pyvips.Image.new_from_file(str(files / "11" / "4_2.jpg"))  # last column and row: the remainder
    assert (top.width, top.height) == (2048 - 4 * TILE_SIZE + 1, 1024 - 2 * TILE_SIZE + 1)  # + left/top overlap
    thumb = pyvips.Image.new_from_file(str(site / "thumbs" / f"{slug}.jpg"))
    assert (thumb.width, thumb.height) == (THUMB_SIDE, THUMB_SIDE // 2)
    left, right = thumb.crop(0, 0, 40, 40).stats()(4, 1)[0], thumb.crop(thumb.width - 40, 0, 40, 40).stats()(4, 3)[0]
    assert left > 200 and right > 200  # red mean of the left, blue mean of the right


def test_pages_show_the_sidecar_and_mark_what_is_wrong(site: Path, renders: Path) -> None:
    flag = page_of(site, "flag.png")
    for text in ("a red and blue flag", "blurry", "42", "2048x1024 (2.1 MP)", "pattern-model", "euler", "12.5"):
        assert text in flag, text
    assert "viewer: OpenSeadragon 6.1.1, shipped with linfusion (assets/openseadragon.min.js: works offline)" in flag
    assert '"Width": "2048"' in flag and f'"TileSize": "{TILE_SIZE}"' in flag  # the inline tile source
    odd = page_of(site, ODD_NAME)
    # a copy without its sidecar: the settings its own metadata chunk records
    assert "no sidecar: settings as ünï côde 狐 lake.png (its linfusion metadata) records them" in odd
    assert "a red fox" in odd
    sheet = (site / "index.html").read_text()
    assert "5 images, 1 damaged, 1 failed job, 1 other file skipped" in sheet
    assert "damaged: vipspng: " in sheet and "job 9: failed" in sheet
    assert "out of &lt;b&gt;memory&lt;/b&gt;" in sheet  # the log's error, escaped
    assert '<p class="prompt">a lost &lt;i&gt;fox&lt;/i&gt;</p>' in sheet  # the failed job's prompt, from its line
    assert "<dt>lora</dt><dd>tiny:0.7, ink.safetensors:0.3</dd>" in flag  # a list as a person writes it
    assert "seed 5 · 128x128 · 2 steps · cfg 7.5 · ddim · sdedit · tiny" in sheet
    names = [name.replace("<wbr>", "") for name in re.findall(r'<span class="file">(.*?)</span>', sheet)]
    assert names[0] == "flag.png"  # newest first: its sidecar says 2030
    assert re.search(r'<span class="file">00000_<wbr>a-<wbr>red-<wbr>fox_<wbr>5_<wbr>128x128_<wbr>\w+\.png', sheet)
    assert '<span class="badge">settings from the image</span>' in sheet


def test_hostile_prompt_is_text_everywhere(site: Path, renders: Path) -> None:
    name = next(p.name for p in renders.glob("00001_*.png"))
    page, sheet = page_of(site, name), (site / "index.html").read_text()
    for html in (page, sheet):
        assert "<script>alert" not in html and "<img src=x" not in html and "</title> <img" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &quot;quotes&quot; &lt;/title&gt;" in page
    assert page.count("<script") == 3  # the viewer, the inline config (JSON, not code) and zoom.js
    assert page.count("</title>") == 1
    config = re.search(r'<script type="application/json" id="view-config">(.*?)</script>', page, re.S)
    assert config is not None and "<" not in config.group(1)


def test_images_in_sub_folders_are_shown_under_their_path(renders: Path, tmp_path: Path) -> None:
    folder = tmp_path / "nights"
    fox = next(renders.glob("00000_*.png"))
    for where in ("night-1/a.png", "night-2/task-0/b.png"):
        (folder / where).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(fox, folder / where)
    first = build_site(folder)
    again = build_site(folder)  # the site (folder/view) is a sub-folder now: never taken for images
    assert (first.images, again.images, again.not_images, sorted(first.new)) == (2, 2, 0, ["a.png", "b.png"])
    sheet = (again.site / "index.html").read_text().replace("<wbr>", "")
    assert sorted(re.findall(r'<span class="file">(.*?)</span>', sheet)) == ["night-1/a.png", "night-2/task-0/b.png"]


def test_small_images_say_their_megapixels() -> None:
    from linfusion_cli.view.pages import megapixels

    assert [megapixels(*size) for size in [(256, 168), (2048, 1024), (16384, 16384)]] == [
        "0.043 MP",
        "2.1 MP",
        "268.4 MP",
    ]


def test_rerun_adds_only_what_is_new(renders: Path, tmp_path: Path) -> None:
    folder = tmp_path / "growing"
    folder.mkdir()
    fox = next(renders.glob("00000_*.png"))
    shutil.copyfile(fox, folder / "a.png")
    first = build_site(folder)
    assert first.site == folder / "view" and first.new == ["a.png"]
    tile = next((first.site / "tiles").rglob("0_0.jpg"))
    stamp = tile.stat().st_mtime_ns
    again = build_site(folder)
    assert (again.new, again.unchanged, again.pages_written) == ([], 1, 0)
    assert tile.stat().st_mtime_ns == stamp
    shutil.copyfile(fox, folder / "b.png")  # the batch made another image...
    shutil.copyfile(fox.with_name(fox.name + ".json"), folder / "a.png.json")  # ...and a's sidecar arrived
    third = build_site(folder)
    assert (third.new, third.unchanged) == (["b.png"], 1) and tile.stat().st_mtime_ns == stamp
    assert "a red fox" in page_of(third.site, "a.png")  # the page was rewritten with the sidecar
    (folder / "b.png").unlink()
    leftovers = [first.site / "tiles" / "_part-99999-a_files", first.site / "pages" / ".a.html.part-99999"]
    leftovers[0].mkdir()
    leftovers[1].write_text("half a page")  # what a killed build leaves
    fourth = build_site(folder)
    assert not any(path.exists() for path in leftovers)
    assert "b.png" not in (fourth.site / "index.html").read_text()
    assert not list((fourth.site / "tiles").glob("b-*"))  # its pyramid left with it


def test_claims_show_jobs_being_made_and_jobs_whose_task_died(renders: Path, tmp_path: Path) -> None:
    from linfusion_cli.io.locks import host_name

    folder = tmp_path / "farm"
    folder.mkdir()
    shutil.copyfile(next(renders.glob("00000_*.png")), folder / "00000_done.png")
    (folder / ".00000_done.png.claim").write_text("")  # its image exists: not a pending job
    (folder / ".00001_a-cat_7_128x128_0badc0de.png.claim").write_text(f"pid {os.getpid()} on {host_name()}\n")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (folder / ".00002_a-dog_8_128x128_0badc0de.png.claim").write_text(f"pid {dead.stdout.strip()} on {host_name()}")
    report = build_site(folder)
    assert (report.unfinished_jobs, report.failed_jobs) == (2, 0)
    sheet = (report.site / "index.html").read_text()
    assert "job 1: being made" in sheet and f"(pid {os.getpid()} on {host_name()})" in sheet
    assert "job 2: stopped" in sheet and "died before finishing" in sheet
    assert "job 0" not in sheet


def test_one_image_and_bad_input_exit_2_with_one_line(runner, renders: Path, tmp_path: Path) -> None:
    fox = next(renders.glob("00000_*.png"))
    result = runner.invoke(app, ["view", str(fox), "--out", str(tmp_path / "one"), "--json"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["page"].endswith(".html") and "/pages/" in report["page"] and report["images"] == 1
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    cases = [
        ([str(renders / "damaged fox.png")], "cannot be read as an image: vipspng: "),
        ([str(renders / "notes.txt")], "is not an image"),
        ([str(tmp_path / "nothing-here")], "does not exist"),
        ([str(fox), "--out", str(blocker / "site")], "cannot write the site folder"),
        ([str(fox), "--tiles", "gif"], "--tiles must be one of jpeg, webp"),
        ([str(fox), "--viewer-js", str(renders / "notes.txt")], "is not OpenSeadragon's JavaScript"),
    ]
    for args, message in cases:
        out = [] if "--out" in args else ["--out", str(tmp_path / "s")]
        result = runner.invoke(app, ["view", *args, *out])
        assert result.exit_code == 2, (args, result.stderr)
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_without_pyvips_one_line_says_what_to_install(runner, renders: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "pyvips", None)  # import pyvips -> ImportError
    result = runner.invoke(app, ["view", str(renders)])
    assert result.exit_code == 2
    assert "pip install 'linfusion-cli[view]'" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (renders / "view").exists()  # nothing written


def test_viewer_shipped_by_default_or_cdn_url_or_local_copy(renders: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv(VIEWER_JS_ENV, raising=False)
    fox = next(renders.glob("00000_*.png"))
    shipped = build_site(fox, tmp_path / "shipped")
    page = shipped.page.read_text()
    assert 'src="../assets/openseadragon.min.js">' in page and '"buttons": "../assets/images/"' in page
    assert (shipped.site / "assets" / "images" / "home_rest.png").is_file()  # the buttons came along
    cdn = build_site(fox, tmp_path / "cdn", viewer_js="CDN").page.read_text()
    assert f'src="{OSD_CDN}openseadragon.min.js" integrity="{OSD_INTEGRITY}" crossorigin="anonymous"' in cdn
    assert "viewer: OpenSeadragon 6.1.1 from jsDelivr, pinned by its integrity hash (needs the internet)" in cdn
    url = "https://example.org/osd/openseadragon.min.js"
    elsewhere = build_site(fox, tmp_path / "url", viewer_js=url).page.read_text()
    assert f'src="{url}">' in elsewhere and '"buttons": "https://example.org/osd/images/"' in elsewhere
    package = tmp_path / "package" / "build" / "openseadragon"  # the npm package's layout
    (package / "images").mkdir(parents=True)
    (package / "openseadragon.min.js").write_text("window.OpenSeadragon = function () {};")
    (package / "images" / "home_rest.png").write_bytes(b"png")
    local = build_site(fox, tmp_path / "local", viewer_js=tmp_path / "package")
    assert 'src="../assets/openseadragon.min.js">' in local.page.read_text()
    assert (local.site / "assets" / "images" / "home_rest.png").read_bytes() == b"png"
    again = build_site(fox, tmp_path / "local")  # no flag: the site keeps the copy it was given
    assert (again.site / "assets" / "openseadragon.min.js").read_text().startswith("window.OpenSeadragon")
    assert "viewer: the site&#x27;s local copy of OpenSeadragon" in again.page.read_text()


def test_shipped_viewer_is_the_npm_package_files() -> None:
    """The copy in the package is OpenSeadragon's npm package at the pinned version, byte for byte: its script has
    the pinned SRI hash (the one jsDelivr serves it under), every file matches the manifest .ci/vendor-openseadragon
    wrote, the licence is there; and where CI unpacked the npm package ($LINFUSION_VIEWER_JS), the same bytes."""
    import base64
    import hashlib

    from linfusion_cli.view.assets import OSD_VERSION

    shipped = Path(__file__).parents[1] / "linfusion_cli" / "view" / "openseadragon"
    script = (shipped / "openseadragon.min.js").read_bytes()
    assert f"sha384-{base64.b64encode(hashlib.sha384(script).digest()).decode()}" == OSD_INTEGRITY
    assert script.startswith(f"//! openseadragon {OSD_VERSION}\n".encode())  # the build banner names its version
    manifest = dict(line.split()[::-1] for line in (shipped / "MANIFEST.sha256").read_text().splitlines())
    files = sorted(p.relative_to(shipped).as_posix() for p in shipped.rglob("*") if p.is_file())
    assert sorted(manifest) == [f for f in files if f != "MANIFEST.sha256"] and len(manifest) == 42
    for name, digest in manifest.items():
        assert hashlib.sha256((shipped / name).read_bytes()).hexdigest() == digest, name
    assert "Redistribution and use in source and binary forms" in (shipped / "LICENSE.txt").read_text()
    if os.environ.get(VIEWER_JS_ENV):
        assert Path(os.environ[VIEWER_JS_ENV]).read_bytes() == script


def test_served_site_and_port_in_use(site: Path) -> None:
    server = open_server(site, 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with urllib.request.urlopen(site_url(server)) as response:
            assert response.status == 200 and b"flag.png" in response.read()
        dzi = next((site / "tiles").glob("*.dzi")).name
        with urllib.request.urlopen(site_url(server, f"tiles/{dzi}")) as response:
            assert response.headers["Content-Type"] == "application/xml"
        with pytest.raises(UsageError, match="is in use") as busy:
            open_server(site, server.server_address[1])
        assert f"--port {server.server_address[1] + 1}" in str(busy.value)  # advice the CLI takes
        for folder in ("pages/", "tiles/", "assets/"):  # no listing of a folder's files
            with pytest.raises(urllib.error.HTTPError) as listing:
                urllib.request.urlopen(site_url(server, folder))
            assert listing.value.code == 404
    finally:
        server.shutdown()
        server.server_close()


def test_cli_serve_prints_the_url_and_stops_on_ctrl_c(site: Path, renders: Path) -> None:
    import signal

    command = [
        sys.executable,
        "-m",
        "linfusion_cli",
        "view",
        str(renders),
        "--out",
        str(site),
        "--serve",
        "--port",
        "0",
    ]
    env = {**os.environ, "PYTHONFAULTHANDLER": "1"}

    def ctrl_c_as_a_terminal_has_it() -> None:
        # A process started with SIGINT ignored keeps ignoring it (as under nohup) and Python then raises no
        # KeyboardInterrupt; the test runner's worker processes can have it so, so the server is started as a
        # shell would start it.
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    with subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        preexec_fn=ctrl_c_as_a_terminal_has_it,
    ) as process:
        try:
            assert process.stdout is not None
            assert process.stdout.readline().startswith("file://")  # the site, then...
            url = process.stdout.readline().strip()  # ...where it is served
            assert re.fullmatch(r"http://127\.0\.0\.1:\d+/index\.html", url), url
            with urllib.request.urlopen(url) as response:
                assert b"a red and blue flag" in response.read()
        finally:
            process.send_signal(signal.SIGINT)
            try:
                _, said = process.communicate(timeout=30)
            except subprocess.TimeoutExpired:  # say where it hung instead of waiting for the test's timeout
                process.send_signal(signal.SIGABRT)  # PYTHONFAULTHANDLER: every thread's stack on stderr
                _, said = process.communicate(timeout=30)
                raise AssertionError(f"view --serve did not stop on SIGINT: {said}") from None
        assert process.returncode == 0 and "stopped serving" in said, said


def test_cli_start_up_does_not_load_libvips() -> None:
    code = "import sys, linfusion_cli.cli.commands; print('pyvips' in sys.modules, 'http.server' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


# --- the pages in a real browser ---------------------------------------------------------------------------------

CHROMIUM = Path(shutil.which("chromium") or "/usr/bin/chromium")
# Headless and quiet: without the background-networking flags Chromium keeps calling out, and a closed network
# refuses it (errors, delays).
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWPORT = {"width": 1280, "height": 800}
LEVEL_IN_URL = re.compile(r"_files/(\d+)/\d+_\d+\.jpg$")


def _browser_missing() -> str | None:
    """Why the browser test cannot run here, or None. CI installs all three (.ci/run)."""
    if not CHROMIUM.is_file():
        return "Chromium is not installed (apt-get install chromium; .ci/run installs it)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (pip install '.[test]')"
    return None


def _rgb(shot: bytes, x: float, y: float) -> tuple[int, int, int]:
    """The screenshot's colour at (x, y), as fractions of its width and height."""
    import io

    from PIL import Image

    image = Image.open(io.BytesIO(shot)).convert("RGB")
    return image.getpixel((int(x * (image.width - 1)), int(y * (image.height - 1))))  # type: ignore[return-value]


def _check_sheet(page, base: str, problems: list[str]) -> None:
    page.goto(base + "index.html")
    page.wait_for_function("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)", timeout=10_000)
    assert page.locator(".card").count() == 6  # 5 images (one damaged) + the failed job
    assert page.locator(".card img").count() == 4
    page.fill("#filter", "FLAG blue")
    assert page.locator(".card:visible").count() == 1 and page.inner_text("#shown") == "1 of 6 shown"
    page.fill("#filter", "")
    assert page.locator(".card:visible").count() == 6
    assert "<script>alert(1)</script>" in page.inner_text("body")  # shown as text, not run
    page.click('a.thumb:has(img[alt="a red and blue flag"])')
    page.wait_for_url("**/pages/flag-*.html")


def _check_zoom(page, levels: list[int]) -> None:
    """The flag's page (already open): tiles drawn, red left and blue right; zoomed in, deeper tiles, all blue."""
    loaded = "window.linfusionViewer && linfusionViewer.world.getItemCount() && linfusionViewer.world.getItemAt(0).getFullyLoaded()"
    page.wait_for_function(loaded, timeout=10_000)
    page.wait_for_timeout(300)  # the canvas draws on the next animation frames
    shot = page.locator("#viewer").screenshot()
    red, blue = _rgb(shot, 0.3, 0.5), _rgb(shot, 0.7, 0.5)
    assert red[0] > 180 and red[2] < 80 and blue[2] > 180 and blue[0] < 80, (red, blue)
    home = max(levels)
    assert home < 11  # the whole picture on a ~900 px canvas needs no full-size tile
    page.evaluate(
        "linfusionViewer.viewport.zoomTo(linfusionViewer.viewport.imageToViewportZoom(4),"
        " new OpenSeadragon.Point(0.75, 0.25), true)"
    )
    page.wait_for_function(loaded, timeout=10_000)
    page.wait_for_timeout(300)
    assert max(levels) == 11  # zoomed to 4x: the full-size level
    shot = page.locator("#viewer").screenshot()
    for x, y in ((0.2, 0.2), (0.5, 0.5), (0.8, 0.2)):  # clear of the buttons, navigator and readout
        pixel = _rgb(shot, x, y)
        assert pixel[2] > 180 and pixel[0] < 80, (x, y, pixel)
    assert "zoom 4.0x" in page.inner_text("#zoom-readout")


@pytest.mark.skipif(_browser_missing() is not None, reason=_browser_missing() or "")
def test_pages_in_headless_chromium_from_file_and_served(site: Path, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    server = open_server(site, 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    problems: list[str] = []
    levels: list[int] = []
    try:
        with sync_playwright() as playwright:
            context = playwright.chromium.launch_persistent_context(
                str(tmp_path / "profile"), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS,
                viewport=VIEWPORT,
            )  # fmt: skip
            # the network is off: anything but the site itself (file://, this server) is refused and reported
            context.route(
                re.compile(r"^https?://(?!127\.0\.0\.1[:/])"),
                lambda route: (problems.append(f"network: {route.request.url}"), route.abort()),
            )
            page = context.new_page()
            page.on("console", lambda msg: problems.append(msg.text) if msg.type in ("error", "warning") else None)
            page.on("pageerror", lambda exc: problems.append(str(exc)))
            page.on("dialog", lambda dialog: (problems.append(f"dialog: {dialog.message}"), dialog.dismiss()))
            page.on("response", lambda r: problems.append(f"{r.status} {r.url}") if r.status >= 400 else None)
            page.on("requestfailed", lambda req: problems.append(f"failed: {req.url}"))
            page.on("request", lambda req: levels.extend(int(m[1]) for m in [LEVEL_IN_URL.search(req.url)] if m))
            for base in (site.as_uri() + "/", site_url(server, "")):
                levels.clear()
                _check_sheet(page, base, problems)
                _check_zoom(page, levels)
            context.close()
    finally:
        server.shutdown()
        server.server_close()
    assert problems == []
