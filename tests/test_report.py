"""The HTML report: built from real runs (demo data, hostile file names, an empty folder),
crawled page by page in headless Chromium, plus the framework's paging, failure isolation,
the comparison of two runs and the Prefect artifacts."""

from __future__ import annotations

import collections
import functools
import html
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from badfiles import HOSTILE_NAMES, make_bad_folder
from conftest import ROOT, cli_env, neurocat_cmd
from flows.common import RunOptions

ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-background-networking", "--disable-gpu", "--disable-dev-shm-usage"]
LAPTOP, PHONE = {"width": 1280, "height": 800}, {"width": 390, "height": 844}


# ---- runs the reports are built from ---------------------------------------------------
@pytest.fixture(scope="module")
def demo_run(prefect_api, tmp_path_factory):
    """The demo flow on the shipped data: every section that exists today is in its report."""
    from flows.demo import demo_flow

    tmp = tmp_path_factory.mktemp("demo")
    result = demo_flow(RunOptions(store=str(tmp / "demo.zarr"), report=str(tmp / "demo-report")))
    return {"store": Path(result["store"]), "report": Path(result["report"]).parent}


@pytest.fixture(scope="module")
def predict_run(prefect_api, tmp_path_factory):
    """Only the predict flow on the shipped data: a cheap real run for the framework's tests."""
    from flows.predict import predict_flow

    tmp = tmp_path_factory.mktemp("predict")
    result = predict_flow(RunOptions(data=str(ROOT / "neurocat" / "demo_data"), store=str(tmp / "p.zarr"),
                                     report=str(tmp / "p-report")))
    return {"store": Path(result["store"]), "report": Path(result["report"]).parent}


@pytest.fixture(scope="module")
def hostile_run(prefect_api, tmp_path_factory, shared_images):
    from flows.predict import predict_flow

    tmp = tmp_path_factory.mktemp("hostile")
    expected = make_bad_folder(tmp / "data", shared_images / "n01440764/n01440764_tench.JPEG")
    result = predict_flow(RunOptions(data=str(tmp / "data"), store=str(tmp / "h.zarr"), report=str(tmp / "h-report")))
    return {"store": Path(result["store"]), "report": Path(result["report"]).parent, "expected": expected}


@pytest.fixture(scope="module")
def skipped_only_run(prefect_api, tmp_path_factory):
    """A dataset whose every file is unusable: the report must render and say why."""
    from flows.predict import predict_flow

    tmp = tmp_path_factory.mktemp("skipped")
    (tmp / "data" / "n01440764").mkdir(parents=True)
    (tmp / "data" / "n01440764" / "empty.jpg").write_bytes(b"")
    (tmp / "data" / "n01440764" / "notes.jpg").write_text("not an image\n")
    result = predict_flow(RunOptions(data=str(tmp / "data"), store=str(tmp / "s.zarr"), report=str(tmp / "s-report")))
    return {"store": Path(result["store"]), "report": Path(result["report"]).parent}


# ---- the browser -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        message = f"chromium not found at {CHROMIUM} (run `make browser`)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


def load_all_images(page) -> None:
    """Thumbnails are lazy: make every one load now and wait until each has decoded or failed.
    (A function, not a string, so the pages' CSP, which forbids eval, does not block it.)"""
    page.evaluate("""async () => {
        const imgs = Array.from(document.images);
        for (const i of imgs) i.loading = 'eager';
        await Promise.allSettled(imgs.map(i => i.decode()));
    }""")


