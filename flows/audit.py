"""`neurocat audit`: duplicates, leakage, label issues, imbalance, outliers, spurious context,
unit-level bias and drift since a previous audit; `findings.json` in the report folder.

Plan: the shared forward pass (fc7 and the bias layers' pooled features, logits,
thumbnails); duplicate thresholds calibrated on augmented copies of a sample of the
images; Grad-CAM occlusion of a few images per class (sharded, resumable); then every
finding from the arrays (engine/audit.py), into the store's `/audit` attrs, findings.json
and Prefect artifacts. `fail_on` kinds with findings make the flow fail, after all of it
is written, for CI-style gates.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from pydantic import BaseModel, Field

from engine import audit
from engine.classes import imagenet_classes
from engine.errors import InputError
from engine.files import dataset_file
from engine.models import LoadedModel, cached_model
from flows.common import (RunOptions, map_shards, model_provenance, plan_shards, record_failures, record_job,
                          resolve_paths, shard_fingerprint, shard_items, stage)
from flows.features import run_features
from flows.report import _artifact_key, _md, publish_report
from flows.runners import threads_runner
from reports.folder import claim
from storage.files import write_json
from storage.store import Store, fingerprint
from tasks.audit import CONTEXT_ARRAYS, calibration_copies, context_shard

JOB = "audit"
CONTEXT_JOB = "audit-context"
GATES = ("near_duplicates", "leakage", "label_issues", "outliers", "unit_bias")
PATH_KINDS = ("near_duplicates", "label_issues", "outliers")  # findings about images, with a drift cause


class AuditSettings(BaseModel):
    """Knobs of the audit (defaults suit datasets of hundreds to a few hundred thousand images)."""

    bias_layers: list[str] = Field(default_factory=lambda: ["fc7"])
    top_k: int = Field(16, ge=1)
    alpha: float = Field(0.05, gt=0, lt=1)
    correction: str = Field("bh", pattern="^(bh|bonferroni)$")
    knn_k: int = Field(5, ge=1)
    min_class_size: int = Field(3, ge=2)
    min_label_margin: float = Field(0.1, ge=0, le=1)
    outlier_z: float = Field(4.0, gt=0)
    calibration_images: int = Field(32, ge=2)
    max_false_pairs: float = Field(0.5, gt=0)
    context_per_class: int = Field(4, ge=0)
    cam_level: float = Field(0.5, gt=0, lt=1)


class AuditGateFailed(RuntimeError):
    """`--fail-on` kinds have findings; everything was written before this is raised."""

    def __init__(self, gates: dict[str, int], result: dict):
        super().__init__("audit gate failed: " + ", ".join(f"{k}={v}" for k, v in gates.items()))
        self.gates, self.result = gates, result


def parse_fail_on(fail_on) -> list[str]:
    names = [s.strip() for s in (fail_on.split(",") if isinstance(fail_on, str) else fail_on or []) if s.strip()]
    bad = [n for n in names if n not in GATES]
    if bad:
        raise InputError(f"--fail-on: unknown finding kind {', '.join(bad)} (choose from {', '.join(GATES)})")
    return names


LATEST = "latest"  # --previous: the newest other audit store beside this one


def previous_audit(path: str, model: LoadedModel) -> Store:
    """The store of an earlier audit of `model`, read-only, or an InputError saying why `path`
    is none. Drift compares fc7 features, so another model's or weights' audit is none (it
    failed at the end of the audit on the shapes, or compared unrelated numbers). The CLI
    calls it on `--previous` before the flow starts."""
    try:
        store = Store(path, mode="r")
    except FileNotFoundError:
        raise InputError(f"--previous: no neurocat store at {path}") from None
    except (ValueError, KeyError) as e:  # zarr's words for a store it cannot read
        raise InputError(f"--previous: {path} is not a readable neurocat store ({e})") from None
    if not store.has("audit") or "findings" not in store.attrs("audit") or not store.has("features/fc7"):
        raise InputError(f"--previous: store {path} holds no audit")
    then, now = store.attrs("features/fc7"), model.describe()
    if (then.get("model"), then.get("weights_sha256")) != (now["model"], now["weights_sha256"]):
        raise InputError(f"--previous: store {path} was audited with {then.get('model')} (weights "
                         f"{then.get('weights')}), this audit uses {now['model']} (weights {now['weights']}): "
                         "drift compares the features of one model")
    return store


def resolve_previous(previous: str | None, current: str, model: LoadedModel) -> str | None:
    """The previous audit's store; `latest` = the newest other store beside this one with an
    audit of the same model."""
    if previous != LATEST:
        return previous
    here = Path(current).resolve()
    candidates = sorted((p for p in here.parent.glob("*.zarr") if p.resolve() != here and
                         (p / "manifest.parquet").exists() and _audit_of(p, model)), key=lambda p: p.stat().st_mtime)
    return str(candidates[-1]) if candidates else None


def _audit_of(path: Path, model: LoadedModel) -> bool:
    try:
        previous_audit(str(path), model)
        return True
    except InputError:
        return False


def perceptual_hashes(store: Store, n: int, chunk: int) -> np.ndarray:
    """dHash of every stored thumbnail, read a chunk at a time."""
    thumbs = store.array("thumbs")
    return np.concatenate([audit.dhash(thumbs[s:s + chunk]) for s in range(0, n, chunk)]) if n else \
        np.zeros((0, 8), np.uint8)


def calibration_positives(opts: RunOptions, store: Store, manifest: pd.DataFrame, usable: np.ndarray,
                          settings: AuditSettings, previous: str | None) -> dict:
    """Augmented-copy similarities of the calibration sample, reused from this store or the
    previous audit's when model and sample images are the same."""
    sample = audit.calibration_sample(manifest["sha256"].to_numpy(), usable, settings.calibration_images)
    key = fingerprint("calibration", model_provenance(opts), sorted(manifest["sha256"].to_numpy()[sample]),
                      audit.AUGMENTATIONS)
    for path in (opts.store, previous):
        if path and (Path(path) / "zarr.json").exists():
            s = Store(path, mode="r")
            cached = s.attrs("audit").get("calibration_positives") if s.has("audit") else None
            if cached and cached.get("key") == key:
                return cached
    items = [(int(i), dataset_file(opts.data, manifest["path"].iloc[i])) for i in sample]
    found = calibration_copies(opts.store, items, opts.model, opts.weights, opts.device)
    return {"key": key, **found}


