"""DeepDream (Mordvintsev et al. 2015): amplify what a layer already sees in a photo.

Ascend ||phi_L(x)||^2 (or one channel's) with normalised gradient steps, over octaves: the
image is dreamed at 1/scale^(n-1) of its size first, and the detail each octave adds is
carried up to the next (so large structures form before fine ones). A random circular
shift (`roll`) every step hides tile seams and the network's stride grid. `tile=(core,
overlap)` computes gradients window by window so a large image fits in memory.
Defaults for EfficientNet-Lite0: layer `_blocks.10` (112 channels, 14 px at 224 input:
eyes, fur and scales), 4 octaves of scale 1.4, 10 steps of 0.01 each, roll 32 px (0.02 buries the photo
under dog faces).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from engine.models import LoadedModel, smallest_input
from engine.optvis import objectives as obj
from engine.optvis.param import PixelParam, image_to_tensor, resize, tensor_to_image
from engine.optvis.render import RenderResult, render
from engine.optvis.transform import roll


@dataclass
class DreamOptions:
    layer: str = "_blocks.10"
    channel: int | None = None
    octaves: int = 4
    octave_scale: float = 1.4
    steps: int = 10  # per octave
    lr: float = 0.01
    jitter: int = 32
    tile: int | None = None  # core tile size in pixels; None: whole image at once
    overlap: int = 64
    smooth: float | None = None
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def deep_dream(model: LoadedModel, image: np.ndarray, opts: DreamOptions = DreamOptions()) -> RenderResult:
    """The dreamed image (uint8, same size as `image`); snapshots: the image after each octave."""
    base = image_to_tensor(image).to(model.device)
    h, w = base.shape[-2:]
    low = smallest_input(model)  # a smaller octave crashed deep layers (_blocks.15 at --size 64)
    sizes = [(max(low, round(h / opts.octave_scale ** k)), max(low, round(w / opts.octave_scale ** k)))
             for k in reversed(range(opts.octaves))]
    objective = obj.dream(model.resolve(opts.layer), opts.channel)
    g = torch.Generator().manual_seed(opts.seed)
    detail = torch.zeros(1, 3, *sizes[0], device=model.device)
    losses, snapshots, seconds = [], [], 0.0
    for k, size in enumerate(sizes):
        b = resize(base, size)
        param = PixelParam((b + resize(detail, size)).clamp(0, 1))
        r = render(model, objective, param, opts.steps, lr=opts.lr, optimizer="normalized",
                   transform=roll(opts.jitter), generator=g, smooth=opts.smooth,
                   tile=(opts.tile, opts.overlap) if opts.tile else None)
        detail = param().detach() - b
        losses += list(r.losses)
        seconds += r.seconds
        snapshots.append((k + 1, tensor_to_image(resize(param().detach(), (h, w)))))
    return RenderResult(snapshots[-1][1], np.asarray(losses), snapshots, seconds,
                        {**opts.to_dict(), "layer": model.resolve(opts.layer)})
