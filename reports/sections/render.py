"""Render galleries: one page per render kind with a contact sheet and every render's parameters."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from reports.site import Section, Site, safe_name

KINDS = {"dream": "DeepDream", "style": "Neural style", "texture": "Texture synthesis", "fast-style": "Fast style",
         "classvis": "Class visualisation", "invert": "Feature inversion", "featvis": "Feature visualisation",
         "fooling": "Fooling images"}
PER_PAGE = 48


def contact_sheet(images: list[np.ndarray], cell: int = 160, columns: int = 6) -> np.ndarray:
    """All renders as cell x cell tiles (aspect kept, letterboxed white) in one uint8 image."""
    rows = -(-len(images) // columns)
    sheet = np.full((rows * cell, min(columns, len(images)) * cell, 3), 255, np.uint8)
    for i, img in enumerate(images):
        thumb = Image.fromarray(img)
        thumb.thumbnail((cell - 4, cell - 4))
        t = np.asarray(thumb.convert("RGB"))
        y, x = (i // columns) * cell + (cell - t.shape[0]) // 2, (i % columns) * cell + (cell - t.shape[1]) // 2
        sheet[y:y + t.shape[0], x:x + t.shape[1]] = t
    return sheet


def _params_text(attrs: dict) -> str:
    """What a render used: its settings with defaults resolved (a store from before they were
    recorded, or a fast-style image, has only the parameters asked for)."""
    asked = "settings" if "settings" in attrs else "params"
    keep = {k: attrs[k] for k in (asked, "facts", "inputs", "seed", "model", "weights_sha256", "seconds", "loss_first",
                                  "loss_last", "finished", "checkpoint") if k in attrs and (k != "facts" or attrs[k])}
    return json.dumps(keep, indent=1, default=str)


def _kind_page(site: Site, kind: str, names: list[str]) -> dict:
    group = f"render/{kind}"
    items, images = [], []
    for name in names:
        key = f"{group}/{name}"
        img = site.store.read(key)
        attrs = site.store.attrs(key)
        images.append(img)
        steps = []
        if site.store.has(f"{group}/_steps/{name}"):
            stack = site.store.read(f"{group}/_steps/{name}")
            labels = site.store.attrs(f"{group}/_steps/{name}").get("steps", [])
            steps = [{"src": site.thumbnail(s, f"render/{kind}/steps/{safe_name(name)}-{i}.webp", 256), "step": lab}
                     for i, (s, lab) in enumerate(zip(stack, labels))]
        items.append({"name": name, "src": site.image(img, f"render/{kind}/{safe_name(name)}.png"),
                      "shape": "x".join(map(str, img.shape[:2])), "params": _params_text(attrs),
                      "seconds": attrs.get("seconds"), "steps": steps})
    sheet = site.image(contact_sheet(images), f"render/{kind}/contact-sheet.png")
    pages = site.paginate(items, PER_PAGE, f"render/{kind}-{{page}}.html", "render.html",
                          title=KINDS[kind], kind=kind, sheet=sheet, count=len(items))
    return {"kind": kind, "title": KINDS[kind], "href": pages[0], "count": len(items), "sheet": sheet}


def build(site: Site) -> Section | None:
    if not site.store.has("render"):
        return None
    kinds = []
    for kind in KINDS:
        group = f"render/{kind}"
        if not site.store.has(group):
            continue
        names = sorted(k for k in site.store.root[group].array_keys())
        if names:
            kinds.append(_kind_page(site, kind, names))
    if not kinds:
        return None
    site.render("render_index.html", "render.html", title="Renders", kinds=kinds)
    return Section("render", "Renders", "render.html",
                   ", ".join(f"{k['count']} {k['title'].lower()}" for k in kinds))
