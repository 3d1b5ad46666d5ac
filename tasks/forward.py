"""Shard task of the shared forward pass: logits, pooled layer features and thumbnails.

Predictions, embeddings and audits all start from the same pass over the images, so it
is one job (`features`): whichever runs first computes it and the others find it done.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from prefect import task

from engine.images import DecodedBatches
from engine.inference import pooled, run_model
from engine.models import cached_model
from storage.store import Store
from tasks.sharding import skip_if_done

THUMB = 64  # side of the stored thumbnails reports and galleries show


def thumbnails(images_uint8: torch.Tensor, side: int = THUMB) -> np.ndarray:
    """uint8 [B, H, W, 3] crops -> uint8 [B, side, side, 3] (area averaging)."""
    x = images_uint8.permute(0, 3, 1, 2).float()
    t = F.interpolate(x, size=(side, side), mode="area")
    return t.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


@task(name="features-shard", retries=2, retry_delay_seconds=1)
@skip_if_done
def features_shard(store_path: str, job: str, shard: int, start: int, stop: int,
                   items: list[tuple[int, str]], model: str, weights: str | None, device: str,
                   batch_size: int, layers: list[str], fp: str) -> dict:
    m = cached_model(model, weights, device)
    store = Store(store_path)
    n = stop - start
    logits = np.zeros((n, len(m.classes)), dtype=np.float32)
    thumbs = np.zeros((n, THUMB, THUMB, 3), dtype=np.uint8)
    feats = {layer: np.zeros((n,) + store.array(f"features/{layer}").shape[1:], dtype=np.float16)
             for layer in layers}
    decoded = DecodedBatches(items, m.preprocessing, batch_size)
    for batch in decoded:
        rows = batch.indices - start
        out, acts = run_model(m, batch.normalized(m.preprocessing, m.device), layers)
        logits[rows] = out.float().cpu().numpy()
        thumbs[rows] = thumbnails(batch.images)
        for layer in layers:
            feats[layer][rows] = pooled(acts[layer]).float().cpu().numpy().astype(np.float16)
    store.write_rows("predict/logits", start, logits)
    store.write_rows("thumbs", start, thumbs)
    for layer, values in feats.items():
        store.write_rows(f"features/{layer}", start, values)
    result = {"failed": decoded.failed}
    store.mark_shard_done(job, shard, fp, result)
    return result
