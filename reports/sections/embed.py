"""Feature-space section: index and map quality per space, PCA and t-SNE scatters coloured by
class, the t-SNE image grid, and nearest-neighbour galleries (pixel space beside feature space)
for sample queries. Thumbnails come from the store's `/thumbs`, so the report never needs the
data folder."""

from __future__ import annotations

import numpy as np

from reports.site import Section, SectionSkipped, Site
from storage.store import file_list_digest

PIXELS = "pixels"
QUERIES = 48  # sample queries in the neighbour galleries
PER_PAGE = 12
SHOWN = 8  # neighbours shown per query and space
THUMB = 64


def spaces(site: Site) -> list[str]:
    """Embedded layers of the store (the pixel space is shown beside them, not as one)."""
    if not site.store.has("embed"):
        return []
    return [g for g in site.store.groups("embed") if g != PIXELS and site.store.has(f"embed/{g}/knn_index")]


def sample_queries(rows: np.ndarray, count: int = QUERIES) -> np.ndarray:
    """Evenly spaced usable images: deterministic, and spread over the (sorted) classes."""
    if len(rows) <= count:
        return rows
    return rows[np.linspace(0, len(rows) - 1, count).round().astype(int)]


class Thumbs:
    """One small WebP per dataset image shown, cut from `/thumbs` once."""

    def __init__(self, site: Site):
        self.site = site
        self.array = site.store.array("thumbs")
        self.made: dict[int, str] = {}

    def __call__(self, index: int) -> str:
        if index not in self.made:
            self.made[index] = self.site.thumbnail(self.array[int(index)], f"embed/thumbs/{int(index)}.webp", THUMB)
        return self.made[index]


def class_colours(labels: list) -> tuple[np.ndarray, list[tuple[str, tuple]]]:
    """RGBA per point by label, and a legend when there are few enough labels to read one.

    Many labels get a continuous colour map in sorted label order, so WordNet ids (sorted
    roughly by the hierarchy: animals, then objects, then food...) keep related classes near in hue.
    """
    import matplotlib

    names = sorted(set(labels))
    order = {name: i for i, name in enumerate(names)}
    few = len(names) <= 20
    cmap = matplotlib.colormaps["tab10" if len(names) <= 10 else ("tab20" if few else "turbo")]

    def colour(name):
        return cmap(order[name] if few else order[name] / max(1, len(names) - 1))

    colours = np.array([colour(lab) for lab in labels]).reshape(-1, 4)
    return colours, [(n, colour(n)) for n in names] if few else []


