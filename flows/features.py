"""The shared forward pass over a dataset: `/predict/logits`, `/features/<layer>`, `/thumbs`.

`predict`, `embed` and `audit` call `run_features`; a store that already holds the pass
for the same images, model and layers skips every shard.
"""

from __future__ import annotations

import torch
from prefect import task

from engine.inference import pooled
from engine.models import cached_model
from flows.common import (RunOptions, map_shards, model_provenance, plan_shards, record_failures,
                          scan_dataset, shard_fingerprint, shard_items, stage)
from storage.store import Store
from tasks.forward import THUMB, features_shard

JOB = "features"


@task(name="feature-dims")
def feature_dims(model: str, weights: str | None, device: str, layers: list[str]) -> dict[str, int]:
    """Width of each layer's pooled feature, from one forward pass on a blank image."""
    from engine.inference import run_model

    m = cached_model(model, weights, device)
    x = torch.zeros(1, 3, m.preprocessing.crop, m.preprocessing.crop)
    _, acts = run_model(m, x, layers)
    return {layer: int(pooled(acts[layer]).shape[1]) for layer in layers}


def run_features(opts: RunOptions, store: Store, layers: tuple[str, ...] = ("fc7",)) -> None:
    """Scan the dataset and make sure the forward pass of every shard is in the store."""
    layers = list(dict.fromkeys(layers))
    with stage(store, JOB, "scan"):
        scan_dataset(opts.store, opts.data, opts.limit, opts.report)
    manifest = store.read_manifest()
    n = len(manifest)
    shards = plan_shards(n, opts.shard_size)
    prov = model_provenance(opts)
    dims = feature_dims(opts.model, opts.weights, opts.device, layers)
    store.create_array("predict/logits", (n, 1000), "float32", chunks=(opts.shard_size, 1000), attrs=prov)
    store.create_array("thumbs", (n, THUMB, THUMB, 3), "uint8", chunks=(opts.shard_size, THUMB, THUMB, 3),
                       attrs={**prov, "what": "centre crop, area-downscaled"})
    for layer in layers:
        store.create_array(f"features/{layer}", (n, dims[layer]), "float16", chunks=(opts.shard_size, dims[layer]),
                           attrs={**prov, "layer": layer, "pooling": "global average"})
    fps = [shard_fingerprint(JOB, manifest, s, prov, opts.batch_size, layers) for s in shards]
    with stage(store, JOB, "forward"):
        results = map_shards(features_shard, store, JOB, shards, fps, lambda s: dict(
            store_path=opts.store, job=JOB, shard=s.id, start=s.start, stop=s.stop,
            items=shard_items(manifest, opts.data, s), model=opts.model, weights=opts.weights,
            device=opts.device, batch_size=opts.batch_size, layers=layers), opts.progress)
    record_failures(store, results)