class Crawl:
    """Visits every page reachable from a start URL and records what went wrong on the way."""

    def __init__(self, browser, viewport=LAPTOP):
        self.context = browser.new_context(viewport=viewport)
        self.page = self.context.new_page()
        self.problems: list[str] = []
        self.dialogs: list[str] = []
        self.texts: dict[str, str] = {}
        self.pages: list[str] = []
        self.base: str | None = None  # the report root: set by the first run
        self.page.on("console", lambda m: self.problems.append(f"console {m.type}: {m.text} ({self.page.url})")
                     if m.type in ("error", "warning") else None)
        self.page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        self.page.on("requestfailed", lambda r: self.problems.append(f"request failed: {r.url} {r.failure}"))
        self.page.on("response", lambda r: self.problems.append(f"HTTP {r.status}: {r.url}") if r.status >= 400 else None)
        self.page.on("dialog", self._dialog)

    def _dialog(self, dialog):
        self.dialogs.append(f"{dialog.type}: {dialog.message} on {self.page.url}")
        dialog.dismiss()

    def _exists(self, url: str) -> bool:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme == "file":
            return Path(urllib.request.url2pathname(parts.path)).is_file()
        return self.context.request.get(url).status == 200

    def run(self, start: str, max_depth: int | None = None) -> "Crawl":
        """Breadth-first from `start`; `max_depth` clicks at most (None: every reachable page)."""
        self.base = base = self.base or start.rsplit("/", 1)[0] + "/"
        todo, seen = collections.deque([(start, 0)]), {start}
        while todo:
            url, depth = todo.popleft()
            self.page.goto(url, wait_until="load")
            # thumbnails are lazy: make every one load now, then check that each decoded
            load_all_images(self.page)
            for src in self.page.evaluate(
                    "Array.from(document.images).filter(i => !(i.naturalWidth > 0)).map(i => i.src)"):
                self.problems.append(f"image did not decode: {src} on {url}")
            self.texts[url] = self.page.inner_text("body")
            if self.page.evaluate("document.scripts.length || Array.from(document.querySelectorAll('*'))"
                                  ".some(e => Array.from(e.attributes).some(a => a.name.startsWith('on')))"):
                self.problems.append(f"a script element or an on* handler attribute on {url}")
            ids = set(self.page.evaluate("Array.from(document.querySelectorAll('[id]')).map(e => e.id)"))
            for raw, href in self.page.evaluate(
                    "Array.from(document.querySelectorAll('a[href]')).map(a => [a.getAttribute('href'), a.href])"):
                if not href.startswith(base):
                    self.problems.append(f"link leaves the report: {raw!r} on {url}")
                    continue
                target, _, fragment = href.partition("#")
                if target == url and fragment:
                    if fragment not in ids:
                        self.problems.append(f"missing anchor #{fragment} on {url}")
                if target.endswith(".html"):
                    if target not in seen and (max_depth is None or depth < max_depth):
                        seen.add(target)
                        todo.append((target, depth + 1))
                elif target != url and not self._exists(target):
                    self.problems.append(f"broken link {raw!r} on {url}")
            for attr in self.page.evaluate(
                    "Array.from(document.querySelectorAll('[src],[href]')).map(e => e.getAttribute('src') || e.getAttribute('href'))"):
                if re.match(r"^(https?:)?//", attr):
                    self.problems.append(f"external URL {attr!r} on {url}")
        self.pages = sorted(set(self.pages) | seen)
        return self

    def shoot(self, url: str, name: str, viewport=LAPTOP) -> Path:
        ARTIFACTS.mkdir(exist_ok=True)
        self.page.set_viewport_size(viewport)
        self.page.goto(url, wait_until="load")
        load_all_images(self.page)
        path = ARTIFACTS / name
        self.page.screenshot(path=str(path), full_page=True)
        return path

    def close(self):
        self.context.close()


def crawl(browser, start: str, viewport=LAPTOP, max_depth: int | None = None) -> Crawl:
    c = Crawl(browser, viewport)
    try:
        return c.run(start, max_depth)
    finally:
        c.close()


@pytest.fixture
def http_root():
    """Serve a folder with the standard library's static server (what `python -m http.server` runs)."""
    servers = []

    def serve(folder: Path) -> str:
        handler = functools.partial(QuietHandler, directory=str(folder))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/"

    yield serve
    for s in servers:
        s.shutdown()
        s.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