def scatter_figure(xy: np.ndarray, labels: list, title: str, note: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours, legend = class_colours(labels)
    fig, ax = plt.subplots(figsize=(4.6, 4.3))
    size = float(np.clip(3000 / max(1, len(xy)), 2, 36))
    ax.scatter(xy[:, 0], xy[:, 1], c=colours, s=size, linewidths=0, alpha=0.85)
    for name, colour in legend:  # a class named `$1_to_$2` is text, not matplotlib mathtext
        ax.scatter([], [], color=colour, label=str(name).replace("$", r"\$"), s=20)
    if legend:
        ax.legend(frameon=False, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    ax.set_title(title, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel(note, fontsize=8)
    return fig


def grid_mosaic(thumbs, grid: np.ndarray, cell: int) -> np.ndarray:
    """uint8 image of the t-SNE grid: each cell the thumbnail of its image, empty cells light grey."""
    import torch
    import torch.nn.functional as F

    rows, cols = grid.shape
    out = np.full((rows * cell, cols * cell, 3), 235, np.uint8)
    filled = np.flatnonzero(grid.ravel() >= 0)
    if not len(filled):
        return out
    wanted = np.unique(grid.ravel()[filled])
    images = thumbs.get_orthogonal_selection((wanted,))
    by_index = {int(i): n for n, i in enumerate(wanted)}
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    small = F.interpolate(x, size=(cell, cell), mode="area").round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
    for flat in filled:
        r, c = divmod(int(flat), cols)
        out[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell] = small[by_index[int(grid.ravel()[flat])]]
    return out


def space_row(name: str, attrs: dict) -> dict:
    rnd = lambda v: None if v is None else round(float(v), 4)  # noqa: E731
    t = attrs.get("timings", {})
    return {"space": name, "kind": attrs.get("kind"), "metric": attrs.get("metric"), "images": attrs.get("images"),
            "k": attrs.get("k"), "recall": rnd(attrs.get("recall@10")), "trust_pca": rnd(attrs.get("trust_pca")),
            "trust_tsne": rnd(attrs.get("trust_tsne")), "gpu": attrs.get("gpu"),
            "seconds": round(sum(t.values()), 2), "breakdown": ", ".join(f"{k} {v:.2f} s" for k, v in t.items())}


def label_agreement(knn: np.ndarray, labels: np.ndarray, rows: np.ndarray) -> float | None:
    """Mean fraction of an image's neighbours that share its label (None unless most labels repeat)."""
    lab = labels[rows]
    if len(rows) < 2 or len(set(lab)) > len(lab) / 2 or knn.shape[1] == 0:
        return None
    nb = knn[rows]
    return float((labels[np.clip(nb, 0, None)] == lab[:, None])[nb >= 0].mean())


def build_layer(site: Site, layer: str, thumbs: Thumbs, rows: np.ndarray, labels: np.ndarray) -> dict:
    store = site.store
    base = f"embed/{layer}"
    attrs = store.attrs(base)
    knn = store.read(f"{base}/knn_index")
    dist = store.read(f"{base}/knn_dist")
    has_pixels = store.has(f"embed/{PIXELS}/knn_index")
    pix = store.read(f"embed/{PIXELS}/knn_index") if has_pixels else None
    pix_dist = store.read(f"embed/{PIXELS}/knn_dist") if has_pixels else None
    manifest = site.manifest
    figures = {}
    for key, title in (("pca", "PCA"), ("tsne", "t-SNE")):
        if store.has(f"{base}/{key}"):
            xy = store.read(f"{base}/{key}")[rows]
            note = ""
            if key == "pca" and attrs.get("pca_explained"):
                note = "explained variance " + " + ".join(f"{v:.1%}" for v in attrs["pca_explained"])
            elif key == "tsne" and attrs.get("trust_tsne") is not None:
                note = f"trustworthiness@10 {attrs['trust_tsne']:.3f}"
                if attrs.get("affinities"):
                    note += f"; affinities {attrs['affinities']}"
            figures[key] = site.figure(scatter_figure(xy, list(labels[rows]), f"{layer}: {title}, coloured by class", note),
                                       f"embed/{layer}-{key}.png")
    grid_img = None
    if store.has(f"{base}/grid"):
        grid = store.read(f"{base}/grid")
        cell = int(np.clip(1600 // max(1, grid.shape[1]), 24, THUMB))
        grid_img = site.image(grid_mosaic(store.array("thumbs"), grid, cell), f"embed/{layer}-grid.webp")

    def neighbours(graph, distances, q):
        return [{"index": int(j), "thumb": thumbs(j), "path": manifest["path"].iat[int(j)],
                 "same": labels[int(j)] == labels[q], "distance": float(d)}
                for j, d in zip(graph[q][:SHOWN], distances[q][:SHOWN]) if j >= 0]

    queries = [{"index": int(q), "thumb": thumbs(q), "path": manifest["path"].iat[int(q)], "label": labels[q],
                "features": neighbours(knn, dist, q), "pixels": neighbours(pix, pix_dist, q) if has_pixels else []}
               for q in sample_queries(rows)]
    pages = site.paginate(queries, PER_PAGE, f"embed/{layer}-neighbours-{{page}}.html", "embed_neighbours.html",
                          title=f"Nearest neighbours: {layer}", layer=layer, has_pixels=has_pixels, thumb_size=THUMB)
    agreement = {"features": label_agreement(knn, labels, rows),
                 "pixels": label_agreement(pix, labels, rows) if has_pixels else None}
    return {"layer": layer, "attrs": attrs, "figures": figures, "grid": grid_img, "neighbours_href": pages[0],
            "queries": len(queries), "agreement": agreement}


def build(site: Site) -> Section | None:
    layers = spaces(site)
    if not layers:
        return None
    manifest = site.manifest
    stale = [layer for layer in layers if site.store.attrs(f"embed/{layer}").get("file_list") not in
             (None, file_list_digest(manifest))]
    if stale:  # their rows would name other files
        raise SectionSkipped(f"made on another file list than the store's manifest ({', '.join(stale)}): "
                         "run `neurocat embed` on this store again")
    rows = np.flatnonzero(manifest["status"].values == "ok")
    if len(rows) < 2:
        raise SectionSkipped(f"{len(rows)} usable image(s): nothing to compare in feature space")
    labels = manifest["label"].fillna("(unlabelled)").astype(str).to_numpy(dtype=object)
    thumbs = Thumbs(site)
    blocks = [build_layer(site, layer, thumbs, rows, labels) for layer in layers]
    table = [space_row(layer, site.store.attrs(f"embed/{layer}")) for layer in layers]
    if site.store.has(f"embed/{PIXELS}"):
        table.append(space_row(PIXELS, site.store.attrs(f"embed/{PIXELS}")))
    site.render("embed.html", "embed.html", title="Feature space", blocks=blocks, table=table)
    main = blocks[0]["attrs"]
    facts = {"layers": ", ".join(layers), "images": main.get("images"), "index": main.get("kind"),
             "recall@10": main.get("recall@10"), "t-SNE trustworthiness": main.get("trust_tsne")}
    summary = f"{', '.join(layers)}: {main.get('images')} images, {main.get('kind')} index"
    if main.get("trust_tsne") is not None:
        summary += f", t-SNE trustworthiness {main['trust_tsne']:.3f}"
    return Section("embed", "Feature space", "embed.html", summary, facts)
