"""`neurocat predict`: top-1 class and probability of every image, as predictions.csv."""

from __future__ import annotations

import pandas as pd
from prefect import flow

from engine.classes import imagenet_classes
from flows.common import RunOptions, record_job, report_outputs, resolve_paths
from flows.features import run_features
from flows.report import publish_report
from flows.runners import threads_runner
from storage.store import Store
from storage.tables import predictions_table

JOB = "predict"


def run_predict(opts: RunOptions, store: Store) -> pd.DataFrame:
    """The shared forward pass, reduced to a predictions table. Used by demo too."""
    run_features(opts, store)
    table = predictions_table(store)
    labelled = table["label"].isin(imagenet_classes().index_of)
    accuracy = float((table.loc[labelled, "label"] == table.loc[labelled, "pred_wnid"]).mean()) if labelled.any() else None
    record_job(store, JOB, opts, images=len(table), top1=accuracy)
    return table


@flow(name="predict", log_prints=True, task_runner=threads_runner())
def predict_flow(opts: RunOptions) -> dict:
    opts = resolve_paths(opts, JOB)
    store = Store(opts.store)
    with store.lock():
        table = run_predict(opts, store)
        report = publish_report(opts.store, opts.report)  # its predictions section writes the CSV
    top1 = store.attrs()["jobs"][JOB]["top1"]
    return {"store": opts.store, "report": str(report), **report_outputs(opts.report, predictions="predictions.csv"),
            "images": len(table), "top1": top1}
