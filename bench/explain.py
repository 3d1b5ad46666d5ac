"""images/s of neurocat's Grad-CAM and saliency against pytorch-grad-cam's GradCAM and Captum's Saliency.

One run, same model (EfficientNet-Lite0, eval, frozen weights), same preprocessed images,
same batch size and torch threads; each contender is timed `--repeats` times, interleaved,
and its best time counts (the machine is shared). Outputs are checked to agree before timing.
Usage: python bench/explain.py [--data DIR] [--limit N] [--batch-size B] [--repeats R]
"""

from __future__ import annotations

import argparse

from common import SHARED_DATA, best_of_interleaved, predicted_inputs  # also puts the repository on sys.path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(SHARED_DATA))
    ap.add_argument("--limit", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--layer", default="_conv_head", help="Grad-CAM layer for both (a module output)")
    args = ap.parse_args()

    import numpy as np
    import torch
    from captum.attr import Saliency
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from engine import attribution as A

    model, _, x, targets = predicted_inputs(args.data, slice(args.limit))
    batches = [(x[i:i + args.batch_size], targets[i:i + args.batch_size]) for i in range(0, len(x), args.batch_size)]
    layer = model.module.get_submodule(args.layer)

    def ours_saliency(xb, tb):
        return A.saliency(model, xb, tb, chunk=args.batch_size)

    def captum_saliency(xb, tb):
        return Saliency(model.module).attribute(xb.clone(), target=tb, abs=True).amax(1)

    def ours_saliency_fast(xb, tb):
        return A.saliency(model, xb, tb, chunk=args.batch_size, fast=True)

    def ours_gradcam(xb, tb):
        return A.gradcam(model, xb, tb, layer=args.layer, chunk=args.batch_size)

    def ours_gradcam_default(xb, tb):
        return A.gradcam(model, xb, tb, chunk=args.batch_size)

    def library_gradcam(xb, tb):
        # frozen weights: the library sees gradients only when the input requires grad
        with GradCAM(model.module, [layer]) as cam:
            return cam(xb.clone().requires_grad_(True), targets=[ClassifierOutputTarget(int(c)) for c in tb])

    xb, tb = batches[0]
    assert float((ours_saliency(xb, tb) - captum_saliency(xb, tb)).abs().max()) < 1e-5
    assert np.abs(ours_gradcam(xb, tb).numpy() - library_gradcam(xb, tb)).max() < 1e-4

    contenders = {"neurocat saliency": ours_saliency, "captum Saliency": captum_saliency,
                  f"neurocat gradcam ({args.layer})": ours_gradcam, f"pytorch-grad-cam GradCAM ({args.layer})": library_gradcam,
                  "neurocat gradcam (default: GAP input)": ours_gradcam_default,
                  "neurocat saliency fast=True (folded BN)": ours_saliency_fast}
    best, _ = best_of_interleaved({name: (lambda fn=fn: [fn(xb, tb) for xb, tb in batches])
                                   for name, fn in contenders.items()}, args.repeats)
    rate = {name: len(x) / t for name, t in best.items()}
    print(f"images={len(x)} batch={args.batch_size} torch_threads={torch.get_num_threads()} repeats={args.repeats}")
    for name, r in rate.items():
        print(f"{name:45s} {r:7.1f} images/s")
    names = list(rate)
    print(f"ratio saliency neurocat/captum          {rate[names[0]] / rate[names[1]]:6.2f}   (target >= 1.0)")
    print(f"ratio gradcam neurocat/pytorch-grad-cam {rate[names[2]] / rate[names[3]]:6.2f}   (target >= 1.0)")
    print(f"ratio saliency fast/captum              {rate[names[5]] / rate[names[1]]:6.2f}")


if __name__ == "__main__":
    main()
