"""A comparison site of two runs (two audits of a dataset, or two models on the same data).

The index sets the runs side by side: dataset (and how many images they share, by content
hash), models and parameters that differ, timings per stage; then every section module
that defines `compare(site, store_a, store_b) -> Section | None` adds its own pages
(predict: agreement and accuracy on the shared images). A hook that raises is reported on
the index in one line, like a section of a single-run report.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

from reports.site import (SECTION_MODULES, Report, Site, dataset_summary, model_summary, run_section,
                          versions)
from storage.store import Store

DATASET_ROWS = [("files", "files found"), ("ok", "usable images"), ("skipped", "skipped"),
                ("labels", "labels"), ("duplicates", "exact duplicates")]


def param_diff(jobs_a: dict, jobs_b: dict) -> list[dict]:
    """(job, parameter, A, B) for every parameter of a job both ran that differs."""
    rows = []
    for job in sorted(set(jobs_a) & set(jobs_b)):
        pa, pb = jobs_a[job].get("params") or {}, jobs_b[job].get("params") or {}
        for key in sorted(set(pa) | set(pb)):
            if key not in ("store", "report") and pa.get(key) != pb.get(key):
                rows.append({"job": job, "param": key, "a": pa.get(key), "b": pb.get(key)})
    return rows


def timing_rows(ta: dict, tb: dict) -> list[dict]:
    """Per job and stage: seconds in A, in B, and B / A."""
    rows = []
    for job in list(dict.fromkeys([*ta, *tb])):
        stages = list(dict.fromkeys([*ta.get(job, {}), *tb.get(job, {})]))
        for st in stages:
            a, b = ta.get(job, {}).get(st), tb.get(job, {}).get(st)
            rows.append({"job": job, "stage": st, "a": a, "b": b, "ratio": (b / a) if a and b is not None else None})
    return rows


def shared_images(ma, mb) -> dict:
    ha, hb = set(ma.loc[ma["status"] == "ok", "sha256"]), set(mb.loc[mb["status"] == "ok", "sha256"])
    same_path = ma.merge(mb, on="path", suffixes=("_a", "_b"))
    return {"both": len(ha & hb), "only_a": len(ha - hb), "only_b": len(hb - ha),
            "changed": int((same_path["sha256_a"] != same_path["sha256_b"]).sum())}


def build_comparison(store_a: str | Path, store_b: str | Path, out_dir: str | Path,
                     sections: Sequence[str] = SECTION_MODULES) -> Report:
    a, b = Store(store_a, mode="r"), Store(store_b, mode="r")
    with Site(a, out_dir) as site:
        statuses = [st for st in (run_section(site, key, "compare", a, b) for key in sections) if st is not None]
        ma, mb = a.read_manifest(), b.read_manifest()
        da, db = dataset_summary(ma), dataset_summary(mb)
        attrs_a, attrs_b = a.attrs(), b.attrs()
        timings = timing_rows(attrs_a.get("timings", {}), attrs_b.get("timings", {}))
        index = site.render(
            "compare.html", "index.html",
            title=f"neurocat comparison — {a.path.name} vs {b.path.name}",
            store_a=str(a.path), store_b=str(b.path),
            built=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            dataset_rows=[(label, da[k], db[k]) for k, label in DATASET_ROWS],
            shared=shared_images(ma, mb),
            models_a=model_summary(a), models_b=model_summary(b),
            jobs_a=sorted(attrs_a.get("jobs", {})), jobs_b=sorted(attrs_b.get("jobs", {})),
            params=param_diff(attrs_a.get("jobs", {}), attrs_b.get("jobs", {})),
            timings=timings, statuses=statuses, versions=versions(),
        )
    return Report(index, statuses, {"a": da, "b": db}, {"a": attrs_a.get("timings", {}), "b": attrs_b.get("timings", {})})
