"""Catalogue section: a neuron atlas.

catalog.html                           layers, first-layer filters
catalog/<layer>/units-<order>-<n>.html unit index, paged, one page set per sort order (no scripts)
catalog/<layer>/unit-<c>.html          one unit: top-K and bottom-K patches with image, class and
                                       score, histogram, quantiles, top classes, feature
                                       visualisation, projection and activation-map overlay
catalog/activations.html               a few images, each beside a grid of every unit's activation
                                       map per layer (tiles link to the units' pages)
"""

from __future__ import annotations


import numpy as np

from engine.atlas import ACTIVATION_GAP, activation_grid, activation_layout, tile_boxes, top_classes
from engine.classes import imagenet_classes
from reports.site import Section, SectionSkipped, Site, safe_name

PER_PAGE = 100
UNIT_BLOCK = 64  # units whose images are read from the store at once
UNIT_IMAGES = ("top_patch", "bottom_patch", "overlay", "projection", "featvis")
# A unit page shows ~26 small pictures: as files, a catalogue of a few hundred units wrote
# thousands, and creating them (~0.3 ms each) was most of the report's build time, so they
# are JPEG data URIs in the page (JPEG encodes a 64-px patch in ~0.07 ms, WebP in ~0.8 ms).
# Only the top-1 patch, which the unit lists show too, is a file.
UNIT_IMAGE_EXT = ".jpg"
ORDERS = {"unit": "unit", "selectivity": "class selectivity (high first)", "rate": "firing rate (high first)"}
HIST_BARS = 48


def _histogram_bars(hist: np.ndarray, edges: np.ndarray) -> dict | None:
    """The occupied range of a log-bin histogram as at most HIST_BARS bars (heights 0..1)."""
    nz = np.flatnonzero(hist)
    if not len(nz):
        return None
    lo, hi = nz[0], nz[-1] + 1
    groups = np.array_split(np.arange(lo, hi), min(HIST_BARS, hi - lo))
    counts = np.array([hist[g].sum() for g in groups], np.float64)
    bound = np.concatenate([[-np.inf], edges, [np.inf]])
    return {"heights": (counts / counts.max()).round(4).tolist(), "counts": counts.astype(int).tolist(),
            "lo": float(bound[lo]), "hi": float(bound[hi])}


class _Layer:
    """Everything the pages of one catalogued layer need, read once from the store."""

    def __init__(self, site: Site, layer: str):
        s, base = site.store, f"catalog/{layer}"
        self.layer, self.slug, self.base = layer, safe_name(layer), base
        self.attrs = s.attrs(f"{base}/stats")
        read = lambda name: s.read(f"{base}/{name}")  # noqa: E731
        self.stats = {k: read(f"stats/{k}") for k in ("mean", "std", "min", "max", "rate", "dead", "selectivity",
                                                       "quantiles", "hist", "class_mean")}
        self.edges = np.asarray(s.attrs(f"{base}/stats/hist")["edges"])
        self.levels = s.attrs(f"{base}/stats/quantiles")["levels"]
        self.lists = {w: (read(f"{w}_value"), read(f"{w}_index")) for w in ("top", "bottom")}
        self.units = len(self.stats["mean"])
        self.images = {name: s.array(f"{base}/{name}") for name in UNIT_IMAGES if s.has(f"{base}/{name}")}
        self.featvis_dead = set(s.attrs(f"{base}/featvis").get("dead_units", [])) if "featvis" in self.images else set()
        self.projection_rule = s.attrs(f"{base}/projection").get("rule") if "projection" in self.images else None

    def unit_images(self, c0: int, c1: int) -> dict[str, np.ndarray]:
        """Patches, overlays, projections and feature visualisations of units [c0, c1), one read each."""
        return {name: arr[c0:min(c1, arr.shape[0])] for name, arr in self.images.items()}


