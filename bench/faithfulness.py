"""What faithfulness scores cost: deletion, insertion and ROAD of one method's maps, against
the model forward passes they are made of, and ROAD's imputation against a direct
transcription of it (a 2-D Gaussian start, then Jacobi steps as one-channel 3x3 conv2d).

One run, same model, images and torch threads; each contender is timed `--repeats` times,
interleaved, and its best time counts. Usage: python bench/faithfulness.py [--limit N] [--repeats R]
"""

from __future__ import annotations

import argparse
import time

from common import SHARED_DATA, predicted_inputs  # also puts the repository on sys.path


def plain_impute(x, removed, iterations: int = 40, noise: float = 0.02, seed: int = 0):
    """ROAD's noisy linear imputation as written down (the baseline)."""
    import torch
    import torch.nn.functional as F
    from torchvision.transforms.functional import gaussian_blur

    kernel = torch.tensor([[1 / 12, 1 / 6, 1 / 12], [1 / 6, 0.0, 1 / 6], [1 / 12, 1 / 6, 1 / 12]]).view(1, 1, 3, 3)
    C, hole = x.shape[1], removed.bool()
    wide = gaussian_blur(torch.cat([x * (1 - removed), 1 - removed], 1), [31, 31], [8.0, 8.0])
    v = torch.where(hole, wide[:, :C] / wide[:, C:].clamp(min=1e-6), x)
    weight = F.conv2d(torch.ones_like(removed), kernel, padding=1)
    for _ in range(iterations):
        v = torch.where(hole, F.conv2d(v.flatten(0, 1)[:, None], kernel, padding=1).view_as(v) / weight, x)
    return v + removed * noise * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))


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
    removed = (Fa.pixel_ranks(maps) < maps[0].numel() // 2)[:, None].float()
    assert float((Fa.impute(x, removed) - plain_impute(x, removed)).abs().max()) < 1e-5
    with torch.inference_mode():
        forward_inputs = x.repeat(n_forward // len(x), 1, 1, 1)

        contenders = {
            "faithfulness scores (deletion, insertion, ROAD)": lambda: Fa.faithfulness(model, x, targets, maps, steps,
                                                                                        ends=ends),
            f"their {n_forward} forward passes alone": lambda: Fa.target_probs(model, forward_inputs,
                                                                              targets.repeat(n_forward // len(x))),
            "ROAD imputation (neurocat)": lambda: Fa.impute(x, removed),
            "ROAD imputation (plain transcription)": lambda: plain_impute(x, removed),
        }
        best = {name: float("inf") for name in contenders}
        for _ in range(args.repeats):
            for name, fn in contenders.items():
                t0 = time.perf_counter()
                fn()
                best[name] = min(best[name], time.perf_counter() - t0)
    print(f"images={len(x)} steps={steps} torch_threads={torch.get_num_threads()} repeats={args.repeats}")
    for name, t in best.items():
        print(f"{name:50s} {t:7.2f} s")
    names = list(best)
    print(f"ratio scores / their forwards alone           {best[names[0]] / best[names[1]]:6.2f}   (1.0 = imputation free)")
    print(f"ratio imputation plain / neurocat             {best[names[3]] / best[names[2]]:6.2f}")


if __name__ == "__main__":
    main()