def context_targets(manifest: pd.DataFrame, logits_argmax: np.ndarray) -> np.ndarray:
    """Class to explain per image: its folder's ImageNet class, else the model's prediction."""
    index_of = imagenet_classes().index_of
    return np.array([index_of.get(lab, p) if isinstance(lab, str) else p
                     for lab, p in zip(manifest["label"].to_numpy(), logits_argmax)], np.int64)


def context_selection(manifest: pd.DataFrame, usable: np.ndarray, per_class: int) -> np.ndarray:
    """The first `per_class` usable images of every class (by image index)."""
    ok = manifest[usable]
    return np.sort(ok.groupby(ok["label"].fillna(""), sort=True).head(per_class).index.to_numpy())


def run_context(opts: RunOptions, store: Store, manifest: pd.DataFrame, usable: np.ndarray,
                settings: AuditSettings) -> dict[str, np.ndarray]:
    """Occlusion of the Grad-CAM region vs the rest, for the selected images (sharded)."""
    n = len(manifest)
    if settings.context_per_class == 0 or not usable.any():
        return {name: np.full(n, np.nan, np.float32) for name in CONTEXT_ARRAYS}
    chosen = np.zeros(n, bool)
    chosen[context_selection(manifest, usable, settings.context_per_class)] = True
    targets = context_targets(manifest, store.array("predict/logits")[...].argmax(1))
    prov = model_provenance(opts)
    for name in CONTEXT_ARRAYS:
        store.create_array(f"audit/context/{name}", (n,), "float32", chunks=(opts.shard_size,),
                           attrs={**prov, "cam_level": settings.cam_level}, fill_value=np.nan)
    shards = plan_shards(n, opts.shard_size)
    sel = manifest.assign(status=np.where(chosen, manifest["status"], "not chosen"))
    fps = [shard_fingerprint(CONTEXT_JOB, sel, s, prov, settings.cam_level, targets[s.start:s.stop].tolist(),
                             np.flatnonzero(chosen[s.start:s.stop]).tolist())  # another --context-per-class redoes it
           for s in shards]

    def kwargs(s):
        items = shard_items(sel, opts.data, s)
        return dict(store_path=opts.store, job=CONTEXT_JOB, shard=s.id, start=s.start, stop=s.stop, items=items,
                    targets=[int(targets[i]) for i, _ in items], model=opts.model, weights=opts.weights,
                    device=opts.device, batch_size=opts.batch_size, level=settings.cam_level)

    results = map_shards(context_shard, store, CONTEXT_JOB, shards, fps, kwargs, opts.progress)
    record_failures(store, results)
    return {name: store.read(f"audit/context/{name}") for name in CONTEXT_ARRAYS}


