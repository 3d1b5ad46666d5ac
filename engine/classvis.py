"""Class visualisation and feature inversion: images synthesised from what the network scores.

Class visualisation (Simonyan et al. 2014, with Yosinski et al.'s 2015 regularisers):
argmax_I S_c(I) - lambda ||I||^2 by gradient ascent from near-grey noise, with, between
steps, L2 decay towards grey, a Gaussian blur every few steps, pixels of small norm and
pixels of small contribution |x * grad| reset to grey, and random jitter.
Feature inversion (Mahendran & Vedaldi 2015): argmin_x ||Phi(x) - Phi_0||^2 / ||Phi_0||^2
+ lambda R_{V^beta}(x) with Phi the fc7 embedding of a reference photo.
Both run on EfficientNet-Lite0 with smoothed ReLU6 (beta 2), which keeps gradients alive.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from engine.filters import gaussian_blur
from engine.models import LoadedModel
from engine.optvis import objectives as obj
from engine.optvis.param import ImageParam, PixelParam, image_to_tensor
from engine.optvis.render import RenderResult, forward_layers, network, render
from engine.optvis.transform import compose, jitter, pad, roll
from engine.style import fit_size, normalize


# ---- Yosinski's regularisers, applied to the pixels between steps ---------------------------
def l2_decay(theta: float):
    def hook(param: ImageParam, step: int):
        with torch.no_grad():
            param.pixels.sub_(0.5).mul_(1 - theta).add_(0.5)
    return hook


def blur_every(every: int, sigma: float):
    def hook(param: ImageParam, step: int):
        if every and sigma > 0 and step % every == 0:
            with torch.no_grad():
                param.pixels.copy_(gaussian_blur(param.pixels, sigma))
    return hook


def _below_percentile(score: torch.Tensor, pct: float) -> torch.Tensor:
    return score < torch.quantile(score.flatten(1), pct / 100, dim=1).view(-1, 1, 1)


def clip_small_norm(pct: float):
    """Pixels whose colour vector (from grey) is in the lowest `pct` % of norms become grey."""
    def hook(param: ImageParam, step: int):
        if pct > 0:
            with torch.no_grad():
                mask = _below_percentile((param.pixels - 0.5).norm(dim=1), pct)
                param.pixels.masked_fill_(mask[:, None].expand_as(param.pixels), 0.5)
    return hook


def clip_small_contribution(pct: float):
    """Pixels with the smallest |x * grad| (their first-order effect on the score) become grey."""
    def hook(param: ImageParam, step: int):
        if pct > 0 and param.pixels.grad is not None:
            with torch.no_grad():
                score = ((param.pixels - 0.5) * -param.pixels.grad).sum(1).abs()
                mask = _below_percentile(score, pct)
                param.pixels.masked_fill_(mask[:, None].expand_as(param.pixels), 0.5)
    return hook


@dataclass
class ClassVisOptions:
    size: int = 224
    steps: int = 200
    lr: float = 0.02
    l2_weight: float = 1.0  # lambda of the L2 term in the objective
    decay: float = 0.001  # Yosinski theta_decay
    blur_every: int = 4
    blur_sigma: float = 0.5
    clip_norm_pct: float = 10.0
    clip_contribution_pct: float = 10.0
    jitter: int = 8
    smooth: float | None = 2.0
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def class_visualisation(model: LoadedModel, class_index: int, opts: ClassVisOptions = ClassVisOptions(),
                        record: tuple[int, ...] = ()) -> RenderResult:
    g = torch.Generator().manual_seed(opts.seed)
    param = PixelParam(shape=(1, 3, opts.size, opts.size), noise=0.05, generator=g)
    objective = obj.class_logit(class_index) + opts.l2_weight * obj.l2()
    hooks = [l2_decay(opts.decay), blur_every(opts.blur_every, opts.blur_sigma),
             clip_small_norm(opts.clip_norm_pct), clip_small_contribution(opts.clip_contribution_pct)]
    result = render(model, objective, param, opts.steps, lr=opts.lr, optimizer="normalized",
                    transform=roll(opts.jitter), generator=g, smooth=opts.smooth, after_step=hooks, record=record)
    result.settings = {"class_index": int(class_index), **opts.to_dict()}
    return result


@dataclass
class InvertOptions:
    layer: str = "fc7"
    size: int = 224
    steps: int = 200
    lr: float = 0.02  # the real network's fc7 (smoothed gradient only): 0.05 overshoots at first
    tv_weight: float = 5.0  # 0.5 leaves high-frequency colour noise in fc7 inversions
    tv_beta: float = 2.0
    jitter: int = 4
    smooth: float | None = 2.0
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def invert_features(model: LoadedModel, image: np.ndarray, opts: InvertOptions = InvertOptions(),
                    record: tuple[int, ...] = ()) -> RenderResult:
    """An image whose `layer` embedding matches that of `image` (its centre crop at `size`)."""
    layer = model.resolve(opts.layer)
    ref = fit_size(image_to_tensor(image), opts.size)
    h, w = ref.shape[-2:]
    top, left = (h - opts.size) // 2, (w - opts.size) // 2
    ref = ref[..., top:top + opts.size, left:left + opts.size]
    net = network(model, opts.smooth)
    with torch.no_grad():
        target = forward_layers(model, net, normalize(model, ref), [layer])[layer]
    g = torch.Generator().manual_seed(opts.seed)
    param = PixelParam(shape=ref.shape, noise=0.05, generator=g)
    objective = obj.feature_match(layer, target) + opts.tv_weight * obj.tv(opts.tv_beta)
    # shifts of up to +-jitter that keep the size: a spatial layer's map must stay the target's shape
    transform = compose([pad(opts.jitter), jitter(2 * opts.jitter + 1)]) if opts.jitter else None
    result = render(model, objective, param, opts.steps, lr=opts.lr, optimizer="adam", transform=transform,
                    generator=g, smooth=opts.smooth, record=record)
    result.settings = {**opts.to_dict(), "layer": layer}
    return result
