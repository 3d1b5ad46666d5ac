"""Seconds per iteration of every render at 224 and 512 px, against a plain forward+backward.

Baseline (same run, same threads): one forward of EfficientNet-Lite0 to the logits plus a
backward to the input, batch 1, at the same size. Each render runs a few steps after a
warm-up step; the ratio says what a render's iteration costs beyond the bare gradient.
Usage: python bench/render.py [--sizes 224,512] [--steps 3] [--threads N]
"""

from __future__ import annotations

import argparse
import time

from common import SHARED_DATA  # also puts the repository on sys.path


def per_iteration(fn, steps: int, repeats: int = 2) -> float:
    """Seconds per step of `fn(steps)`: the loop's own time where it reports one, best of `repeats`.

    A RenderResult times only its optimisation loop (targets and set-up excluded); other
    callables are timed whole. A one-step warm-up runs first.
    """
    fn(1)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn(steps)
        wall = time.perf_counter() - t0
        loop = getattr(out, "seconds", 0.0) or wall
        best = min(best, loop / steps)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="224,512")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    import numpy as np
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from engine.classvis import ClassVisOptions, InvertOptions, class_visualisation, invert_features
    from engine.dream import DreamOptions, deep_dream
    from engine.fast_style import FastStyleOptions, TransformNet, apply_fast_style, train_fast_style
    from engine.images import open_image
    from engine.models import cached_model
    from engine.optvis.featvis import feature_visualisation
    from engine.optvis.param import image_to_tensor, tensor_to_image
    from engine.style import StyleOptions, TextureOptions, fit_size, style_transfer, synthesize_texture

    m = cached_model()
    data = SHARED_DATA
    photo = np.asarray(open_image(data / "n02112137" / "n02112137_chow.JPEG"))
    style = np.asarray(open_image(data / "n02391049" / "n02391049_zebra.JPEG"))
    print(f"torch threads: {torch.get_num_threads()}, steps per measure: {args.steps}")
    print(f"{'render':<22}{'size':>6}{'s/iter':>10}{'ratio':>8}")
    for size in [int(s) for s in args.sizes.split(",")]:
        def baseline(n):
            for _ in range(n):
                x = torch.rand(1, 3, size, size, requires_grad=True)
                m.module(x)[0, 0].backward()
        base = per_iteration(baseline, args.steps)
        print(f"{'forward+backward':<22}{size:>6}{base:>10.3f}{1.0:>8.2f}")
        c = tensor_to_image(fit_size(image_to_tensor(photo), size))[0][:size, :size]
        renders = {
            "featvis": lambda n: feature_visualisation(m, "_blocks.10", 0, size=size, steps=n),
            "classvis": lambda n: class_visualisation(m, 340, ClassVisOptions(size=size, steps=n)),
            "invert": lambda n: invert_features(m, c, InvertOptions(size=size, steps=n)),
            "dream (1 octave)": lambda n: deep_dream(m, c, DreamOptions(octaves=1, steps=n)),
            "dream tiled 256+64": lambda n: deep_dream(m, c, DreamOptions(octaves=1, steps=n, tile=256, overlap=64)),
            "style (L-BFGS)": lambda n: style_transfer(m, c, [style], StyleOptions(size=size, steps=n)),
            "texture (L-BFGS)": lambda n: synthesize_texture(m, style, TextureOptions(size=size, steps=n)),
            "fast-style train b4": lambda n: train_fast_style(m, [c], [style], FastStyleOptions(size=size, steps=n)),
        }
        for name, fn in renders.items():
            t = per_iteration(fn, args.steps)
            print(f"{name:<22}{size:>6}{t:>10.3f}{t / base:>8.2f}", flush=True)
        net = TransformNet(16, 3, 1).eval()
        t = per_iteration(lambda n: [apply_fast_style(net, c) for _ in range(n)], args.steps)
        print(f"{'fast-style apply':<22}{size:>6}{t:>10.3f}{t / base:>8.2f}", flush=True)


if __name__ == "__main__":
    main()