# ---- browser tests ---------------------------------------------------------------------
def check_whole_site(browser, report: Path) -> Crawl:
    """Crawl a report from its index over file://, then visit the pages no link reaches; no problem allowed."""
    c = Crawl(browser)
    try:
        c.run((report / "index.html").as_uri())
        reached = set(c.pages)
        orphans = sorted(p.as_uri() for p in report.rglob("*.html") if p.as_uri() not in reached)
        for page in orphans:
            c.run(page, max_depth=0)
        assert not c.problems, "\n".join(c.problems[:20])
        c.orphans = orphans
        return c
    finally:
        c.close()


@pytest.mark.browser
def test_report_every_page_loads_from_file_and_http(browser, predict_run, http_root):
    """The shipped data through the predict flow: every page, link and image, from disk and a web server."""
    report = predict_run["report"]
    c = check_whole_site(browser, report)
    assert not c.orphans, c.orphans
    assert {(report / n).as_uri() for n in ("index.html", "predict.html", "predict/all-1.html",
                                             "predict/wrong-1.html")} <= set(c.pages)
    over_http = crawl(browser, http_root(report) + "index.html")
    assert not over_http.problems, "\n".join(over_http.problems[:20])
    assert len(over_http.pages) == len(c.pages)
    shots = Crawl(browser)
    try:
        index, section = (report / "index.html").as_uri(), (report / "predict.html").as_uri()
        paths = [shots.shoot(index, "report-index-laptop.png"), shots.shoot(index, "report-index-phone.png", PHONE),
                 shots.shoot(section, "report-predict-laptop.png"),
                 shots.shoot(section, "report-predict-phone.png", PHONE)]
    finally:
        shots.close()
    assert all(p.stat().st_size > 10_000 for p in paths)


@pytest.mark.slow
@pytest.mark.browser
def test_demo_report_every_section_every_page(browser, demo_run, http_root):
    """The demo flow runs every job; its report's every page (all engineers' sections) must load cleanly."""
    report = demo_run["report"]
    c = check_whole_site(browser, report)
    assert not [o for o in c.orphans if "/predict" in o], c.orphans
    over_http = crawl(browser, http_root(report) + "index.html", max_depth=2)
    assert not over_http.problems, "\n".join(over_http.problems[:20])
    shots = Crawl(browser)
    try:
        nav = re.search(r'<nav aria-label="sections">(.*?)</nav>', (report / "index.html").read_text()).group(1)
        for href in ["index.html", *re.findall(r'href="([^"]+)"', nav)]:
            shots.shoot((report / href).as_uri(), "demo-" + href.replace("/", "-").replace(".html", "-laptop.png"))
    finally:
        shots.close()


NARROW, WIDE = {"width": 400, "height": 900}, {"width": 1300, "height": 900}

