"""Audit section: calibrated duplicate thresholds, every finding with thumbnails from the
store's `/thumbs`, representation tables, and new / resolved / persisting badges when the
audit was compared with a previous one. Also (re)writes findings.json from the store."""

from __future__ import annotations

from reports.site import Section, Site
from storage.files import write_json

PER_PAGE = 50
THUMB = 64
LISTS = [  # (finding kind, page title, what one item shows)
    ("near_duplicates", "Duplicate clusters", "paths"),
    ("label_issues", "Suspected label errors", "path"),
    ("outliers", "Outliers", "path"),
    ("context_reliance", "Context reliance per class", "examples"),
    ("unit_bias", "Units biased towards a metadata group", "top_paths"),
]


def with_thumbs(site: Site, items: list[dict], field: str, row_of: dict[str, int], cap: int = 8) -> list[dict]:
    """Copies of `items`, each with `thumbs`: [(path, thumbnail rel or None)] of its first
    `cap` images, made from the store's /thumbs (images no longer in the dataset get none)."""
    own = [[it[field]] if isinstance(it[field], str) else list(it[field][:cap]) for it in items]
    known = sorted({p for paths in own for p in paths if p in row_of})
    rels = dict(zip(known, site.dataset_thumbnails([row_of[p] for p in known], THUMB)))
    return [{**it, "thumbs": [(p, rels.get(p)) for p in paths]} for it, paths in zip(items, own)]


def build(site: Site) -> Section | None:
    store = site.store
    if not store.has("audit") or "findings" not in store.attrs("audit"):
        return None
    attrs = store.attrs("audit")
    findings, methods = attrs["findings"], attrs.get("methods", {})
    write_json(site.file("findings.json"), findings)
    row_of = {p: i for i, p in enumerate(site.manifest["path"])}
    drift = findings.get("drift") or {}
    lists = []
    for kind, title, field in LISTS:
        items = with_thumbs(site, findings.get(kind, []), field, row_of)
        pages = site.paginate(items, PER_PAGE, f"audit/{kind}-{{page}}.html", "audit_list.html",
                              title=f"Audit: {title.lower()}", heading=title, kind=kind, thumb_size=THUMB)
        lists.append({"kind": kind, "title": title, "count": len(items), "href": pages[0], "preview": items[:6]})
    resolved = drift.get("resolved", {})
    counts = {k: len(findings.get(k, [])) for k in ("near_duplicates", "leakage", "label_issues", "outliers", "unit_bias")}
    facts = {**{k.replace("_", " "): v for k, v in counts.items()},
             "class imbalance (max/min)": findings["imbalance"]["classes"]["ratio"]}
    site.render("audit.html", "audit.html", title="Dataset audit", facts=facts, lists=lists, methods=methods,
                imbalance=findings["imbalance"], drift=drift, resolved=resolved, thumb_size=THUMB,
                leakage=with_thumbs(site, findings.get("leakage", []), "paths", row_of),
                added=with_thumbs(site, [{"path": p} for p in drift.get("images", {}).get("added", [])[:50]], "path",
                                  row_of))
    summary = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in counts.items())
    if drift:
        summary += f"; vs previous: {sum(len(v) for v in (drift['new_near_duplicates'], drift['new_label_issues']))} new"
    return Section("audit", "Audit", "audit.html", summary, facts)
