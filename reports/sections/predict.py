"""Predictions section: accuracy and a gallery of images with their top-1 class."""

from __future__ import annotations

from reports.site import Section, Site
from storage.tables import predictions_table


def build(site: Site) -> Section | None:
    if not site.store.has("predict/logits"):
        return None
    table = predictions_table(site.store)
    job = site.store.attrs().get("jobs", {}).get("predict", {})
    top1 = job.get("top1")
    table.to_csv(site.out / "predictions.csv", index=False)
    rows = table.head(200).to_dict("records")
    site.render("predict.html", "predict.html", title="Predictions", rows=rows, total=len(table), top1=top1)
    summary = f"{len(table)} images" + (f", top-1 {top1:.3f}" if top1 is not None else "")
    return Section("predict", "Predictions", "predict.html", summary)
