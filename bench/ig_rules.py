"""Integrated gradients: the adaptive rule against Gauss-Legendre (Captum's), time and completeness;
and refinement to the completeness tolerance against the adaptive rule at its cap everywhere.

One run, same model, images (every `--every`-th shared image from `--offset`: the
completeness test's sample by default), steps and chunk; the four are timed `--repeats`
times, interleaved, after one warm-up call, and the best time counts (the machine is
shared). Prints per image the completeness error of each, then counts, medians, maxima,
seconds per image and the time ratios.
Usage: python bench/ig_rules.py [--data DIR] [--every K] [--offset O] [--steps S] [--probes P] [--max-steps M]
       [--repeats R]
"""

from __future__ import annotations

import argparse

from common import SHARED_DATA, best_of_interleaved, predicted_inputs  # also puts the repository on sys.path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(SHARED_DATA))
    ap.add_argument("--every", type=int, default=25)
    ap.add_argument("--offset", type=int, default=0)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--probes", type=int, default=64)
    ap.add_argument("--max-steps", type=int, default=256, help="refinement's cap, and the fixed-steps comparison")
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()

    import numpy as np
    import torch

    from engine import attribution as A

    model, paths, x, t = predicted_inputs(args.data, slice(args.offset, None, args.every))
    S, P, M = args.steps, args.probes, args.max_steps
    runs = {  # name -> the completeness errors of one call over the images
        "gausslegendre": lambda: A.integrated_gradients(model, x, t, steps=S, rule="gausslegendre")[1],
        "adaptive": lambda: A.integrated_gradients(model, x, t, steps=S, probes=P)[1],
        "refined": lambda: A.refined_integrated_gradients(model, x, t, max_steps=M, steps=S, probes=P)[1],
        f"adaptive@{M}": lambda: A.integrated_gradients(model, x, t, steps=M, probes=P * M // S)[1],
    }
    A.integrated_gradients(model, x[:1], t[:1], steps=2, rule="adaptive", probes=2)  # warm-up: fast form, threads
    best, errors = best_of_interleaved(runs, args.repeats)
    print(f"{len(x)} images, {S} steps, {P} probes, refined to {100 * A.IG_TOLERANCE:g}% up to {M} steps, "
          f"torch threads {torch.get_num_threads()}")
    print("image        " + "  ".join(f"{r:>13s}" for r in runs))
    for i, p in enumerate(paths):
        print(f"{p.parent.name:12s} " + "  ".join(f"{100 * float(errors[r][i]):12.2f}%" for r in runs))
    for name in runs:
        e = errors[name].numpy()
        print(f"{name:13s} within 1%: {(e <= 0.01).sum()}/{len(e)}  median {100 * np.median(e):.2f}%  "
              f"max {100 * e.max():.2f}%  {best[name] / len(x):.2f} s/image")
    print(f"time ratio adaptive / gausslegendre: {best['adaptive'] / best['gausslegendre']:.2f}")
    print(f"time ratio refined / adaptive: {best['refined'] / best['adaptive']:.2f}, "
          f"refined / adaptive@{M}: {best['refined'] / best[f'adaptive@{M}']:.2f}")

if __name__ == "__main__":
    main()
