"""images/s of plain eager PyTorch vs the fast model path (engine/fast.py), in one run.

Forward over the same decoded images: plain eager, the folded form (BN + padding folded,
channels-last), the fused form (the default: conv + ReLU6 / residual add as one oneDNN call)
and the compiled form (inductor with freezing; its compile time is the first batch's).
Forward+backward (an input-gradient saliency pass): plain eager vs the folded and fused forms.
Both again with engine/memory.py's malloc settings (what every shard task runs under), and
the jobs' form against plain eager PyTorch with glibc's defaults.
Variants run interleaved, several repeats, best of each, because other processes share
the CPU. Then `neurocat catalog` end to end, as a user runs it (the command in a fresh
process: start-up, scan, decode, forward, stats, patches, projections, report) on 250,
1,000 and 10,000 files, against the plain eager forward measured here and against a plain
eager loop that decodes the same files (its rate taken on the first 1,000: it does not
depend on their number). The catalogue's cost per unit
(patch pass, report) is fixed, its cost per image is not, so its rate grows with the dataset.
Usage: python bench/model_path.py [--images 64] [--repeats 3] [--e2e-copies 1,4,40] [--no-compile]
       [--no-eager-catalog]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, SHARED_DATA, model_inputs  # also puts the repository on sys.path


def images_per_second(step, x, batch_size: int) -> float:
    t0 = time.perf_counter()
    for i in range(0, len(x), batch_size):
        step(x[i:i + batch_size])
    return len(x) / (time.perf_counter() - t0)


def forward_steps(model, compile_: bool) -> dict:
    import torch

    from engine.fast import FastOptions, fast_module

    def eager(x):
        with torch.inference_mode():
            model.module(x)

    def fast(options):
        fm = fast_module(model, options=options)

        def step(x):
            with torch.inference_mode():
                fm(x)
        return step

    steps = {"plain eager": eager,
             "fast, folded": fast(FastOptions(fuse=False, compile=False)),
             "fast, fused": fast(FastOptions(compile=False))}
    if compile_:
        steps["fast, compiled"] = fast(FastOptions(compile=True))
    return steps


def backward_steps(model) -> dict:
    """Compiled forward+backward is left out: measured about 1.2x plain eager, below folded."""
    from engine.fast import FastOptions, fast_module

    def saliency(forward):
        def step(x):
            x = x.clone().requires_grad_(True)
            logits = forward(x)
            logits.gather(1, logits.argmax(1, keepdim=True)).sum().backward()
        return step

    folded = fast_module(model, for_grad=True, options=FastOptions(compile=False, fuse=False))
    fused = fast_module(model, for_grad=True, options=FastOptions(compile=False))
    return {"plain eager": saliency(model.module), f"fast, {folded.form}": saliency(lambda x: folded(x)[0]),
            f"fast, {fused.form} (default)": saliency(lambda x: fused(x)[0])}


def race(steps: dict, x, batch_size: int, repeats: int) -> dict:
    """Best images/s of each step, after one warm-up pass each (where compilation happens)."""
    warmup = {}
    for name, step in steps.items():
        t0 = time.perf_counter()
        step(x[:batch_size])
        warmup[name] = time.perf_counter() - t0
    best = {name: 0.0 for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            best[name] = max(best[name], images_per_second(step, x, batch_size))
    return {"best": best, "warmup": warmup}


def print_race(title: str, result: dict, baseline: str = "plain eager") -> None:
    print(f"\n{title}")
    base = result["best"][baseline]
    for name, ips in result["best"].items():
        print(f"  {name:22s} {ips:7.1f} images/s  x{ips / base:5.2f}   (first batch {result['warmup'][name]:6.1f} s)")


LOOP_FILES = 1000  # files the plain eager loop reads for its rate


def catalog_end_to_end(data: str, batch_size: int, fast: bool) -> tuple[float, dict]:
    """images/s of `neurocat catalog` as a user runs it: a fresh process, default layers and
    options, the Prefect API it finds (none: its own ephemeral server), report included;
    and the seconds of its stages from the store."""
    from engine.images import list_images
    from storage.store import Store

    n = len(list_images(data))
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | {"NEUROCAT_FAST": "1" if fast else "0"}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "neurocat", "catalog", "--data", data, "--store", f"{tmp}/c.zarr",
                        "--batch-size", str(batch_size), "--json"], env=env, cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL)
        seconds = time.perf_counter() - t0
        stages = Store(f"{tmp}/c.zarr", mode="r").attrs().get("timings", {}).get("catalog", {})
    return n / seconds, {"total": seconds, **stages}


def end_to_end(args, eager_fwd: float) -> None:
    """The catalogue end to end at each `--e2e-copies` size, against the plain eager forward of
    decoded tensors (the race above) and against a plain eager loop that also decodes the files
    (bench/forward.py's PIL + torchvision + model loop, the end-to-end a user would write)."""
    from bench.catalog import linked_copies
    from bench.forward import raw_loop
    from engine.images import list_images
    from engine.models import cached_model

    model = cached_model("efficientnet_lite0")
    with tempfile.TemporaryDirectory() as work:
        for copies in args.e2e_copies:
            data = args.data if copies == 1 else str(linked_copies(Path(args.data), copies, Path(work) / f"x{copies}"))
            paths = [Path(data) / e.path for e in list_images(data)]
            n = len(paths)
            fast, stages = catalog_end_to_end(data, args.batch_size, True)
            sample = paths[::max(1, n // LOOP_FILES)][:LOOP_FILES]
            loop = raw_loop(model, sample, args.batch_size)
            print(f"\nneurocat catalog end to end, {n} files ({copies} name(s) per shared image; a fresh process: "
                  f"start, scan, decode, forward, stats, patches, projections, report)")
            print(f"  fast path (default)   {fast:7.1f} images/s  x{fast / eager_fwd:5.2f} of plain eager forward "
                  f"(decoded tensors), x{fast / loop:5.2f} of a plain eager loop over the files ({loop:.1f} images/s on "
                  f"{len(sample)} of them)")
            print("  seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in stages.items()))
            if copies == args.e2e_copies[0] and not args.no_eager_catalog:
                eager, _ = catalog_end_to_end(data, args.batch_size, False)
                print(f"  NEUROCAT_FAST=0       {eager:7.1f} images/s  x{eager / eager_fwd:5.2f} of plain eager forward")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(SHARED_DATA))
    ap.add_argument("--images", type=int, default=64, help="decoded images per forward/backward pass")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--e2e-copies", type=lambda v: [int(c) for c in v.split(",") if c.strip() and int(c)], default="1,4,40",
                    help="end-to-end catalogue runs on the shared images under this many names each (1: the 250 "
                         "images; 4: 1,000 files; 40: 10,000); empty or 0: skip")
    ap.add_argument("--no-compile", action="store_true", help="leave out the compiled variants")
    ap.add_argument("--no-eager-catalog", action="store_true", help="leave out the NEUROCAT_FAST=0 catalogue")
    args = ap.parse_args()

    import torch

    from engine.fast import compile_cache_dir
    from engine.images import list_images
    from engine.models import cached_model

    model = cached_model("efficientnet_lite0")
    entries = list_images(args.data)[: args.images]
    x = model_inputs(model, [Path(args.data) / e.path for e in entries])
    print(f"images={len(x)} batch={args.batch_size} torch_threads={torch.get_num_threads()} "
          f"repeats={args.repeats} compile cache={compile_cache_dir()}")

    fwd = race(forward_steps(model, not args.no_compile), x, args.batch_size, args.repeats)
    print_race("forward (inference)", fwd)
    bwd = race(backward_steps(model), x, args.batch_size, args.repeats)
    print_race("forward + backward (input-gradient saliency)", bwd)

    from engine.memory import tune_malloc

    tune_malloc()  # process-wide from here on: what every shard task runs under (engine/memory.py)
    tuned_fwd = race(forward_steps(model, False), x, args.batch_size, args.repeats)
    print_race("forward, with neurocat's malloc settings (no page faults on activations)", tuned_fwd)
    tuned_bwd = race(backward_steps(model), x, args.batch_size, args.repeats)
    print_race("forward + backward, with neurocat's malloc settings", tuned_bwd)
    eager = fwd["best"]["plain eager"], bwd["best"]["plain eager"]
    print(f"\nthe jobs' form (fused, neurocat's malloc) vs plain eager PyTorch (glibc defaults): forward "
          f"x{tuned_fwd['best']['fast, fused'] / eager[0]:.2f}, forward + backward "
          f"x{tuned_bwd['best']['fast, fused (default)'] / eager[1]:.2f}")

    if args.e2e_copies:
        end_to_end(args, fwd["best"]["plain eager"])

if __name__ == "__main__":
    main()