def bias_top_rows(store: Store, layer: str, usable: np.ndarray, k: int) -> tuple[np.ndarray, str]:
    """Per-unit top-K image rows: the catalogue's when it has the layer, else from the
    stored pooled (global-average) features of the forward pass."""
    if store.has(f"catalog/{layer}/top_index"):
        return store.read(f"catalog/{layer}/top_index")[:, :k].astype(np.int64), "catalog top-K (spatial max)"
    return audit.top_k_rows(store.read(f"features/{layer}"), np.flatnonzero(usable), k), "pooled features (mean)"


def previous_state(previous: str, model: LoadedModel) -> dict:
    prev = previous_audit(previous, model)
    manifest = prev.read_manifest()
    usable = manifest["status"].to_numpy() == "ok"
    unit = audit.unit_rows(prev.read("features/fc7"))
    then = prev.attrs("audit")
    return {"path": previous, "findings": then["findings"], "manifest": manifest,
            "settings": then.get("settings") or {}, "metadata": then.get("metadata"),
            "centroids": audit.class_centroids(unit[usable], manifest["label"].to_numpy()[usable])}


def not_compared(prev: dict, settings: AuditSettings, metadata: str | None) -> dict[str, str]:
    """Finding kinds the two audits did not look for alike, and why: their differences are the
    settings', not the dataset's (a context test skipped now made every earlier context
    finding "resolved")."""
    then = prev["settings"]
    out = {}
    if then.get("context_per_class") != settings.context_per_class:
        out["context_reliance"] = (f"context images per class {then.get('context_per_class')} then, "
                                   f"{settings.context_per_class} now")
    if (prev["metadata"] is None) != (metadata is None) or then.get("bias_layers") != settings.bias_layers:
        out["unit_bias"] = "unit bias tested with other metadata or layers"
    return out


def drift(prev: dict, manifest: pd.DataFrame, unit: np.ndarray, usable: np.ndarray, findings: dict,
          uncompared: dict[str, str] | None = None) -> dict:
    """What changed since the previous audit; marks each current finding new or persisting.

    Kinds in `uncompared` (`not_compared`) are left out, with their reason.
    New and resolved duplicate clusters, label suspects and outliers carry a `cause`: the
    image change behind them (added, moved, modified / removed), or `rescored` when their
    images are unchanged and only the evidence about them moved, so the planted changes
    of a dataset are told apart from their side effects on other images' scores."""
    uncompared = uncompared or {}
    images = audit.image_changes(prev["manifest"], manifest)
    changed_now, changed_before = audit.change_causes(images)
    changes = {k: c for k, c in audit.finding_changes(prev["findings"], findings).items() if k not in uncompared}
    resolved = {}
    for kind in changes:
        new, gone = set(changes[kind]["new"]), set(changes[kind]["resolved"])
        with_paths = kind in PATH_KINDS
        for f in findings[kind]:
            f["status"] = "new" if f["id"] in new else "persisting"
            if with_paths and f["id"] in new:
                f["cause"] = audit.finding_cause(f, changed_now)
        resolved[kind] = [{**f, "status": "resolved", **({"cause": audit.finding_cause(f, changed_before)}
                                                          if with_paths else {})}
                          for f in prev["findings"].get(kind, []) if f["id"] in gone]
    current = audit.class_centroids(unit[usable], manifest["label"].to_numpy()[usable])
    return {"previous": prev["path"], "images": images,
            "findings": {k: {s: len(v) for s, v in c.items()} for k, c in changes.items()},
            "new_near_duplicates": [f for f in findings["near_duplicates"] if f["status"] == "new"],
            "new_label_issues": [f for f in findings["label_issues"] if f["status"] == "new"],
            "resolved": resolved, "not_compared": uncompared,
            "centroid_shift": audit.centroid_shift(prev["centroids"], current)}


