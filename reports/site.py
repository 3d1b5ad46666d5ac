"""Turns a store into a self-contained static site: index page plus one page set per section.

Each job adds a module under `reports/sections/` with `build(site) -> Section | None`;
a section returns None when the store holds nothing for it. Templates autoescape every
name, images are written as files, and nothing is fetched from the network.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import io
import platform
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import jinja2
import numpy as np
from PIL import Image

from storage.store import Store

SECTION_MODULES = ["predict", "catalog", "embed", "audit", "explain", "render", "adversarial"]
VERSIONED = ["neurocat", "torch", "torchvision", "prefect", "prefect-dask", "dask", "distributed", "zarr",
             "numpy", "pandas", "faiss-cpu", "scikit-learn", "openTSNE", "pillow", "jinja2", "matplotlib"]


@dataclass
class Section:
    key: str
    title: str
    href: str
    summary: str = ""
    facts: dict = field(default_factory=dict)


class Site:
    """Where section builders write pages and images."""

    def __init__(self, store: Store, out_dir: str | Path):
        self.store = store
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.env = jinja2.Environment(
            loader=jinja2.PackageLoader("reports", "templates"),
            autoescape=jinja2.select_autoescape(default=True, default_for_string=True),
            undefined=jinja2.StrictUndefined,
        )
        self.sections: list[Section] = []

    def render(self, template: str, out_name: str, **context) -> Path:
        depth = out_name.count("/")
        root = "../" * depth
        html = self.env.get_template(template).render(root=root, sections=self.sections, **context)
        path = self.out / out_name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(html, encoding="utf-8")
        return path

    def image(self, array: np.ndarray, rel: str, max_side: int | None = None) -> str:
        """Save uint8 [H, W, 3] (or [H, W]) as a file under the site; return its relative path."""
        img = Image.fromarray(np.asarray(array))
        if max_side and max(img.size) > max_side:
            img.thumbnail((max_side, max_side))
        path = self.out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        fmt = "JPEG" if rel.lower().endswith((".jpg", ".jpeg")) else ("WEBP" if rel.endswith(".webp") else "PNG")
        buf = io.BytesIO()
        img.save(buf, fmt, **({"quality": 88} if fmt in ("JPEG", "WEBP") else {}))
        path.write_bytes(buf.getvalue())
        return rel

    def figure(self, fig, rel: str) -> str:
        """Save a matplotlib figure as PNG under the site."""
        import matplotlib.pyplot as plt

        path = self.out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        return rel


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def build_site(store_path: str | Path, out_dir: str | Path) -> Path:
    """(Re)build the whole report of `store_path` into `out_dir`; return index.html."""
    store = Store(store_path, mode="r")
    site = Site(store, out_dir)
    shutil.copyfile(Path(__file__).with_name("static") / "style.css", site.out / "style.css")
    manifest = store.read_manifest()
    for key in SECTION_MODULES:
        try:
            module = importlib.import_module(f"reports.sections.{key}")
        except ModuleNotFoundError as e:
            if e.name == f"reports.sections.{key}":
                continue
            raise
        section = module.build(site)
        if section is not None:
            site.sections.append(section)
    attrs = store.attrs()
    skipped = manifest[manifest["status"] != "ok"] if len(manifest) else manifest
    return site.render(
        "index.html", "index.html",
        title=f"neurocat report — {store.path.name}",
        store=str(store.path),
        built=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        jobs=attrs.get("jobs", {}),
        timings=attrs.get("timings", {}),
        dataset={"files": len(manifest), "ok": int((manifest["status"] == "ok").sum()) if len(manifest) else 0,
                 "classes": int(manifest["label"].nunique()) if len(manifest) else 0},
        skipped=[{"path": p, "reason": r} for p, r in zip(skipped["path"], skipped["reason"])],
        versions=versions(),
    )
