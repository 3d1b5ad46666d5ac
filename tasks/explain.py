"""Shard task of `neurocat explain`: maps, faithfulness scores and masks of one shard's images."""

from __future__ import annotations

import numpy as np
from prefect import task

from engine.explanations import explain_batch
from engine.images import DecodedBatches, label_index
from engine.models import cached_model
from storage.store import Store
from tasks.sharding import skip_if_done

INFO = "explain_info"


@task(name="explain-shard", retries=2, retry_delay_seconds=1)
@skip_if_done
def explain_shard(store_path: str, job: str, shard: int, start: int, stop: int, items: list[tuple[int, str]],
                  labels: list[str | None], model: str, weights: str | None, device: str, batch_size: int,
                  methods: list[str], target: str | int, params: dict, steps: int, segment_with: str | None,
                  fp: str) -> dict:
    m = cached_model(model, weights, device)
    store = Store(store_path)
    rows = stop - start
    # one buffer per array for the shard's rows, written once: the shard owns these chunks alone
    buffers: dict[str, np.ndarray] = {f"{INFO}/target": np.full(rows, -1, np.int32)}
    scores = [f"scores/{s}" for s in store.arrays(f"{INFO}/scores")] if store.has(f"{INFO}/scores") else []
    for name in store.arrays(INFO) + scores:
        if name != "target":
            arr = store.array(f"{INFO}/{name}")
            buffers[f"{INFO}/{name}"] = np.zeros((rows,) + arr.shape[1:], arr.dtype)
    for method in methods:
        buffers[f"explain/{method}"] = np.zeros((rows,) + store.array(f"explain/{method}").shape[1:], np.float16)
    label_of = dict(zip((i for i, _ in items), labels))
    decoded = DecodedBatches(items, m.preprocessing, batch_size)
    for batch in decoded:
        wanted = np.array([label_index(label_of[int(i)], m.classes.index_of) for i in batch.indices])
        out = explain_batch(m, batch.images, wanted, methods, target, params, steps, segment_with, batch_size)
        rel = batch.indices - start
        buffers[f"{INFO}/target"][rel] = out.targets
        buffers[f"{INFO}/prob"][rel] = out.probs
        buffers[f"{INFO}/image"][rel] = out.images
        for method, maps in out.maps.items():
            buffers[f"explain/{method}"][rel] = maps
        for name, scores in out.scores.items():
            buffers[f"{INFO}/scores/{name}"][rel] = scores
        for name, values in out.extras.items():
            buffers[f"{INFO}/{name.replace('/', '_')}"][rel] = values
        if out.mask is not None:
            buffers[f"{INFO}/mask"][rel] = out.mask
    for name, data in buffers.items():
        store.write_rows(name, start, data)
    result = {"failed": decoded.failed}
    store.mark_shard_done(job, shard, fp, result)
    return result