def _unit_rows(site: Site, L: _Layer, labels: np.ndarray) -> list[dict]:
    """One row per unit for the index pages (writes each unit's top-1 patch thumbnail)."""
    st = L.stats
    tops = top_classes(L.lists["top"][1], labels, n=1)
    name_of = imagenet_classes().name_of
    rows = []
    for c in range(L.units):
        has_top = L.lists["top"][1][c, 0] >= 0
        thumb = f"catalog/{L.slug}/u{c}-top0{UNIT_IMAGE_EXT}" if has_top else None  # written with the unit's page
        rows.append({"unit": c, "href": f"unit-{c}.html", "thumb": thumb, "dead": bool(st["dead"][c]),
                     "selectivity": float(st["selectivity"][c]), "rate": float(st["rate"][c]),
                     "mean": float(st["mean"][c]), "max": float(st["max"][c]),
                     "top_class": name_of(tops[c][0][0]) if tops[c] else "",
                     "top_class_count": tops[c][0][1] if tops[c] else 0})
    return rows


def _sorted(rows: list[dict], order: str) -> list[dict]:
    if order == "unit":
        return rows
    key = (lambda r: (-(r[order] if np.isfinite(r[order]) else -np.inf), r["unit"]))
    return sorted(rows, key=key)


def _unit_page(site: Site, L: _Layer, c: int, images: dict[str, np.ndarray], row: dict, paths: list[str],
               labels: np.ndarray, tops) -> None:
    """Unit c's page; `images` are its rows of the layer's image arrays."""
    st = L.stats
    classes = imagenet_classes()
    lists = {}

    def picture(name: str) -> str | None:
        return site.inline_thumbnail(images[name], max_side=256) if name in images else None

    for which in ("top", "bottom"):
        values, index = L.lists[which]
        patches = images[f"{which}_patch"]
        items = []
        for k, (v, i) in enumerate(zip(values[c], index[c])):
            if i < 0:
                continue
            img = (site.thumbnail(patches[k], row["thumb"]) if (which, k) == ("top", 0)  # the unit lists' thumbnail
                   else site.inline_thumbnail(patches[k]))
            items.append({"img": img,
                          "path": paths[i], "label": classes.name_of(labels[i]), "score": float(v),
                          "rank": k + 1})
        lists[which] = items
    class_mean = st["class_mean"][c]
    known = np.flatnonzero(~np.isnan(class_mean))
    best = known[np.argsort(-class_mean[known], kind="stable")[:5]]
    facts = {"images": L.attrs.get("images"), "mean score": f"{st['mean'][c]:.4g}", "std": f"{st['std'][c]:.4g}",
             "min / max": f"{st['min'][c]:.4g} / {st['max'][c]:.4g}", "firing rate": f"{st['rate'][c]:.3f}",
             "class selectivity": f"{st['selectivity'][c]:.3f}" if np.isfinite(st["selectivity"][c]) else "–"}
    featvis = None if c in L.featvis_dead else picture("featvis")
    site.render(
        "catalog_unit.html", f"catalog/{L.slug}/unit-{c}.html", title=f"{L.layer} unit {c}", layer=L.layer,
        unit=c, units=L.units, row=row, facts=facts, lists=lists,
        quantiles=list(zip(L.levels, st["quantiles"][c].tolist())),
        hist=_histogram_bars(st["hist"][c], L.edges),
        top_classes=[{"name": classes.name_of(w), "wnid": w, "count": n} for w, n in tops[c]],
        class_means=[{"name": classes.names[k], "wnid": classes.wnids[k], "mean": float(class_mean[k])} for k in best],
        overlay=picture("overlay") if lists["top"] else None,
        projection=picture("projection"),
        projection_rule=L.projection_rule,
        featvis=featvis, featvis_state=("dead" if c in L.featvis_dead or row["dead"] else
                                        ("ok" if featvis else "not rendered")))