# What a reader of one page cannot read, as the browser lays it out (functions: the pages' CSP forbids eval)
LAYOUT_FAULTS = """() => {
    const faults = [], shown = e => e.getClientRects().length > 0, page = document.documentElement;
    if (page.scrollWidth > window.innerWidth) faults.push(`the page scrolls sideways: ${page.scrollWidth} px wide`);
    for (const table of document.querySelectorAll('table')) {
        if (table.tHead && shown(table.tHead)) continue;  // the heading row stands above every column
        const headings = Array.from(table.querySelectorAll('thead th'), th => th.textContent.replace(/\\s+/g, ' ').trim());
        for (const body of table.tBodies) for (const row of body.rows) Array.from(row.cells).forEach((cell, i) => {
            const labelled = cell.dataset.label === headings[i] && getComputedStyle(cell, '::before').content !== 'none';
            if (headings[i] && shown(cell) && !labelled)
                faults.push(`a cell of column "${headings[i]}" without its heading: ${cell.textContent.trim().slice(0, 40)}`);
        });
    }
    return faults;
}"""
READING_FAULTS = """() => {
    const faults = [], shown = e => e.getClientRects().length > 0;
    // a number split over two lines, or a word where its element does not let names break anywhere
    // (paths and hashes may, even where a segment of a path is digits)
    const text = document.createTreeWalker(document.querySelector('main'), NodeFilter.SHOW_TEXT);
    for (let node; (node = text.nextNode());) {
        const style = getComputedStyle(node.parentElement);
        const anywhere = style.overflowWrap === 'anywhere' || style.wordBreak === 'break-all';
        if (!shown(node.parentElement) || (anywhere && node.parentElement.closest('.path, code'))) continue;
        for (const word of node.data.matchAll(/[^\\s\\-\\u2013\\u2014\\/]+/g)) {
            if (anywhere && !/^[\\d.,%]+$/.test(word[0])) continue;
            const range = document.createRange();
            range.setStart(node, word.index);
            range.setEnd(node, word.index + word[0].length);
            if (new Set(Array.from(range.getClientRects(), r => Math.round(r.bottom))).size > 1)
                faults.push(`"${word[0]}" is broken over two lines`);
        }
    }
    // a picture shown at its own size blown up past its pixels, or one whose page sets its width shown
    // smaller where there is room; a grid cell's picture and a list's thumbnail take their box's size
    for (const img of document.querySelectorAll('main img')) {
        if (img.closest('.grid, td.t') || !shown(img) || !img.naturalWidth) continue;
        const set = +img.getAttribute('width');
        if (!set && img.clientWidth > img.naturalWidth + 1)
            faults.push(`picture "${img.alt}" shown ${img.clientWidth} px wide from ${img.naturalWidth} px`);
        if (set && img.clientWidth < Math.min(set, img.parentElement.clientWidth) - 1)
            faults.push(`picture "${img.alt}" shown ${img.clientWidth} px wide, its page sets ${set} px`);
    }
    // a row of a list with a thumbnail: its other cells stand beside the thumbnail, not under it
    for (const thumb of document.querySelectorAll('table.rows td.t')) {
        const right = thumb.getBoundingClientRect().right;
        for (const cell of thumb.parentElement.cells)
            if (cell !== thumb && shown(cell) && cell.getBoundingClientRect().left < right - 1)
                faults.push(`a cell under its row's thumbnail: ${cell.textContent.trim().slice(0, 40)}`);
    }
    return faults;
}"""


def page_faults(browser, report: Path, viewport: dict, check: str) -> list[str]:
    """`check`'s faults on every page of `report`, every picture loaded: one line per page at fault."""
    context = browser.new_context(viewport=viewport)
    page = context.new_page()
    try:
        faults = []
        for path in sorted(report.rglob("*.html")):
            page.goto(path.as_uri(), wait_until="load")
            load_all_images(page)
            if found := page.evaluate(check):
                faults.append(f"{path.relative_to(report)}: {len(found)} x, e.g. " + " | ".join(found[:3]))
        return faults
    finally:
        context.close()


@pytest.mark.slow
@pytest.mark.browser
def test_every_page_fits_a_phone_and_every_table_cell_shows_its_heading(browser, demo_run):
    """400 px wide: the page never scrolls sideways (a wide table scrolls inside itself), and a
    table that lays its rows out as cards labels every cell with its column's heading."""
    faults = page_faults(browser, demo_run["report"], NARROW, LAYOUT_FAULTS)
    assert not faults, "\n".join(faults[:30])


@pytest.mark.slow
@pytest.mark.browser
@pytest.mark.parametrize("viewport", [NARROW, WIDE], ids=["400px", "1300px"])
def test_every_page_reads_on_a_phone_and_a_laptop(browser, demo_run, viewport):
    """No word or number split mid-way in a narrow column, no render blown up past its pixels,
    no list row whose cells slide under its thumbnail."""
    faults = page_faults(browser, demo_run["report"], viewport, READING_FAULTS)
    assert not faults, "\n".join(faults[:30])


