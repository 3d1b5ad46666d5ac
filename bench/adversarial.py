"""PGD as the adversarial job runs it (the model's fast form) against torchattacks' PGD and
the project's PGD on the eager model, all on the same model, images, labels and eps.

One run, same torch threads; each contender is timed `--repeats` times, interleaved, and its
best time counts. The accuracy each attack leaves (top-1 of the eager model on the uint8
images) says they do the same job. Usage: python bench/adversarial.py [--limit N] [--repeats R]
"""

from __future__ import annotations

import argparse

from common import SHARED_DATA, best_of_interleaved, predicted_inputs  # also puts the repository on sys.path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(SHARED_DATA))
    ap.add_argument("--limit", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()

    import torch
    import torchattacks
    from torch import nn

    from engine.attacks import pgd, pixel_forward, to_pixels, to_uint8

    model, _, x, labels = predicted_inputs(args.data, slice(args.limit))
    prep = model.preprocessing
    mean, std = torch.tensor(prep.mean).view(1, 3, 1, 1), torch.tensor(prep.std).view(1, 3, 1, 1)
    pixels = (x * std + mean).clamp(0, 1).contiguous()
    eps = 4 / 255

    class Normalized(nn.Module):  # torchattacks works in [0, 1] on an nn.Module
        def __init__(self):
            super().__init__()
            self.net = model.module

        def forward(self, z):
            return self.net((z - mean) / std)

    theirs = torchattacks.PGD(Normalized().eval(), eps=eps, alpha=2.5 * eps / args.steps, steps=args.steps)
    eager, fast = pixel_forward(model), pixel_forward(model, fast=True)
    contenders = {
        "torchattacks PGD (eager model)": lambda: theirs(pixels, labels),
        "neurocat pgd, eager model": lambda: pgd(eager, pixels, labels, eps, args.steps,
                                                 generator=torch.Generator().manual_seed(0)),
        "neurocat pgd, fast form (the job's)": lambda: pgd(fast, pixels, labels, eps, args.steps,
                                                           generator=torch.Generator().manual_seed(0)),
    }
    best, adversarial = best_of_interleaved(contenders, args.repeats)
    with torch.no_grad():
        accuracy = {name: float((eager(to_pixels(to_uint8(adv))).argmax(1) == labels).float().mean())
                    for name, adv in adversarial.items()}
    print(f"images={len(x)} eps=4/255 steps={args.steps} torch_threads={torch.get_num_threads()} "
          f"repeats={args.repeats} (labels: the model's own predictions, clean accuracy 1.0)")
    for name, t in best.items():
        print(f"{name:40s} {t:7.2f} s   accuracy left {accuracy[name]:.3f}")
    names = list(best)
    print(f"ratio torchattacks / job's pgd          {best[names[0]] / best[names[2]]:6.2f}")
    print(f"ratio eager / fast form (same pgd)      {best[names[1]] / best[names[2]]:6.2f}")


if __name__ == "__main__":
    main()