def _activation_page(site: Site, layers: list[str], labels: np.ndarray) -> str | None:
    """Each image of `catalog/activation_inputs` beside, per layer, the grid of its units' activation maps."""
    store = site.store
    if not store.has("catalog/activation_inputs"):
        return None
    inputs = store.array("catalog/activation_inputs")
    name_of = imagenet_classes().name_of
    image_index = store.attrs("catalog/activation_inputs")["image_index"]
    layers = [layer for layer in layers if store.has(f"catalog/{layer}/activation_maps")
              and store.attrs(f"catalog/{layer}/activation_maps").get("image_index") == image_index]
    if not layers or not image_index:
        return None
    peaks = {layer: store.read(f"catalog/{layer}/stats/max") for layer in layers}
    images = []
    for m, i in enumerate(image_index):
        grids = []
        for layer in layers:
            maps = store.array(f"catalog/{layer}/activation_maps")[m].astype(np.float32)  # one chunk
            c, h, w = maps.shape
            scale, cols = activation_layout(c, h, w)
            boxes = tile_boxes(c, h * scale, w * scale, cols, ACTIVATION_GAP)
            on_image = maps.reshape(c, -1).max(1)
            grids.append({
                "layer": layer, "units": c, "h": h, "w": w, "name": f"act-{m}-{safe_name(layer)}",
                "img": site.image(activation_grid(maps, peaks[layer]), f"catalog/activations/{m}-{safe_name(layer)}.png"),
                "tiles": [{"coords": ",".join(map(str, box)), "href": f"{safe_name(layer)}/unit-{u}.html",
                           "title": f"unit {u}: max {on_image[u]:.3g} here, {peaks[layer][u]:.3g} on the dataset"}
                          for u, box in enumerate(boxes)]})
        images.append({"index": i, "path": site.manifest["path"].iloc[i], "label": name_of(labels[i]),
                       "img": site.image(inputs[m], f"catalog/activations/{m}-input.webp"), "side": inputs.shape[1],
                       "grids": grids})
    site.render("catalog_activations.html", "catalog/activations.html", title="Activation maps", images=images)
    return "catalog/activations.html"


def build(site: Site) -> Section | None:
    store = site.store
    if not store.has("catalog") or not store.groups("catalog"):
        return None
    manifest = site.manifest
    labels = manifest["label"].to_numpy(dtype=object) if len(manifest) else np.zeros(0, object)
    layers = [layer for layer in store.groups("catalog") if store.has(f"catalog/{layer}/stats/mean")]
    if not layers:
        raise SectionSkipped("the catalogue job did not finish")
    paths = manifest["path"].tolist()
    cards = []
    for layer in layers:
        L = _Layer(site, layer)
        rows = _unit_rows(site, L, labels)
        tops = top_classes(L.lists["top"][1], labels, n=3)
        for c0 in range(0, L.units, UNIT_BLOCK):
            block = L.unit_images(c0, c0 + UNIT_BLOCK)
            for c in range(c0, min(c0 + UNIT_BLOCK, L.units)):
                images = {name: arr[c - c0] for name, arr in block.items() if c - c0 < len(arr)}
                _unit_page(site, L, c, images, rows[c], paths, labels, tops)
        first = {}
        for order, label in ORDERS.items():
            pages = site.paginate(_sorted(rows, order), PER_PAGE, f"catalog/{L.slug}/units-{order}-{{page}}.html",
                                  "catalog_units.html", title=f"{layer}: units by {label}", layer=layer,
                                  order=order, orders=ORDERS, slug=L.slug)
            first[order] = pages[0]
        rate = L.stats["rate"]
        cards.append({"layer": layer, "units": L.units, "images": L.attrs.get("images"),
                      "dead": int(L.stats["dead"].sum()), "href": first["unit"], "orders": first,
                      "rate": float(np.nanmean(rate)) if len(rate) else None,
                      "selectivity": float(np.nanmean(L.stats["selectivity"])) if len(rate) else None,
                      "top_k": L.lists["top"][1].shape[1], "bottom_k": L.lists["bottom"][1].shape[1],
                      "featvis": L.images["featvis"].shape[0] if "featvis" in L.images else 0})
    filters = None
    if store.has("catalog/first_layer_filters"):
        filters = {"img": site.image(store.read("catalog/first_layer_filters"), "catalog/first_layer_filters.png"),
                   "layer": store.attrs("catalog/first_layer_filters").get("layer")}
    job = store.attrs().get("jobs", {}).get("catalog", {})
    activations = _activation_page(site, layers, labels)
    site.render("catalog.html", "catalog/index.html", title="Neuron catalogue", cards=cards, filters=filters,
                activations=activations, seconds=job.get("seconds", {}))
    summary = ", ".join(f"{c['layer']}: {c['units']} units" for c in cards)
    return Section("catalog", "Catalogue", "catalog/index.html", summary,
                   {"layers": len(cards), "units": sum(c["units"] for c in cards),
                    "dead units": sum(c["dead"] for c in cards)})
