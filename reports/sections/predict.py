"""Predictions section: accuracy, confidence, frequent confusions and a paged, lazily
thumbnailed list of every image with its top-1 class; `compare` matches two runs' images
by content hash and reports agreement and accuracy of both."""

from __future__ import annotations

import numpy as np
import pandas as pd

from engine.classes import imagenet_classes
from reports.site import Section, SectionSkipped, Site
from storage.files import write_csv
from storage.store import Store
from storage.tables import predictions_table

PER_PAGE = 100
THUMB = 96


def predictions(store: Store) -> pd.DataFrame:
    """The predictions table plus manifest index, content hash, label name and correctness."""
    manifest = store.read_manifest()
    ok = np.flatnonzero(manifest["status"].values == "ok")
    table = predictions_table(store)
    classes = imagenet_classes()
    table.insert(0, "index", ok)
    table["sha256"] = manifest["sha256"].values[ok]
    labelled = table["label"].isin(classes.index_of)
    table["label_name"] = [classes.names[classes.index_of[w]] if w in classes.index_of else "" for w in table["label"]]
    table["correct"] = np.where(labelled, table["label"] == table["pred_wnid"], np.nan)
    return table


def accuracy(table: pd.DataFrame) -> float | None:
    known = table["correct"].dropna()
    return float(known.mean()) if len(known) else None


def confidence_figure(table: pd.DataFrame):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 2.6))
    bins = np.linspace(0, 1, 21)
    groups = [("correct", table["correct"] == 1, "#2f7d4f"), ("wrong", table["correct"] == 0, "#c0392b"),
              ("no ImageNet label", table["correct"].isna(), "#7f8796")]
    for name, mask, color in groups:
        if mask.any():
            ax.hist(table.loc[mask, "prob"], bins=bins, alpha=0.75, label=f"{name} ({int(mask.sum())})", color=color)
    ax.set_xlabel("top-1 probability")
    ax.set_ylabel("images")
    ax.legend(frameon=False, fontsize=8)
    ax.spines[["top", "right"]].set_visible(False)
    return fig


def rows_with_thumbs(site: Site, table: pd.DataFrame) -> list[dict]:
    rows = table.to_dict("records")
    for row, thumb in zip(rows, site.dataset_thumbnails(table["index"].tolist(), THUMB)):
        row["thumb"] = thumb
    return rows


def build(site: Site) -> Section | None:
    if not site.store.has("predict/logits"):
        return None
    manifest = site.manifest
    if not (manifest["status"] == "ok").any():
        raise SectionSkipped(f"no usable image: all {len(manifest)} files were skipped" if len(manifest)
                             else "no usable image: the data folder is empty")
    table = predictions(site.store)
    write_csv(site.file("predictions.csv"), table[["path", "label", "pred_index", "pred_wnid", "pred_name", "prob"]])
    top1 = accuracy(table)
    wrong = table[table["correct"] == 0]
    confusions = (wrong.groupby(["label", "label_name", "pred_wnid", "pred_name"]).size()
                  .sort_values(ascending=False).head(15).reset_index(name="count").to_dict("records"))
    rows = rows_with_thumbs(site, table)
    wrong_rows = [r for r in rows if r["correct"] == 0]
    all_pages = site.paginate(rows, PER_PAGE, "predict/all-{page}.html", "predict_list.html",
                              title="Predictions: all images", heading="All images", thumb_size=THUMB)
    wrong_pages = site.paginate(wrong_rows, PER_PAGE, "predict/wrong-{page}.html", "predict_list.html",
                                title="Predictions: misclassified", heading="Misclassified images",
                                thumb_size=THUMB) if wrong_rows else [None]
    figure = site.figure(confidence_figure(table), "predict/confidence.png")
    labelled = int(table["correct"].notna().sum())
    facts = {"images": len(table), "with an ImageNet label": labelled,
             "top-1 accuracy": None if top1 is None else round(top1, 4),
             "misclassified": len(wrong), "mean top-1 probability": round(float(table["prob"].mean()), 4)}
    site.render("predict.html", "predict.html", title="Predictions", facts=facts, top1=top1, figure=figure,
                confusions=confusions, all_href=all_pages[0], wrong_href=wrong_pages[0], wrong=len(wrong),
                preview=rows[:12], thumb_size=THUMB)
    summary = f"{len(table)} images" + (f", top-1 {top1:.3f}" if top1 is not None else "") + (
        f" ({labelled} labelled)" if top1 is not None and labelled < len(table) else "")
    return Section("predict", "Predictions", "predict.html", summary, facts)


def compare(site: Site, store_a: Store, store_b: Store) -> Section | None:
    """Agreement and accuracy of two runs on the images they share (matched by sha256)."""
    if not (store_a.has("predict/logits") and store_b.has("predict/logits")):
        return None
    a, b = predictions(store_a), predictions(store_b)
    both = a.drop_duplicates("sha256").merge(b.drop_duplicates("sha256"), on="sha256", suffixes=("_a", "_b"))
    if not len(both):
        raise SectionSkipped("the two runs share no image (matched by content hash)")
    agree = both["pred_wnid_a"] == both["pred_wnid_b"]
    ca, cb = both["correct_a"], both["correct_b"]
    labelled = ca.notna()
    facts = {
        "images in A / B": f"{len(a)} / {len(b)}",
        "shared images (same bytes)": len(both),
        "top-1 agreement": round(float(agree.mean()), 4),
        "top-1 accuracy A": round(float(ca[labelled].mean()), 4) if labelled.any() else None,
        "top-1 accuracy B": round(float(cb[labelled].mean()), 4) if labelled.any() else None,
        "both right": int(((ca == 1) & (cb == 1)).sum()),
        "only A right": int(((ca == 1) & (cb == 0)).sum()),
        "only B right": int(((ca == 0) & (cb == 1)).sum()),
        "both wrong": int(((ca == 0) & (cb == 0)).sum()),
        "mean |Δ probability| when agreeing": round(float((both["prob_a"] - both["prob_b"])[agree].abs().mean()), 4)
        if agree.any() else None,
    }
    rows = both[~agree].to_dict("records")
    for row, thumb in zip(rows, site.dataset_thumbnails([r["index_a"] for r in rows], THUMB)):
        row["thumb"] = thumb
    pages = site.paginate(rows, PER_PAGE, "predict/disagree-{page}.html", "predict_disagree.html",
                          title="Predictions: where the runs disagree", thumb_size=THUMB) if rows else [None]
    site.render("predict_compare.html", "predict.html", title="Predictions compared", facts=facts,
                disagree=len(rows), disagree_href=pages[0])
    summary = f"{len(both)} shared images, agreement {facts['top-1 agreement']:.3f}"
    if facts["top-1 accuracy A"] is not None:
        summary += f", top-1 {facts['top-1 accuracy A']:.3f} → {facts['top-1 accuracy B']:.3f}"
    return Section("predict", "Predictions", "predict.html", summary, facts)
