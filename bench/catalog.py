"""images/s of the catalogue over one layer (K=16) against the raw forward pass, in one run.

Baseline: the same images decoded by the same pipeline (engine.images.iter_batches) and
pushed through the same model with `engine.inference.run_model`, nothing else. Catalogue:
`run_catalog` (scan, statistics pass, tree reduce, patch pass, store writes) without and
with guided-backprop projections; no report. Also prints how the catalogue's task time
splits between decode (waiting for images), forward, state update, patches and projections.
Usage: python bench/catalog.py [--data DIR] [--limit N] [--layer L] [--batch-size B] [--repeat R]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def raw_forward(model, items, batch_size) -> float:
    from engine.images import iter_batches
    from engine.inference import run_model

    t0 = time.perf_counter()
    for batch in iter_batches(items, model.preprocessing, batch_size):
        if len(batch.indices):
            run_model(model, batch.normalized(model.preprocessing, model.device))
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "imagenet-sample-250"))
    ap.add_argument("--limit", type=int, default=250)
    ap.add_argument("--layer", default="_blocks.5")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=2, help="alternate baseline and catalogue this many times")
    args = ap.parse_args()

    import torch
    from prefect import flow
    from prefect.testing.utilities import prefect_test_harness

    from engine.images import list_images
    from engine.models import cached_model
    from flows.catalog import run_catalog
    from flows.common import RunOptions
    from storage.store import Store

    model = cached_model("efficientnet_lite0")
    items = [(i, str(Path(args.data) / e.path)) for i, e in enumerate(list_images(args.data)[: args.limit])]

    @flow(name="bench-catalog")
    def catalog(store: str, limit: int, projections: int | None) -> dict:
        opts = RunOptions(data=args.data, store=store, limit=limit, batch_size=args.batch_size, shard_size=256)
        return run_catalog(opts, Store(store), [args.layer], top_k=16, bottom_k=8, projections=projections)

    times = {"raw": [], "catalog": [], "catalog+projections": []}
    with prefect_test_harness(server_startup_timeout=180), tempfile.TemporaryDirectory() as tmp:
        raw_forward(model, items[: args.batch_size], args.batch_size)  # warm-up
        catalog(f"{tmp}/warm.zarr", args.batch_size, 0)
        for r in range(args.repeat):
            times["raw"].append(raw_forward(model, items, args.batch_size))
            t0 = time.perf_counter()
            split = catalog(f"{tmp}/c{r}.zarr", args.limit, 0)["seconds"]
            times["catalog"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            split_p = catalog(f"{tmp}/p{r}.zarr", args.limit, None)["seconds"]
            times["catalog+projections"].append(time.perf_counter() - t0)
    n = len(items)
    best = {k: min(v) for k, v in times.items()}
    print(f"images={n} layer={args.layer} K=16 bottom-K=8 batch={args.batch_size} "
          f"torch_threads={torch.get_num_threads()} repeats={args.repeat} (best of each)")
    print(f"raw forward (decode + run_model)   {n / best['raw']:7.1f} images/s")
    print(f"catalog, no projections            {n / best['catalog']:7.1f} images/s  "
          f"ratio {best['raw'] / best['catalog']:.2f} (target >= 0.85)")
    print(f"catalog + projections of all units {n / best['catalog+projections']:7.1f} images/s  "
          f"ratio {best['raw'] / best['catalog+projections']:.2f}")
    total = sum(split_p.values())
    print("time split of the last catalogue with projections (task seconds):")
    for k, v in split_p.items():
        print(f"  {k:11s} {v:7.2f} s  {100 * v / total:5.1f} %")
    print(f"  (without projections: {', '.join(f'{k} {v:.2f}' for k, v in split.items())})")


if __name__ == "__main__":
    main()
