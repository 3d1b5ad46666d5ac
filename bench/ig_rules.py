"""Integrated gradients: the adaptive rule against Gauss-Legendre (Captum's), time and completeness.

One run, same model, images (every `--every`-th shared image from `--offset`: the
completeness test's sample by default), steps and chunk; the two rules are timed
`--repeats` times, interleaved, after one warm-up call each, and the best time counts (the
machine is shared). Prints per image the completeness error of each rule, then counts,
medians, maxima, seconds per image and the adaptive/Gauss-Legendre time ratio.
Usage: python bench/ig_rules.py [--data DIR] [--every K] [--offset O] [--steps S] [--probes P] [--repeats R]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from common import SHARED_DATA, model_inputs  # also puts the repository on sys.path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(SHARED_DATA))
    ap.add_argument("--every", type=int, default=25)
    ap.add_argument("--offset", type=int, default=0)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--probes", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    import numpy as np
    import torch

    from engine import attribution as A
    from engine.images import list_images
    from engine.models import cached_model

    model = cached_model("efficientnet_lite0")
    paths = [Path(args.data) / e.path for e in list_images(args.data)][args.offset::args.every]
    x = model_inputs(model, paths)
    with torch.no_grad():
        t = model.module(x).argmax(1)
    rules = {"gausslegendre": {}, "adaptive": {"probes": args.probes}}
    best = {r: float("inf") for r in rules}
    errors = {}
    A.integrated_gradients(model, x[:1], t[:1], steps=2, rule="adaptive", probes=2)  # warm-up: fast form, threads
    for _ in range(args.repeats):
        for rule, extra in rules.items():
            start = time.perf_counter()
            _, errors[rule] = A.integrated_gradients(model, x, t, steps=args.steps, rule=rule, **extra)
            best[rule] = min(best[rule], time.perf_counter() - start)
    print(f"{len(x)} images, {args.steps} steps, {args.probes} probes, torch threads {torch.get_num_threads()}")
    print("image        " + "  ".join(f"{r:>13s}" for r in rules))
    for i, p in enumerate(paths):
        print(f"{p.parent.name:12s} " + "  ".join(f"{100 * float(errors[r][i]):12.2f}%" for r in rules))
    for rule in rules:
        e = errors[rule].numpy()
        print(f"{rule:13s} within 1%: {(e <= 0.01).sum()}/{len(e)}  median {100 * np.median(e):.2f}%  "
              f"max {100 * e.max():.2f}%  {best[rule] / len(x):.2f} s/image")
    print(f"time ratio adaptive / gausslegendre: {best['adaptive'] / best['gausslegendre']:.2f}")


if __name__ == "__main__":
    main()
