"""Objectives: losses to MINIMISE, built from small pieces that combine with + - and *.

An `Objective` names the layers it reads and maps `(acts, image)` to a scalar, where
`acts[layer]` is that layer's output for the transformed batch and `image` the untransformed
image in [0, 1]. Maximising a unit is minimising its negative, so `channel(...) + 1e-3 * l2()`
means "excite the channel, keep the image small". Objectives marked `additive` are sums
over spatial positions, which is what lets DeepDream split an image into tiles.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

Acts = dict[str, torch.Tensor]


class Objective:
    def __init__(self, fn: Callable[[Acts, torch.Tensor], torch.Tensor], layers: tuple[str, ...] = (),
                 name: str = "objective", additive: bool = False):
        self.fn = fn
        self.layers = tuple(dict.fromkeys(layers))
        self.name = name
        self.additive = additive

    def __call__(self, acts: Acts, image: torch.Tensor) -> torch.Tensor:
        return self.fn(acts, image)

    def __add__(self, other: "Objective | float") -> "Objective":
        if not isinstance(other, Objective):
            if other == 0:  # lets sum() start from 0
                return self
            return NotImplemented
        return Objective(lambda a, x: self(a, x) + other(a, x), self.layers + other.layers,
                         f"{self.name} + {other.name}", self.additive and other.additive)

    __radd__ = __add__

    def __mul__(self, k: float) -> "Objective":
        k = float(k)
        return Objective(lambda a, x: k * self(a, x), self.layers, f"{k:g} * {self.name}", self.additive)

    __rmul__ = __mul__

    def __neg__(self) -> "Objective":
        return self * -1.0

    def __sub__(self, other: "Objective") -> "Objective":
        return self + (-other)

    def __repr__(self) -> str:
        return f"Objective({self.name})"


# ---- units of the network -------------------------------------------------------------
def channel(layer: str, index: int | Sequence[int]) -> Objective:
    """Mean activation of one channel (a feature map, or a unit of a vector layer).

    With a list of B channels, image b of the batch excites channel `index[b]`: B units
    are visualised for the price of one batched optimisation.
    """
    def fn(acts, image):
        a = acts[layer]
        if isinstance(index, int):
            return -a[:, index].mean()
        picked = a[torch.arange(len(index)), torch.as_tensor(index)]  # [B, H, W], or [B] on a vector layer
        return -picked.reshape(len(index), -1).mean(1).sum()
    return Objective(fn, (layer,), f"channel({layer}:{index})")


def class_logit(index: int, layer: str = "logits") -> Objective:
    """The pre-softmax score of class `index` (Simonyan et al.'s S_c)."""
    def fn(acts, image):
        return -acts[layer].flatten(1)[:, index].mean()
    return Objective(fn, (layer,), f"class_logit({index})")


def dream(layer: str, index: int | None = None) -> Objective:
    """DeepDream: ||phi_L(x)||^2 summed over positions (and channels, or one channel)."""
    def fn(acts, image):
        a = acts[layer] if index is None else acts[layer][:, index:index + 1]
        return -(a * a).sum()
    return Objective(fn, (layer,), f"dream({layer}{'' if index is None else f':{index}'})", additive=True)


# ---- matching a reference ---------------------------------------------------------------
def gram(features: torch.Tensor) -> torch.Tensor:
    """G = F F^T over spatial positions, per image: [B, N, H, W] -> [B, N, N] (unnormalised)."""
    f = features.flatten(2)
    return f @ f.transpose(1, 2)


def style(layer: str, target_mean_gram: torch.Tensor) -> Objective:
    """Gatys' E_l = 1 / (4 N^2 M^2) * sum (G - G_target)^2 for one layer.

    Written with G / M (the Gram matrix per position) so a target measured on a style image of
    another size M_s still compares like with like: for equal sizes it is exactly E_l.
    """
    def fn(acts, image):
        f = acts[layer]
        n, m = f.shape[1], f.shape[2] * f.shape[3]
        g = gram(f) / m
        return ((g - target_mean_gram.to(g)) ** 2).sum() / (4 * n * n) / f.shape[0]
    return Objective(fn, (layer,), f"style({layer})")


def content(layer: str, target: torch.Tensor) -> Objective:
    """||phi_L(x) - phi_L(x_c)||^2 divided by the number of elements (weights independent of size)."""
    def fn(acts, image):
        return ((acts[layer] - target.to(acts[layer])) ** 2).mean()
    return Objective(fn, (layer,), f"content({layer})")


def feature_match(layer: str, target: torch.Tensor) -> Objective:
    """Mahendran & Vedaldi's ||Phi(x) - Phi_0||^2 / ||Phi_0||^2 (feature inversion)."""
    def fn(acts, image):
        a = acts[layer].flatten(1)
        t = target.to(a).flatten(1)
        return (((a - t) ** 2).sum(1) / (t * t).sum(1).clamp_min(1e-12)).mean()
    return Objective(fn, (layer,), f"feature_match({layer})")


# ---- image priors -------------------------------------------------------------------
def l2(center: float = 0.5) -> Objective:
    """Mean squared distance of the pixels from mid-grey (Simonyan/Yosinski L2 decay)."""
    return Objective(lambda acts, x: ((x - center) ** 2).mean(), (), "l2")


def tv(beta: float = 2.0, eps: float = 1e-8) -> Objective:
    """Total variation R_{V^beta}: mean over pixels of (dx^2 + dy^2)^(beta / 2)."""
    def fn(acts, x):
        dx = x[..., :-1, 1:] - x[..., :-1, :-1]
        dy = x[..., 1:, :-1] - x[..., :-1, :-1]
        return ((dx * dx + dy * dy + eps) ** (beta / 2)).mean()
    return Objective(fn, (), f"tv(beta={beta:g})")
