"""Shard task of `neurocat render adversarial`: attack every image of one shard at every eps.

Writes, for the shard's rows, the clean crops and predictions and, per eps, the adversarial
images (uint8, what is evaluated is what is stored), the amplified perturbations, the
predictions and confidences on them, the perturbation norms, and the predictions of a
transfer model when one is given. Arrays are created by the flow (flows/adversarial.py).
"""

from __future__ import annotations

import numpy as np
import torch
from prefect import task

from engine.attacks import (AttackSpec, amplified, perturbation_norms, pixel_forward, to_pixels, to_uint8,
                            universal_perturbation)
from engine.images import DecodedBatches
from engine.inference import run_model
from engine.models import LoadedModel, cached_model
from storage.store import Store
from tasks.sharding import skip_if_done


def classify(model: LoadedModel, images_uint8: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Top-1 class and its probability of uint8 [B, H, W, 3] images."""
    logits, _ = run_model(model, model.preprocessing.normalize(images_uint8.to(model.device)))
    prob, pred = logits.float().softmax(1).max(1)
    return pred.cpu().numpy().astype(np.int32), prob.cpu().numpy().astype(np.float32)


def write_batch_rows(store: Store, name: str, indices: np.ndarray, data: np.ndarray) -> None:
    """Rows `indices` (sorted, maybe with gaps for undecodable files) of a per-image-chunked array."""
    block = np.zeros((int(indices[-1] - indices[0]) + 1, *data.shape[1:]), data.dtype)
    block[indices - indices[0]] = data
    store.write_rows(name, int(indices[0]), block)


@task(name="adversarial-universal", retries=1, retry_delay_seconds=1)
@skip_if_done(shard_id="universal")
def fit_universal(store_path: str, job: str, group: str, items: list[tuple[int, str]], model: str,
                  weights: str | None, device: str, batch_size: int, spec: dict, eps_list: list[float],
                  keys: list[str], fp: str) -> dict:
    """One universal perturbation per eps, fitted on `items`, into `/adversarial/<group>/<eps>/delta`."""
    m = cached_model(model, weights, device)
    attack = AttackSpec(**spec)
    store = Store(store_path)
    batches = [to_pixels(b.images).to(m.device) for b in DecodedBatches(items, m.preprocessing, batch_size)]
    rates = {}
    for eps, key in zip(eps_list, keys):
        p = attack.resolved(eps)
        with m.lock:  # other threads' hooks must not fire inside our forward passes
            delta, rates[key] = universal_perturbation(pixel_forward(m, fast=True), batches, eps, attack.norm, p["step_size"],
                                                       epochs=p["steps"])
        store.write_array(f"adversarial/{group}/{key}/delta", delta.cpu().numpy(),
                          attrs={**p, "fitted_on": len(items), "fooling_rate_per_sweep": rates[key]})
    result = {"fooling_rate_per_sweep": rates, "fitted_on": sum(len(b) for b in batches)}
    store.mark_shard_done(job, "universal", fp, result)
    return result


@task(name="adversarial-shard", retries=1, retry_delay_seconds=1)
@skip_if_done
def attack_shard(store_path: str, job: str, group: str, shard: int, start: int, stop: int,
                 items: list[tuple[int, str]], labels: list[int], model: str, weights: str | None, device: str,
                 batch_size: int, spec: dict, eps_list: list[float], keys: list[str], gains: list[float],
                 seed: int, transfer: tuple[str, str | None] | None, fp: str) -> dict:
    m = cached_model(model, weights, device)
    other = cached_model(transfer[0], transfer[1], device) if transfer else None
    attack = AttackSpec(**spec)
    forward = pixel_forward(m, fast=True)
    store = Store(store_path)
    deltas = ({key: torch.from_numpy(store.read(f"adversarial/{group}/{key}/delta")).to(m.device) for key in keys}
              if attack.attack == "universal" else {})
    n = stop - start
    out: dict[str, np.ndarray] = {}  # per-image results of the shard; -1 / 0 for undecodable rows
    for k in ["clean", *keys]:
        out.update({f"{k}/pred": np.full(n, -1, np.int32), f"{k}/transfer_pred": np.full(n, -1, np.int32),
                    f"{k}/conf": np.zeros(n, np.float32)})
    out.update({f"{k}/{name}": np.zeros(n, np.float32) for k in keys for name in ("linf", "l2")})
    shard_labels = np.asarray(labels, dtype=np.int64)
    decoded = DecodedBatches(items, m.preprocessing, batch_size)
    for batch in decoded:
        rows = batch.indices - start
        clean = batch.images
        pred, conf = classify(m, clean)
        out["clean/pred"][rows], out["clean/conf"][rows] = pred, conf
        if other is not None:
            out["clean/transfer_pred"][rows] = classify(other, clean)[0]
        write_batch_rows(store, f"adversarial/{group}/clean/images", batch.indices, clean.numpy())
        known = shard_labels[rows]
        target = torch.from_numpy(np.where(known >= 0, known, pred) if attack.targeted is None
                                  else np.full(len(rows), attack.targeted)).to(m.device)
        x = to_pixels(clean).to(m.device)
        generator = torch.Generator(m.device).manual_seed(seed * 1_000_003 + int(batch.indices[0]))
        for eps, key, gain in zip(eps_list, keys, gains):
            if deltas:
                adv = to_uint8(torch.clamp(x + deltas[key], 0, 1), x)
            else:
                with m.lock:  # other threads' hooks must not fire inside our forward passes
                    adv = to_uint8(attack.run(forward, x, target, eps, generator), x)
            pred, conf = classify(m, adv)
            out[f"{key}/pred"][rows], out[f"{key}/conf"][rows] = pred, conf
            if other is not None:
                out[f"{key}/transfer_pred"][rows] = classify(other, adv)[0]
            adv_np = adv.numpy()
            out[f"{key}/linf"][rows], out[f"{key}/l2"][rows] = perturbation_norms(adv_np, clean.numpy())
            write_batch_rows(store, f"adversarial/{group}/{key}/images", batch.indices, adv_np)
            write_batch_rows(store, f"adversarial/{group}/{key}/perturbation", batch.indices,
                             amplified(adv_np, clean.numpy(), gain))
    for name, values in out.items():
        store.write_rows(f"adversarial/{group}/{name}", start, values)
    result = {"failed": decoded.failed}
    store.mark_shard_done(job, shard, fp, result)
    return result
