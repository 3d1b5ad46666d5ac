"""Explanations section: which attribution method to trust for this model (faithfulness
table against a random ordering), then paged overlays of every method side by side per
image, with the saliency-seeded GrabCut mask."""

from __future__ import annotations

import numpy as np

from engine.classes import imagenet_classes
from reports.site import Section, SectionSkipped, Site

PER_PAGE = 20
MAX_IMAGES = 400  # overlays are written for the first explained images only
JOB, INFO = "explain", "explain_info"
SCORE_LABELS = {"deletion": "deletion AUC", "insertion": "insertion AUC", "road_morf": "ROAD MoRF",
                "road_lerf": "ROAD LeRF", "road": "ROAD (LeRF − MoRF)"}


def heat_overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """uint8 image [S, S, 3] blended with the positive part of `heat` [H, W] in the jet colormap."""
    import matplotlib

    side = image.shape[0]
    h = np.clip(np.nan_to_num(heat.astype(np.float32)), 0, None)
    f = h.shape[0] // side
    h = h[:f * side, :f * side].reshape(side, f, side, f).mean((1, 3)) if f > 1 else h
    h = h / h.max() if h.max() > 0 else h
    colour = matplotlib.colormaps["jet"](h)[..., :3] * 255
    return (image * (1 - alpha) + colour * alpha).round().clip(0, 255).astype(np.uint8)


def masked(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The image with its background darkened to a quarter."""
    side = image.shape[0]
    f = mask.shape[0] // side
    m = mask[:f * side, :f * side].reshape(side, f, side, f).mean((1, 3)) if f > 1 else mask.astype(np.float32)
    return (image * (0.25 + 0.75 * m[..., None])).round().astype(np.uint8)


def faithfulness_rows(attrs: dict, methods: list[str]) -> list[dict]:
    """One row per method plus the random reference, with how many scores beat random."""
    summary = attrs.get("faithfulness", {})
    better = attrs.get("better", {})
    reference = summary.get("random", {})
    rows = []
    for name in [*methods, "random"]:
        facts = summary.get(name, {})
        row = {"method": name, "scores": {k: facts.get(k) for k in SCORE_LABELS}, "wins": 0, "compared": 0,
               "completeness": facts.get("completeness_error_median"),
               "completeness_max": facts.get("completeness_error_max"), "steps_max": facts.get("steps_max")}
        if name != "random":
            for k in SCORE_LABELS:
                if facts.get(k) is not None and reference.get(k) is not None:
                    row["compared"] += 1
                    lower = better.get(k) == "lower"
                    row["wins"] += int(facts[k] < reference[k] if lower else facts[k] > reference[k])
        rows.append(row)
    # the best score of each column among the methods, as shown (3 decimals): ties are all bold
    shown = [{k: round(v, 3) for k, v in r["scores"].items() if v is not None} if r["method"] != "random" else {}
             for r in rows]
    best = {k: (min if better.get(k) == "lower" else max)(vals)
            for k in SCORE_LABELS if (vals := [s[k] for s in shown if k in s])}
    for r, s in zip(rows, shown):
        r["best"] = [k for k in SCORE_LABELS if k in s and s[k] == best[k]]
    return rows


def image_rows(site: Site, methods: list[str], explained: np.ndarray) -> list[dict]:
    """Overlay files (one per method, plus the mask) for the first explained images."""
    store, manifest, classes = site.store, site.manifest, imagenet_classes()
    target, prob = store.read(f"{INFO}/target"), store.read(f"{INFO}/prob")
    images_arr = store.array(f"{INFO}/image")
    has_mask = store.has(f"{INFO}/mask")
    scores = {m: store.read(f"{INFO}/scores/{m}") for m in methods if store.has(f"{INFO}/scores/{m}")}

    def ig_info(name: str) -> np.ndarray | None:
        key = f"{INFO}/integrated_gradients_{name}"
        return store.read(key) if "integrated_gradients" in methods and store.has(key) else None

    completeness, ig_steps = ig_info("completeness_error"), ig_info("steps")
    rows = []
    for start in range(0, len(explained), PER_PAGE):  # a page's worth of rows in memory at a time
        idx = explained[start:start + PER_PAGE]
        pixels = images_arr.get_orthogonal_selection((idx,))
        maps = {m: store.array(f"{JOB}/{m}").get_orthogonal_selection((idx,)) for m in methods}
        masks = store.array(f"{INFO}/mask").get_orthogonal_selection((idx,)) if has_mask else None
        for j, i in enumerate(idx):
            key = str(manifest.iloc[i]["sha256"])[:16]
            t = int(target[i])
            row = {"path": manifest.iloc[i]["path"], "label": manifest.iloc[i]["label"],
                   "target": f"{classes.names[t]} ({t})", "prob": float(prob[i]),
                   "image": site.image(pixels[j], f"explain/img/{i}-{key}.jpg"), "overlays": [], "mask": None}
            for m in methods:
                deletion = float(scores[m][i, 0]) if m in scores else None
                ig = m == "integrated_gradients"
                error = float(completeness[i]) if ig and completeness is not None else None
                steps = int(ig_steps[i]) if ig and ig_steps is not None else None
                row["overlays"].append({"method": m, "deletion": deletion, "completeness": error, "steps": steps,
                                        "src": site.image(heat_overlay(pixels[j], maps[m][j]),
                                                          f"explain/{m}/{i}-{key}.jpg")})
            if masks is not None:
                row["mask"] = site.image(masked(pixels[j], masks[j]), f"explain/mask/{i}-{key}.jpg")
                row["mask_share"] = float(masks[j].mean())
            rows.append(row)
    return rows


def build(site: Site) -> Section | None:
    store = site.store
    if not store.has(JOB) or not store.has(f"{INFO}/target"):
        return None
    attrs = store.attrs(JOB)
    methods = [m for m in attrs.get("methods", []) if store.has(f"{JOB}/{m}")]
    explained = np.flatnonzero(store.read(f"{INFO}/target") >= 0)
    if not methods or not len(explained):
        raise SectionSkipped("no image was explained (no usable image in the explained range)")
    shown = explained[:MAX_IMAGES]
    rows = image_rows(site, methods, shown)
    pages = site.paginate(rows, PER_PAGE, "explain/images-{page}.html", "explain_images.html",
                          title="Explanations: overlays", methods=methods, segment_with=attrs.get("segment_with"))
    table = faithfulness_rows(attrs, methods)
    target = attrs.get("target")
    facts = {"images explained": len(explained), "methods": ", ".join(methods),
             "class explained": {"pred": "the prediction", "label": "the folder label (prediction where unknown)"}
             .get(target, f"class {target}"),
             "faithfulness curve steps": attrs.get("faithfulness_steps"),
             "masks seeded by": attrs.get("segment_with") or "–"}
    site.render("explain.html", "explain.html", title="Explanations", facts=facts, table=table,
                labels=SCORE_LABELS, better=attrs.get("better", {}), images_href=pages[0], shown=len(shown),
                total=len(explained), preview=rows[:4], methods=methods, params=attrs.get("params", {}))
    trusted = [r for r in table if r["method"] != "random" and r["compared"] and r["wins"] == r["compared"]]
    summary = f"{len(explained)} images × {len(methods)} methods"
    if trusted:
        summary += "; better than random on every score: " + ", ".join(r["method"] for r in trusted)
    return Section("explain", "Explanations", "explain.html", summary, facts)