@pytest.mark.browser
def test_a_linked_heading_is_not_hidden_under_the_sticky_header(browser, predict_run):
    """A laptop keeps the header with the section links on top of the page: a link to a part
    of the index (#skipped, #model, ...) must bring its heading below it, not under it."""
    index = (predict_run["report"] / "index.html").as_uri()
    context = browser.new_context(viewport=WIDE)
    page = context.new_page()
    try:
        page.goto(index, wait_until="load")
        hidden = []
        for anchor in page.evaluate("Array.from(document.querySelectorAll('main h2[id]'), h => h.id)"):
            page.goto(f"{index}#{anchor}", wait_until="load")
            heading, header = page.evaluate("""(id) => [document.getElementById(id).getBoundingClientRect().top,
                document.querySelector('header.top').getBoundingClientRect().bottom]""", anchor)
            if heading < header and page.evaluate("scrollY") > 0:  # a heading the page cannot scroll past is fine
                hidden.append(f"#{anchor}: top at {heading:.0f} px, header down to {header:.0f} px")
    finally:
        context.close()
    assert not hidden, hidden


@pytest.mark.browser
def test_hostile_file_names_are_shown_literally_and_run_no_script(browser, hostile_run):
    report = hostile_run["report"]
    c = crawl(browser, (report / "index.html").as_uri(), PHONE)
    assert not c.dialogs, c.dialogs
    assert not c.problems, "\n".join(c.problems[:20])
    text = "\n".join(c.texts.values())
    for name in HOSTILE_NAMES:  # shown text collapses a carriage return to white space
        assert f"n01440764/{name}".replace("\r", " ") in text, name
    shots = Crawl(browser)
    try:
        shots.shoot((report / "predict" / "all-1.html").as_uri(), "report-hostile-names-laptop.png")
        alts = set(shots.page.evaluate("Array.from(document.images).map(i => i.alt)"))
    finally:
        shots.close()
    for name in HOSTILE_NAMES:  # attributes keep the name exactly (a parser reads a literal CR as LF)
        assert any(f"n01440764/{name}" in alt for alt in alts), name
    # a right-to-left override stays inside its name: an isolate closes it before the text after
    assert "\u2068n01440764/evil\u202egpj.exe\u2069" in (report / "predict" / "all-1.html").read_text()
    assert not shots.dialogs and not shots.problems
    skipped = [p for p, s in hostile_run["expected"].items() if s == "skipped"]
    index_text = next(t for u, t in c.texts.items() if u.endswith("/index.html"))
    assert all(p in index_text for p in skipped)


@pytest.mark.browser
def test_run_without_usable_images_renders_and_says_why(browser, skipped_only_run):
    index = (skipped_only_run["report"] / "index.html").as_uri()
    c = crawl(browser, index)
    assert not c.problems, c.problems
    text = c.texts[index]
    assert "no usable image" in text and "all skipped" in text
    assert "predict skipped: no usable image: all 2 files were skipped" in text
    assert "n01440764/empty.jpg" in text and "empty file" in text


@pytest.mark.browser
def test_failing_and_skipped_sections_do_not_stop_the_report(browser, predict_run, tmp_path, monkeypatch):
    from reports.site import build_report

    package = tmp_path / "extra_sections"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "broken_section.py").write_text(
        "def build(site):\n    return site.store.read('catalog/no_such_layer/top_value')\n")
    (package / "empty_section.py").write_text(
        "from reports.site import SectionSkipped\n"
        "def build(site):\n    raise SectionSkipped('no layer was catalogued in this run')\n")
    (package / "unimportable_section.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    report = build_report(predict_run["store"], tmp_path / "out",
                          ["extra_sections.broken_section", "predict", "extra_sections.empty_section",
                           "extra_sections.unimportable_section", "extra_sections.no_such_module"])
    states = {st.key: st for st in report.statuses}
    assert "no_such_module" not in states
    assert states["unimportable_section"].reason == "ModuleNotFoundError: No module named 'no_such_dependency_xyz'"
    assert states["broken_section"].state == "failed" and "KeyError" in states["broken_section"].reason
    assert states["empty_section"].state == "skipped"
    assert states["predict"].state == "built"
    c = crawl(browser, report.index.as_uri())
    assert not c.problems, c.problems
    text = c.texts[report.index.as_uri()]
    assert f"broken_section failed: {states['broken_section'].reason}" in text
    assert "empty_section skipped: no layer was catalogued in this run" in text
    assert any(u.endswith("predict/all-1.html") for u in c.pages)


