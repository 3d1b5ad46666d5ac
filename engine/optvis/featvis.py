"""Feature visualisation of units: the one implementation the catalogue and `render featvis` share.

Recipe (Olah et al. 2017, tuned on EfficientNet-Lite0): Fourier parameterisation with 1/f
scaling and decorrelated colours, Lucid's transformation robustness (pad, jitter, ±10 %
scale, ±10° rotation), Adam at lr 0.05, and ReLU6 smoothed (beta 2) so units that are off
or saturated still pass gradient.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from engine.models import LoadedModel
from engine.optvis import objectives as obj
from engine.optvis.param import FourierParam, PixelParam
from engine.optvis.render import RenderResult, render
from engine.optvis.transform import standard_robustness

FEATVIS_DEFAULTS = dict(size=128, steps=128, lr=0.05, smooth=2.0)


def feature_visualisation(model: LoadedModel, layer: str, channel: int | Sequence[int], size: int = 128,
                          steps: int = 128, seed: int = 0, lr: float = 0.05, fourier: bool = True,
                          decorrelate: bool = True, robust: bool = True, smooth: float | None = 2.0,
                          record: Sequence[int] = ()) -> RenderResult:
    """Optimise an image (or a batch, one per channel) to excite `channel` of `layer`."""
    batch = 1 if isinstance(channel, (int, np.integer)) else len(channel)
    index = int(channel) if batch == 1 and isinstance(channel, (int, np.integer)) else [int(c) for c in channel]
    g = torch.Generator().manual_seed(seed)
    shape = (batch, 3, size, size)
    param = FourierParam(shape, decorrelate=decorrelate, generator=g) if fourier else \
        PixelParam(shape=shape, noise=0.05, generator=g)
    result = render(model, obj.channel(model.resolve(layer), index), param, steps, lr=lr, optimizer="adam",
                    transform=standard_robustness(size) if robust else None, generator=g, smooth=smooth,
                    record=record)
    result.settings = {"layer": model.resolve(layer), "channel": index, "size": size, "steps": steps, "seed": seed,
                       "lr": lr, "fourier": fourier, "decorrelate": decorrelate, "robust": robust, "smooth": smooth}
    return result


def visualize_unit(model: LoadedModel, layer: str, channel: int | Sequence[int], size: int = 128,
                   steps: int = 128, seed: int = 0, **options) -> np.ndarray:
    """uint8 [size, size, 3] image that excites one unit, or [B, size, size, 3] for a list of channels.

    `options` pass through to `feature_visualisation` (lr, fourier, decorrelate, robust, smooth).
    """
    result = feature_visualisation(model, layer, channel, size, steps, seed, **options)
    return result.images[0] if isinstance(channel, (int, np.integer)) else result.images