def apply_metadata_split(manifest: pd.DataFrame, metadata: pd.DataFrame | None) -> pd.DataFrame:
    """A `split` column in the metadata names the split of the images it lists."""
    if metadata is None or "split" not in metadata.columns:
        return manifest
    split = manifest[["path"]].merge(metadata[["path", "split"]], on="path", how="left")["split"]
    return manifest.assign(split=split.where(split.notna(), manifest["split"]).to_numpy())


def analyse(opts: RunOptions, store: Store, metadata: pd.DataFrame | None, settings: AuditSettings,
            positives: dict, context: dict[str, np.ndarray]) -> tuple[dict, dict]:
    """Every finding from the stored arrays: (findings, method facts)."""
    manifest = apply_metadata_split(store.read_manifest(), metadata)
    usable = manifest["status"].to_numpy() == "ok"
    n = len(manifest)
    unit = audit.unit_rows(store.read("features/fc7"))
    hashes = perceptual_hashes(store, n, opts.shard_size)
    neg_cos, neg_hash = audit.negative_pairs(unit, hashes, usable, manifest["sha256"].to_numpy())
    kinds = np.array(positives["kinds"])
    calibration = audit.calibrate(np.array(positives["cos"]), np.array(positives["hash"], float), kinds,
                                  neg_cos, neg_hash, int(usable.sum()), settings.max_false_pairs)
    dups = audit.duplicate_findings(unit, hashes, manifest, usable, calibration["fc7_cosine"]["value"],
                                    int(-calibration["dhash"]["value"]))
    classes = imagenet_classes()
    logits = store.read("predict/logits")
    labels, label_method = audit.label_issue_findings(store.read("features/fc7"), logits, manifest, usable, classes.index_of,
                                                      settings.knn_k, settings.min_class_size,
                                                      settings.min_label_margin)
    outliers, outlier_method = audit.outlier_findings(unit, manifest, usable, settings.outlier_z)
    bias, bias_source = [], {}
    if metadata is not None:
        codes = audit.metadata_codes(manifest, metadata)
        for layer in settings.bias_layers:
            top, bias_source[layer] = bias_top_rows(store, layer, usable, settings.top_k)
            bias += audit.unit_bias_findings(layer, top, codes, usable, manifest["path"].to_numpy(), settings.alpha,
                                             settings.correction)
    findings = {
        "near_duplicates": dups,
        "leakage": [d for d in dups if d["leak"]],
        "label_issues": labels,
        "outliers": outliers,
        "imbalance": audit.representation(manifest, usable, metadata),
        "context_reliance": audit.context_reliance_findings(manifest, context),
        "unit_bias": bias,
        "drift": {},
    }
    methods = {"calibration": calibration, "label_issues": label_method, "outliers": outlier_method,
               "unit_bias": {"layers": bias_source, "top_k": settings.top_k, "alpha": settings.alpha,
                             "correction": settings.correction, "test": "hypergeometric, one-sided"},
               "context": {"cam_level": settings.cam_level, "per_class": settings.context_per_class,
                           "occluder": "preprocessing mean (grey)"}}
    per_image = {"duplicate_cluster": np.full(n, -1, np.int32), "label_issue_score": np.zeros(n, np.float32)}
    row_of = {p: i for i, p in enumerate(manifest["path"])}
    for c, d in enumerate(dups):
        per_image["duplicate_cluster"][[row_of[p] for p in d["paths"]]] = c
    for f in labels:
        per_image["label_issue_score"][row_of[f["path"]]] = f["score"]
    for name, values in per_image.items():
        store.write_array(f"audit/{name}", values, attrs={"what": "per image; see /audit attrs for findings"})
    return findings, methods


def summary_counts(findings: dict) -> dict[str, int]:
    return {k: len(findings[k]) for k in GATES}