# ---- the framework, the predictions pages, the comparison, the artifacts ---------------
def test_paginate_splits_items_and_links_pages(tmp_path, predict_run):
    from reports.site import Site
    from storage.store import Store

    site = Site(Store(predict_run["store"], mode="r"), tmp_path)
    items = [{"path": f"img-{i}", "reason": "r"} for i in range(250)]
    names = site.paginate(items, 100, "deep/list/p-{page}.html", "skipped.html", title="t")
    assert names == ["deep/list/p-1.html", "deep/list/p-2.html", "deep/list/p-3.html"]
    seen = []
    for name in names:
        source = (tmp_path / name).read_text()
        seen += re.findall(r'<td class="path">(img-\d+)</td>', source)
        assert 'href="../../style.css"' in source
    assert seen == [it["path"] for it in items]
    second = (tmp_path / names[1]).read_text()
    assert 'href="p-1.html" rel="prev"' in second and 'href="p-3.html" rel="next"' in second
    assert site.paginate([], 10, "none-{page}.html", "skipped.html", title="t") == ["none-1.html"]


def test_a_rebuilt_report_folder_holds_the_new_report_alone(predict_run, tmp_path):
    """A render gone from the store takes its page and pictures with it when the report is
    rebuilt into the same folder; a file the user put there stays."""
    from reports.site import build_report
    from storage.store import Store

    shutil.copytree(predict_run["store"], tmp_path / "s.zarr")
    store, out = Store(tmp_path / "s.zarr"), tmp_path / "report"
    store.write_array("render/dream/kept", np.full((32, 32, 3), 200, np.uint8))
    store.write_array("render/texture/gone", np.zeros((32, 32, 3), np.uint8))
    build_report(store.path, out)
    assert (out / "render" / "texture-1.html").is_file() and (out / "render" / "texture" / "gone.png").is_file()
    (out / "notes.txt").write_text("the user's")
    store.delete("render/texture/gone")
    build_report(store.path, out)
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert not (out / "render" / "texture").exists() and "render/texture-1.html" not in files
    assert {"render/dream-1.html", "render/dream/kept.png", "predict/all-1.html", "notes.txt"} <= files
    assert "render/texture-1.html" not in (out / "render.html").read_text()
    from reports.folder import MANIFEST

    listed = json.loads((out / MANIFEST).read_text())["files"]
    assert files == {*listed, MANIFEST, "notes.txt"}


def test_a_build_killed_half_way_leaves_a_folder_its_rerun_builds_in(predict_run, tmp_path):
    """kill -9 in the middle of a report (no clean-up runs): the rerun of the job must not find
    a folder of files it does not know as a report's."""
    from reports.site import Site, build_report
    from storage.store import Store

    half = Site(Store(predict_run["store"], mode="r"), tmp_path / "r")
    half.image(np.zeros((8, 8, 3), np.uint8), "predict/confidence.png")  # and then the process died
    build_report(predict_run["store"], tmp_path / "r")
    assert (tmp_path / "r" / "index.html").is_file()


def test_a_report_is_not_written_into_a_folder_of_other_files(predict_run, tmp_path):
    from engine.errors import InputError
    from reports.site import build_report

    (tmp_path / "photos" / "2024").mkdir(parents=True)
    (tmp_path / "photos" / "2024" / "holiday.jpg").write_bytes(b"\xff\xd8 not ours")
    with pytest.raises(InputError, match="photos is not a neurocat report folder"):
        build_report(predict_run["store"], tmp_path / "photos")
    assert [p.relative_to(tmp_path).as_posix() for p in sorted((tmp_path / "photos").rglob("*"))] == [
        "photos/2024", "photos/2024/holiday.jpg"]


