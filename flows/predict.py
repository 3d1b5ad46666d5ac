"""`neurocat predict`: top-1 class and probability of every image, as predictions.csv."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from prefect import flow

from engine.models import imagenet_classes
from flows.common import (RunOptions, map_shards, model_provenance, plan_shards, record_failures,
                          record_job, resolve_paths, scan_dataset, shard_fingerprint, shard_items, stage)
from flows.report import publish_report
from storage.store import Store
from storage.tables import predictions_table
from tasks.predict import predict_shard

JOB = "predict"


def run_predict(opts: RunOptions, store: Store) -> pd.DataFrame:
    """Scan, fan out one task per shard, reduce to a predictions table. Used by demo too."""
    with stage(store, JOB, "scan"):
        scan_dataset(opts.store, opts.data, opts.limit)
    manifest = store.read_manifest()
    shards = plan_shards(len(manifest), opts.shard_size)
    prov = model_provenance(opts)
    store.create_array("predict/logits", (len(manifest), 1000), "float32",
                       chunks=(opts.shard_size, 1000), attrs=prov)
    fps = [shard_fingerprint(JOB, manifest, s, prov, opts.batch_size) for s in shards]
    with stage(store, JOB, "forward"):
        results = map_shards(predict_shard, store, JOB, shards, fps, lambda s: dict(
            store_path=opts.store, job=JOB, shard=s.id, start=s.start, stop=s.stop,
            items=shard_items(manifest, opts.data, s), model=opts.model, weights=opts.weights,
            device=opts.device, batch_size=opts.batch_size), opts.progress)
    record_failures(store, results)
    table = predictions_table(store)
    labelled = table["label"].isin(imagenet_classes().index_of)
    accuracy = float((table.loc[labelled, "label"] == table.loc[labelled, "pred_wnid"]).mean()) if labelled.any() else None
    record_job(store, JOB, opts, images=len(table), top1=accuracy)
    return table


@flow(name="predict", log_prints=True)
def predict_flow(opts: RunOptions) -> dict:
    opts = resolve_paths(opts, JOB)
    store = Store(opts.store)
    with store.lock():
        table = run_predict(opts, store)
        report = publish_report(opts.store, opts.report)  # its predictions section writes the CSV
    top1 = store.attrs()["jobs"][JOB]["top1"]
    return {"store": opts.store, "report": str(report), "predictions": str(Path(opts.report) / "predictions.csv"),
            "images": len(table), "top1": top1}