@task(name="audit-artifacts")
def publish_audit_artifacts(store_path: str, findings: dict, counts: dict, findings_path: str) -> None:
    """A markdown summary and a table of the top findings, as Prefect artifacts."""
    key = _artifact_key(store_path) + "-audit"  # per store path: same-named stores elsewhere keep their own
    lines = [f"# Audit of {_md(Path(store_path).name)}", ""] + [f"* {k.replace('_', ' ')}: {v}" for k, v in counts.items()]
    imb = findings["imbalance"]["classes"]
    if imb["ratio"] is not None:
        lines.append(f"* class imbalance: {imb['ratio']} ({_md(imb['largest'])} vs {_md(imb['smallest'])})")
    d = findings.get("drift") or {}
    if d:
        im = d["images"]
        lines.append(f"* since {_md(d['previous'])}: +{len(im['added'])} / -{len(im['removed'])} images, "
                     f"{len(d['new_near_duplicates'])} new duplicate clusters, {len(d['new_label_issues'])} new label issues")
    lines.append(f"* findings: {_md(Path(findings_path).resolve())}")
    create_markdown_artifact("\n".join(lines), key=key, description="neurocat audit summary")
    rows = [{"kind": "near_duplicates", "what": " | ".join(f["paths"]), "score": f["score"], "id": f["id"]}
            for f in findings["near_duplicates"][:50]]
    rows += [{"kind": "label_issues", "what": f"{f['path']}: {f['given']} -> {f['suggested']}", "score": f["score"],
              "id": f["id"]} for f in findings["label_issues"][:50]]
    rows += [{"kind": "outliers", "what": f["path"], "score": f["score"], "id": f["id"]} for f in findings["outliers"][:20]]
    rows += [{"kind": "unit_bias", "what": f"{f['layer']}:{f['unit']} {f['column']}={f['group']}",
              "score": f["q_value"], "id": f["id"]} for f in findings["unit_bias"][:20]]
    create_table_artifact(rows or [{"kind": "none", "what": "no findings", "score": None, "id": ""}],
                          key=key + "-findings", description="top audit findings")


def run_audit(opts: RunOptions, store: Store, metadata: str | None = None, previous: str | None = None,
              fail_on=(), settings: AuditSettings | None = None) -> dict:
    """The whole audit into `store` and `<report>/findings.json`. Used by demo too.

    Returns counts per kind, the paths, and `gates`: the `fail_on` kinds that have
    findings (the flow raises on them after the report is published).
    """
    settings = settings or AuditSettings()
    gates = parse_fail_on(fail_on)
    meta = audit.read_metadata(metadata) if metadata else None
    model = cached_model(opts.model, opts.weights, opts.device)
    previous = resolve_previous(previous, opts.store, model)
    prev = previous_state(previous, model) if previous else None
    run_features(opts, store, layers=tuple(dict.fromkeys(["fc7", *settings.bias_layers])))
    manifest = store.read_manifest()
    usable = manifest["status"].to_numpy() == "ok"
    with stage(store, JOB, "calibration"):
        positives = calibration_positives(opts, store, manifest, usable, settings, previous)
    with stage(store, JOB, "context"):
        context = run_context(opts, store, manifest, usable, settings)
    with stage(store, JOB, "analysis"):
        findings, methods = analyse(opts, store, meta, settings, positives, context)
        if prev is not None:
            findings["drift"] = drift(prev, store.read_manifest(), audit.unit_rows(store.read("features/fc7")),
                                      usable, findings, not_compared(prev, settings, metadata))
    store.update_attrs("audit", findings=findings, methods=methods, calibration_positives=positives,
                       settings=settings.model_dump(), metadata=metadata, previous=previous)
    findings_path = write_json(claim(opts.report, "findings.json"), findings)  # before the report: its gate reads it
    counts = summary_counts(findings)
    record_job(store, JOB, opts, **counts)
    publish_audit_artifacts(opts.store, findings, counts, str(findings_path))
    failed = {k: counts[k] for k in gates if counts[k]}
    return {"store": opts.store, "findings": str(findings_path), **counts, "gates": failed}


@flow(name="audit", log_prints=True, task_runner=threads_runner())
def audit_flow(opts: RunOptions, metadata: str | None = None, previous: str | None = None,
               fail_on: list[str] | None = None, settings: AuditSettings | None = None) -> dict:
    opts = resolve_paths(opts, JOB)
    store = Store(opts.store)
    with store.lock():
        result = run_audit(opts, store, metadata, previous, fail_on or (), settings)
        result["report"] = str(publish_report(opts.store, opts.report))
    if result["gates"]:
        raise AuditGateFailed(result["gates"], result)
    return result