def test_a_report_of_an_older_neurocat_is_rebuilt_in_place(predict_run, tmp_path):
    """A folder holding a report from before the folder manifest (its pages, no manifest) is
    not refused, as a folder of other files is: the report is rebuilt there and owns its
    files from then on; what the old one held beyond them stays that once."""
    import shutil

    from engine.errors import InputError
    from reports.folder import MANIFEST
    from reports.site import build_report

    old = tmp_path / "old"
    build_report(predict_run["store"], old)
    (old / MANIFEST).unlink()
    (old / "stale.html").write_text("a page of a section that is gone")
    build_report(predict_run["store"], old)
    assert (old / MANIFEST).is_file() and (old / "stale.html").is_file()
    shutil.rmtree(old / "predict", ignore_errors=True)
    (old / MANIFEST).unlink()
    (old / "index.html").write_text("<p>my own page</p>")  # not a report's: refused
    with pytest.raises(InputError, match="not a neurocat report folder"):
        build_report(predict_run["store"], old)


def test_tables_scroll_in_their_own_box_and_card_cells_carry_their_heading():
    """One place does it for every template: a heading's markup is dropped, its text stays escaped."""
    from reports.site import fit_tables

    page = ('<p>x</p><table class="facts"><tr><th>a</th><td>1</td></tr></table>'
            '<table class="rows"><thead><tr><th></th><th>p &amp; q <b>"↓"</b></th><th class="n">n</th></tr></thead>'
            '<tbody><tr><td class="t">i</td><td class="path">&lt;td x</td><td class="n">2</td></tr></tbody></table>')
    assert fit_tables(page) == (
        '<p>x</p><div class="table-scroll"><table class="facts"><tr><th>a</th><td>1</td></tr></table></div>'
        '<div class="table-scroll"><table class="rows"><thead><tr><th></th><th>p &amp; q <b>"↓"</b></th>'
        '<th class="n">n</th></tr></thead><tbody><tr><td class="t">i</td>'
        '<td data-label="p &amp; q &#34;↓&#34;" class="path">&lt;td x</td><td data-label="n" class="n">2</td></tr>'
        '</tbody></table></div>')


def test_predict_pages_list_every_image_once(predict_run):
    report = predict_run["report"]
    table = pd.read_csv(report / "predictions.csv")

    def listed(prefix):
        rows = []
        for page in sorted((report / "predict").glob(f"{prefix}-*.html"), key=lambda p: int(p.stem.split("-")[1])):
            source = page.read_text()
            found = re.findall(r'<td [^>]*class="path">([^<]*)</td>', source)
            assert len(found) <= 100
            assert all('loading="lazy"' in img for img in re.findall(r"<img [^>]*>", source))
            rows += found
        return rows

    assert listed("all") == table["path"].tolist()
    wrong = table[table["label"] != table["pred_wnid"]]
    assert sorted(listed("wrong")) == sorted(wrong["path"])


