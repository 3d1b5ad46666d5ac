"""Tasks of the audit job: duplicate-threshold calibration, context occlusion per shard.

Both need the model and the image files; everything else in the audit works on the
arrays of the shared forward pass and runs in the flow (engine/audit.py).
"""

from __future__ import annotations

import numpy as np
import torch
from prefect import task

from engine import audit
from engine.attribution import gradcam
from engine.images import DecodedBatches, ImageError, open_for_model, resize_crop
from engine.inference import pooled, run_model
from engine.models import cached_model
from storage.store import Store
from tasks.sharding import skip_if_done
from tasks.forward import thumbnails

CONTEXT_ARRAYS = ("p_full", "p_object", "p_context", "p_full_correct", "p_object_correct", "p_context_correct", "area")


@task(name="audit-calibration-copies", retries=1)
def calibration_copies(store_path: str, items: list[tuple[int, str]], model: str, weights: str | None,
                       device: str, seed: int = 0) -> dict:
    """Similarity of each sample image to augmented copies of itself (the positives):
    fc7 cosine and dHash similarity, one copy per augmentation kind. The copies are made
    from the image as the forward pass decoded it (large JPEGs at a reduced scale)."""
    m = cached_model(model, weights, device)
    store = Store(store_path, mode="r")
    rng = np.random.default_rng(seed)
    crops, owners, kinds = [], [], []
    for index, path in items:
        try:
            img = open_for_model(path, m.preprocessing)  # decoded as its stored features were
        except ImageError:
            continue
        for kind in audit.AUGMENTATIONS:
            crops.append(resize_crop(audit.augmented_copy(img, kind, rng), m.preprocessing))
            owners.append(index)
            kinds.append(kind)
    if not crops:
        return {"cos": [], "hash": [], "kinds": []}
    owners = np.array(owners)
    feats, thumbs = [], []
    for s in range(0, len(crops), 32):
        x = torch.from_numpy(np.stack(crops[s:s + 32]))
        _, acts = run_model(m, m.preprocessing.normalize(x).to(m.device), ["fc7"])
        feats.append(pooled(acts["fc7"]).float().cpu().numpy().astype(np.float16))
        thumbs.append(thumbnails(x))
    rows = np.unique(owners)
    ref_feats = dict(zip(rows, store.array("features/fc7").oindex[rows]))
    ref_thumbs = dict(zip(rows, store.array("thumbs").oindex[rows]))
    a = audit.unit_rows(np.concatenate(feats))
    b = audit.unit_rows(np.stack([ref_feats[o] for o in owners]))
    ha = audit.dhash(np.concatenate(thumbs))
    hb = audit.dhash(np.stack([ref_thumbs[o] for o in owners]))
    return {"cos": np.einsum("ij,ij->i", a, b).tolist(), "hash": (-audit.hamming(ha, hb)).tolist(), "kinds": kinds}


@task(name="audit-context-shard", retries=2, retry_delay_seconds=1)
@skip_if_done
def context_shard(store_path: str, job: str, shard: int, start: int, stop: int,
                  items: list[tuple[int, str]], targets: list[int], model: str, weights: str | None,
                  device: str, batch_size: int, level: float, fp: str) -> dict:
    """Grad-CAM of each chosen image for its class, then p(class) with only the CAM region
    kept and with it hidden; writes the shard's rows of /audit/context/*."""
    m = cached_model(model, weights, device)
    store = Store(store_path)
    n = stop - start
    out = {name: np.full(n, np.nan, np.float32) for name in CONTEXT_ARRAYS}
    target_of = {index: t for (index, _), t in zip(items, targets)}
    decoded = DecodedBatches(items, m.preprocessing, batch_size)
    for batch in decoded:
        x = batch.normalized(m.preprocessing, m.device)
        t = torch.tensor([target_of[int(i)] for i in batch.indices], device=x.device)
        cams = gradcam(m, x, t)
        probs = audit.occlusion_probs(m, x, t, cams, level)
        for name in CONTEXT_ARRAYS:
            out[name][batch.indices - start] = probs[name]
    for name, values in out.items():
        store.write_rows(f"audit/context/{name}", start, values)
    result = {"failed": decoded.failed}
    store.mark_shard_done(job, shard, fp, result)
    return result
