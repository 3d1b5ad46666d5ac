"""images/s of the catalogue over one layer (K=16) against the raw forward pass, in one run.

Baseline: the same images decoded by the same pipeline (engine.images.DecodedBatches) and
pushed through the same model with `engine.inference.run_model` (to the logits), nothing
else. A second, stricter baseline stops the forward at the layer (`run_layers`), as the
catalogue does. Catalogue: `run_catalog` with the command's default options (scan,
statistics pass, tree reduce, patch pass with guided-backprop projections of every unit,
store writes; no feature visualisations, `--featvis` is 0 by default), and again without
projections; no report. Prints how the catalogue's time splits between decode, forward,
state update, patches and projections, and how the fixed per-unit part amortises with N.
By default the 250 shared images are linked 4 times under new names (1,000 distinct files), so
the per-unit fixed costs (projections, the patch pass) meet a dataset larger than the layer's
C * (K + bottom-K) list slots; `--copies 1` measures the 250 images alone.
Usage: python bench/catalog.py [--data DIR] [--copies M] [--limit N] [--layer L] [--batch-size B] [--repeat R]
       [--featvis N]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from common import SHARED_DATA  # also puts the repository on sys.path

from neurocat.prefect_env import prefect_defaults  # noqa: E402

prefect_defaults()


def raw_forward(model, items, batch_size, layer: str | None = None) -> float:
    """Seconds to decode `items` and run the model on them: to the logits, or only up to `layer`."""
    from engine.images import DecodedBatches
    from engine.inference import run_layers, run_model

    t0 = time.perf_counter()
    for batch in DecodedBatches(items, model.preprocessing, batch_size):
        x = batch.normalized(model.preprocessing, model.device)
        run_model(model, x) if layer is None else run_layers(model, x, [layer])
    return time.perf_counter() - t0


def linked_copies(data: Path, copies: int, into: Path) -> Path:
    """`data` with every image under `copies` names per class folder (hard links where possible)."""
    for copy in range(copies):
        for src in sorted(data.glob("*/*")):
            dst = into / src.parent.name / f"{copy}_{src.name}"
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(src, dst)
            except OSError:
                shutil.copyfile(src, dst)
    return into


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(SHARED_DATA))
    ap.add_argument("--copies", type=int, default=4, help="names per image (1: the data as it is)")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--layer", default="_blocks.5")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=2, help="alternate baselines and catalogues this many times")
    ap.add_argument("--featvis", type=int, default=0, help="feature visualisations of the first N units (default 0, "
                                                           "as the command)")
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
    work = tempfile.TemporaryDirectory()
    if args.copies > 1:
        args.data = str(linked_copies(Path(args.data), args.copies, Path(work.name) / "data"))
    items = [(i, str(Path(args.data) / e.path)) for i, e in enumerate(list_images(args.data)[: args.limit])]
    n = len(items)

    @flow(name="bench-catalog")
    def catalog(store: str, limit: int, projections: int | None) -> dict:
        opts = RunOptions(data=args.data, store=store, limit=limit, batch_size=args.batch_size, shard_size=256)
        result = run_catalog(opts, Store(store), [args.layer], top_k=16, bottom_k=8, featvis_n=args.featvis,
                             projections=projections)
        s = Store(store)
        lists = [s.read(f"catalog/{args.layer}/{w}_index") for w in ("top", "bottom")]
        read_again = len((set(lists[0].ravel()) | set(lists[1].ravel())) - {-1})
        stages = {f"stage:{k}": v for k, v in s.attrs()["timings"]["catalog"].items()}
        return {**result["seconds"], **stages, "read_again": read_again,
                "slots": lists[0].size + lists[1].size}

    names = ["raw forward", "raw forward to the layer", "catalog (defaults)", "catalog, no projections"]
    times = {k: [] for k in names}
    splits = {}
    with prefect_test_harness(server_startup_timeout=180), work, tempfile.TemporaryDirectory() as tmp:
        raw_forward(model, items[: args.batch_size], args.batch_size)  # warm-up: fast graphs, Prefect
        raw_forward(model, items[: args.batch_size], args.batch_size, args.layer)
        catalog(f"{tmp}/warm.zarr", args.batch_size, None)
        for r in range(args.repeat):
            for name in names:
                t0 = time.perf_counter()
                if name.startswith("raw"):
                    raw_forward(model, items, args.batch_size, args.layer if "layer" in name else None)
                else:
                    splits[name] = catalog(f"{tmp}/{r}-{len(times[name])}-{name[:9]}.zarr", n,
                                           0 if "no projections" in name else None)
                times[name].append(time.perf_counter() - t0)
    best = {k: min(v) for k, v in times.items()}
    load = os.getloadavg()
    print(f"images={n} ({args.copies} name(s) per shared image) layer={args.layer} K=16 bottom-K=8 batch={args.batch_size} featvis={args.featvis} "
          f"torch_threads={torch.get_num_threads()} repeats={args.repeat} (best of each); "
          f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    for name in names:
        ratio = best["raw forward"] / best[name]
        note = "  (target >= 0.85)" if name == "catalog (defaults)" else ""
        print(f"  {name:26s} {n / best[name]:7.1f} images/s  x{ratio:5.2f} of raw forward"
              f"  x{best['raw forward to the layer'] / best[name]:5.2f} of raw forward to the layer{note}")
    split = splits["catalog (defaults)"]
    stages = {k: split.get(f"stage:{k}", 0.0) for k in ("scan", "statistics", "reduce", "patches", "featvis")}
    tasks = {k: split.get(k, 0.0) for k in ("decode", "forward", "update", "patches", "projection")}
    print("time split of the last default catalogue:")
    print("  stages (wall s): " + ", ".join(f"{k} {v:.2f}" for k, v in stages.items())
          + f", other {max(0.0, times['catalog (defaults)'][-1] - sum(stages.values())):.2f}")
    total = sum(tasks.values())
    print("  inside tasks (s, % of task time):")
    for k, v in tasks.items():
        print(f"    {k:11s} {v:7.2f}  {100 * v / max(total, 1e-9):5.1f} %")
    # The statistics stage grows with N; the patch pass reads the images on some top/bottom
    # list again, at most C * (K + bottom-K) of them whatever N; projections are one per unit.
    per_image = stages["statistics"] / n
    per_read = max(0.0, stages["patches"] - tasks["projection"]) / max(split["read_again"], 1)
    fixed = times["catalog (defaults)"][-1] - stages["statistics"] - per_read * split["read_again"]
    raw_per_image = best["raw forward"] / n
    print(f"  amortisation (model from this run: {per_image * 1000:.0f} ms per image, {per_read * 1000:.0f} ms per "
          f"image read again, at most {split['slots']}, and {fixed:.1f} s fixed incl. projections):")
    for big in sorted({n, 1000, 10000, 100000}):
        cost = per_image * big + per_read * min(big, split["slots"]) + fixed
        print(f"    N={big:6d}  projected x{raw_per_image * big / cost:5.2f} of raw forward")

if __name__ == "__main__":
    main()
