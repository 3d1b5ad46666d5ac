"""What faithfulness scores cost: deletion, insertion and ROAD of one method's maps, against
the model forward passes they are made of; and ROAD's imputation against ROAD's own way of
computing it (one exact sparse solve per image, scipy), in time and in distance to it.

One run, same model, images and torch threads; each contender is timed `--repeats` times,
interleaved, and its best time counts. Usage: python bench/faithfulness.py [--limit N] [--repeats R]
"""

from __future__ import annotations

import argparse

from common import SHARED_DATA, best_of_interleaved, predicted_inputs  # also puts the repository on sys.path


def exact_impute(x, removed, noise: float = 0.02, seed: int = 0):
    """The baseline: each image's removed pixels solved exactly as the weighted mean of their
    8 neighbours (1/6 direct, 1/12 diagonal, renormalised at the border), kept pixels fixed."""
    import numpy as np
    import scipy.sparse as sp
    import scipy.sparse.linalg as spl
    import torch

    B, C, H, W = x.shape
    out = x.double().numpy().copy()
    for b in range(B):
        hole = removed[b, 0].numpy().astype(bool).ravel()
        unknown = np.flatnonzero(hole)
        index = np.full(H * W, -1)
        index[unknown] = np.arange(len(unknown))
        y, x_ = np.divmod(unknown, W)
        entries, rhs = [], np.zeros((len(unknown), C))
        weight_sum = np.zeros(len(unknown))
        neighbours = [(dy, dx, 1 / 6 if 0 in (dy, dx) else 1 / 12) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]
        for dy, dx, w in neighbours:
            ok = (y + dy >= 0) & (y + dy < H) & (x_ + dx >= 0) & (x_ + dx < W)
            weight_sum += w * ok
        image = out[b].reshape(C, -1)
        for dy, dx, w in neighbours:
            r = np.flatnonzero((y + dy >= 0) & (y + dy < H) & (x_ + dx >= 0) & (x_ + dx < W))
            q = (y[r] + dy) * W + x_[r] + dx
            free = index[q] >= 0
            entries.append((r[free], index[q[free]], -w / weight_sum[r[free]]))
            rhs[r[~free]] += (w / weight_sum[r[~free]])[:, None] * image[:, q[~free]].T
        rows, cols, vals = (np.concatenate([e[i] for e in entries] + [d]) for i, d in
                            enumerate([np.arange(len(unknown)), np.arange(len(unknown)), np.ones(len(unknown))]))
        image[:, unknown] = spl.spsolve(sp.csc_matrix((vals, (rows, cols)), shape=(len(unknown),) * 2), rhs).T
    filled = torch.from_numpy(out).float()
    return filled + removed * noise * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(SHARED_DATA))
    ap.add_argument("--limit", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import torch

    from engine import attribution as A
    from engine import faithfulness as Fa

    model, _, x, targets = predicted_inputs(args.data, slice(args.limit))
    maps = A.gradcam(model, x, targets)
    ends = Fa.curve_ends(model, x, targets)
    steps = 10
    # the images the scores push through the model: 2 x (steps - 1) curve points, 2 x 5 ROAD points
    n_forward = len(x) * (2 * (steps - 1) + 2 * len(Fa.ROAD_FRACTIONS))
    removed = (Fa.pixel_ranks(maps) < maps[0].numel() // 2)[:, None].float()  # MoRF at 50%
    hole = removed.bool().expand_as(x)
    distance = float((Fa.impute(x, removed, noise=0.0) - exact_impute(x, removed, noise=0.0))[hole].abs().mean())
    with torch.inference_mode():
        forward_inputs = x.repeat(n_forward // len(x), 1, 1, 1)

        contenders = {
            "faithfulness scores (deletion, insertion, ROAD)": lambda: Fa.faithfulness(model, x, targets, maps, steps,
                                                                                        ends=ends),
            f"their {n_forward} forward passes alone": lambda: Fa.target_probs(model, forward_inputs,
                                                                              targets.repeat(n_forward // len(x))),
            "ROAD imputation (neurocat)": lambda: Fa.impute(x, removed),
            "ROAD imputation (exact sparse solve per image)": lambda: exact_impute(x, removed),
        }
        best, _ = best_of_interleaved(contenders, args.repeats)
    print(f"images={len(x)} steps={steps} torch_threads={torch.get_num_threads()} repeats={args.repeats}")
    for name, t in best.items():
        print(f"{name:50s} {t:7.2f} s")
    names = list(best)
    print(f"ratio scores / their forwards alone           {best[names[0]] / best[names[1]]:6.2f}   (1.0 = imputation free)")
    print(f"ratio imputation exact / neurocat             {best[names[3]] / best[names[2]]:6.2f}"
          f"   (neurocat's mean distance to the exact fill: {distance:.4f}, normalised units)")


if __name__ == "__main__":
    main()
