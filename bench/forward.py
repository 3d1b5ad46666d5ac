"""images/s of `neurocat predict` (the predict flow, in process) against a raw torch loop.

Both decode the same images with the same preprocessing, the same model, batch size and
torch threads, in one run; the ratio is what bench/RESULTS.md records (target >= 0.9).
Usage: python bench/forward.py [--data DIR] [--limit N] [--batch-size B]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from common import SHARED_DATA  # also puts the repository on sys.path

from neurocat.prefect_env import prefect_defaults  # noqa: E402

prefect_defaults()


def raw_loop(model, paths, batch_size):
    """The baseline a user would write: PIL + torchvision transforms + model, no neurocat."""
    import torch
    from PIL import Image
    from torchvision import transforms as T

    prep = model.preprocessing
    tf = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize(prep.mean, prep.std)])
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(paths), batch_size):
            x = torch.stack([tf(Image.open(p).convert("RGB")) for p in paths[i:i + batch_size]])
            model.module(x).argmax(1)
    return len(paths) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(SHARED_DATA))
    ap.add_argument("--limit", type=int, default=250)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()

    from prefect.testing.utilities import prefect_test_harness

    from engine.images import list_images
    from engine.models import cached_model
    from flows.common import RunOptions
    from flows.predict import predict_flow

    model = cached_model("efficientnet_lite0")
    paths = [Path(args.data) / e.path for e in list_images(args.data)][: args.limit]
    raw_loop(model, paths[: args.batch_size], args.batch_size)  # warm-up
    with prefect_test_harness(server_startup_timeout=180), tempfile.TemporaryDirectory() as tmp:
        predict_flow(RunOptions(data=args.data, store=f"{tmp}/warm.zarr", limit=args.batch_size))
        raw = raw_loop(model, paths, args.batch_size)
        t0 = time.perf_counter()
        predict_flow(RunOptions(data=args.data, store=f"{tmp}/bench.zarr", limit=args.limit,
                                batch_size=args.batch_size))
        ours = len(paths) / (time.perf_counter() - t0)
    import torch

    print(f"images={len(paths)} batch={args.batch_size} torch_threads={torch.get_num_threads()}")
    print(f"raw torch loop      {raw:7.1f} images/s")
    print(f"neurocat predict    {ours:7.1f} images/s  (flow end to end: scan, shards, store, report)")
    print(f"ratio predict/raw   {ours / raw:7.2f}   (target >= 0.9)")


if __name__ == "__main__":
    main()
