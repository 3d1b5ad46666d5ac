"""Small tables derived from a store, shared by flows and reports."""

from __future__ import annotations

import numpy as np
import pandas as pd

from engine.classes import imagenet_classes
from storage.store import Store


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def predictions_table(store: Store) -> pd.DataFrame:
    """path, label, pred_index, pred_wnid, pred_name, prob for every usable image."""
    manifest = store.read_manifest()
    ok = np.flatnonzero(manifest["status"].values == "ok")
    classes = imagenet_classes()
    logits = store.array("predict/logits")[...][ok] if len(ok) else np.zeros((0, len(classes)), np.float32)
    probs = softmax(logits)
    pred = probs.argmax(axis=1)
    return pd.DataFrame({
        "path": manifest["path"].values[ok],
        "label": manifest["label"].values[ok],
        "pred_index": pred,
        "pred_wnid": [classes.wnids[i] for i in pred],
        "pred_name": [classes.names[i] for i in pred],
        "prob": probs[np.arange(len(pred)), pred],
    })
