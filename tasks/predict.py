"""Shard task of `neurocat predict`: logits of every image of one shard into the store."""

from __future__ import annotations

import numpy as np
from prefect import task

from engine.images import iter_batches
from engine.inference import run_model
from engine.models import cached_model
from storage.store import Store


@task(name="predict-shard", retries=2, retry_delay_seconds=1)
def predict_shard(store_path: str, job: str, shard: int, start: int, stop: int,
                  items: list[tuple[int, str]], model: str, weights: str | None, device: str,
                  batch_size: int, fp: str) -> dict:
    m = cached_model(model, weights, device)
    store = Store(store_path)
    logits = np.zeros((stop - start, len(m.classes)), dtype=np.float32)
    failed: list[tuple[int, str]] = []
    for batch in iter_batches(items, m.preprocessing, batch_size):
        failed += batch.failed
        if len(batch.indices):
            out, _ = run_model(m, batch.normalized(m.preprocessing, m.device))
            logits[batch.indices - start] = out.float().cpu().numpy()
    store.write_rows("predict/logits", start, logits)
    result = {"failed": failed}
    store.mark_shard_done(job, shard, fp, result)
    return result