@pytest.mark.browser
def test_comparison_of_two_models_from_the_cli(prefect_api, predict_run, tmp_path, browser):
    """Run B: another model (a ResNet-18 with seeded random weights, saved as a weights file)
    on the first 30 files of the same data; compared with run A from the command line."""
    import torch
    import torchvision

    from flows.predict import predict_flow

    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "resnet18-random.pth")
    b = predict_flow(RunOptions(data=str(ROOT / "neurocat" / "demo_data"), limit=30, model="resnet18",
                                weights=str(tmp_path / "resnet18-random.pth"), store=str(tmp_path / "b.zarr"),
                                report=str(tmp_path / "b-report")))
    out = subprocess.run(neurocat_cmd() + ["report", "--store", str(predict_run["store"]), "--compare", b["store"],
                                           "--out", str(tmp_path / "cmp"), "--json"],
                         capture_output=True, text=True, env=cli_env(prefect_api), timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout)["report"] == str(tmp_path / "cmp" / "index.html")
    # the expected numbers, straight from the two runs' predictions.csv (same data: same paths)
    from reports.site import fmt  # the page shows numbers through it

    pa = pd.read_csv(predict_run["report"] / "predictions.csv")
    pb = pd.read_csv(tmp_path / "b-report" / "predictions.csv")
    both = pa.merge(pb, on="path", suffixes=("_a", "_b"))
    agree = both["pred_wnid_a"] == both["pred_wnid_b"]
    page = (tmp_path / "cmp" / "predict.html").read_text()
    assert f"<tr><th>shared images (same bytes)</th><td>{len(both)}</td></tr>" in page
    assert f"<tr><th>top-1 agreement</th><td>{fmt(round(agree.mean(), 4))}</td></tr>" in page
    for run in "ab":
        top1 = (both[f"label_{run}"] == both[f"pred_wnid_{run}"]).mean()
        assert f"<tr><th>top-1 accuracy {run.upper()}</th><td>{fmt(round(top1, 4))}</td></tr>" in page
    c = check_whole_site(browser, tmp_path / "cmp")
    assert not c.orphans
    listed = [html.unescape(p) for page in (tmp_path / "cmp" / "predict").glob("disagree-*.html")
              for p in re.findall(r'<td [^>]*class="path">([^<]*)', page.read_text())]
    assert sorted(listed) == sorted(both.loc[~agree, "path"]) and len(listed) > 0
    index = c.texts[(tmp_path / "cmp" / "index.html").as_uri()]
    assert "predict · model" in index and "resnet18" in index and "predict · limit" in index
    bad = subprocess.run(neurocat_cmd() + ["report", "--store", str(predict_run["store"]), "--compare",
                                           str(tmp_path / "missing.zarr")], capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 2 and "no neurocat store" in bad.stderr and "Traceback" not in bad.stderr


def test_every_run_publishes_summary_table_and_link_artifacts(prefect_api, predict_run):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.report import _artifact_key

    key = _artifact_key(str(predict_run["store"]))
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[key, key + "-sections", key + "-timings", key + "-link"])))
    by_key = {a.key: a for a in found}
    assert by_key[key].type == "markdown" and "images usable: 49 of 50" in by_key[key].data
    assert by_key[key + "-sections"].type == "table" and "predict" in json.dumps(by_key[key + "-sections"].data)
    assert by_key[key + "-timings"].type == "table"
    link = by_key[key + "-link"]
    # Prefect stores a link artifact as markdown: [text](url)
    assert link.data == f"[HTML report]({(predict_run['report'] / 'index.html').resolve().as_uri()})"


def test_faithfulness_table_bolds_every_method_tied_for_best():
    """CAM and Grad-CAM at a GAP net's last conv give the same map, so the same scores up
    to float noise: both are the best, as the 3-decimal table shows them."""
    from reports.sections.explain import faithfulness_rows

    attrs = {"better": {"deletion": "lower", "insertion": "higher"},
             "faithfulness": {"gradcam": {"deletion": 0.2021, "insertion": 0.70},
                              "cam": {"deletion": 0.20209999, "insertion": 0.69},
                              "saliency": {"deletion": 0.30, "insertion": 0.64},
                              "random": {"deletion": 0.10, "insertion": 0.90}}}
    best = {r["method"]: r["best"] for r in faithfulness_rows(attrs, ["saliency", "gradcam", "cam"])}
    assert best == {"saliency": [], "gradcam": ["deletion", "insertion"], "cam": ["deletion"], "random": []}


def test_report_sections_import_without_torch():
    """Building a report (`neurocat report`, a report-only machine) needs no torch: importing it
    cost 2-3 s of every report build. Checked in a fresh interpreter."""
    sections = sorted(p.stem for p in (ROOT / "reports" / "sections").glob("*.py") if p.stem != "__init__")
    code = ("import importlib, sys\n"
            f"for name in {sections!r}: importlib.import_module('reports.sections.' + name)\n"
            "import flows.report\n"
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert len(sections) >= 7 and out.stdout.strip() == "[]", out.stdout
