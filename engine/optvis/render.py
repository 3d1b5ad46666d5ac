"""The one optimisation loop every render uses, and the forward pass it differentiates.

`render(model, objective, param, ...)`: each step draws the image from the
parameterisation, applies random transforms, normalises it the model's way, runs the
network only as deep as the objective needs, and lets Adam, L-BFGS or normalised gradient
descent take a step; `project()` and optional between-step regularisers (Yosinski's blur
and clipping) follow. Seeded with one `torch.Generator`, a render is reproducible bit for
bit on one machine.

Two options change the forward pass:
- `smooth=beta` runs a copy of the network whose ReLU6 are replaced by
  softplus(x) - softplus(x - 6) with sharpness beta: gradients no longer vanish where a
  unit is off or saturated, which EfficientNet-Lite0 (all ReLU6) needs for clean renders.
- `tile=(core, overlap)` computes the gradient of an additive objective tile by tile
  (DeepDream on large images): each tile's window is its core plus `overlap` pixels of
  context, aligned to the layer's stride, and only the output cells of the core count,
  so with an overlap of at least the receptive-field radius the gradient equals the
  untiled one.
"""

from __future__ import annotations

import copy
import functools
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engine.errors import InputError
from engine.hooks import forward_hooks
from engine.models import LoadedModel
from engine.optvis.objectives import Objective
from engine.optvis.param import ImageParam, tensor_to_image
from engine.optvis.transform import Transform


class SmoothReLU6(nn.Module):
    """softplus_b(x) - softplus_b(x - 6): ReLU6 with rounded corners and non-zero gradients."""

    def __init__(self, beta: float):
        super().__init__()
        self.beta = beta

    def forward(self, x):
        return F.softplus(x, self.beta) - F.softplus(x - 6.0, self.beta)


@functools.lru_cache(maxsize=8)
def network(model: LoadedModel, smooth: float | None = None, avg_pool: bool = False) -> nn.Module:
    """The module to differentiate: the model's own, or a copy with smoothed ReLU6 / average pooling.

    Average instead of max pooling is Gatys et al.'s choice for VGG: gradients reach every
    pixel of a pooling window, not only the winner's.
    """
    if not smooth and not avg_pool:
        return model.module
    net = copy.deepcopy(model.module)
    for parent in list(net.modules()):
        for name, child in list(parent.named_children()):
            if smooth and isinstance(child, nn.ReLU6):
                setattr(parent, name, SmoothReLU6(smooth))
            elif smooth and isinstance(child, nn.ReLU):
                setattr(parent, name, nn.Softplus(smooth))
            elif avg_pool and isinstance(child, nn.MaxPool2d):
                setattr(parent, name, nn.AvgPool2d(child.kernel_size, child.stride, child.padding,
                                                   ceil_mode=child.ceil_mode))
    return net


class _Collected(Exception):
    """Raised by the last hook the objective needs: the rest of the network is not run."""


def forward_layers(model: LoadedModel, net: nn.Module, x: torch.Tensor, layers: Sequence[str]) -> dict:
    """Outputs (in the autograd graph) of `layers` (names or aliases) for normalised input x."""
    paths = {name: model.resolve(name) for name in layers}
    acts: dict[str, torch.Tensor] = {}

    def hook_for(names):
        def hook(_m, _i, out):
            for n in names:
                acts[n] = out
            if len(acts) == len(paths):
                raise _Collected
        return hook

    by_path: dict[str, list[str]] = {}
    for name, path in paths.items():
        by_path.setdefault(path, []).append(name)
    with model.lock, forward_hooks(net, {p: hook_for(ns) for p, ns in by_path.items()}):
        try:
            net(x)
        except _Collected:
            pass
    return acts


@functools.lru_cache(maxsize=64)
def layer_stride(model: LoadedModel, layer: str) -> int:
    """Input pixels per output cell of a spatial layer (measured on a 224 px probe)."""
    with torch.no_grad():
        out = forward_layers(model, model.module, torch.zeros(1, 3, 224, 224, device=model.device), [layer])[layer]
    if out.dim() != 4:
        raise InputError(f"layer {layer!r} has no spatial output; tiling needs a convolutional layer")
    return max(1, round(224 / out.shape[-1]))


def _evaluate(model, net, objective: Objective, image, x, tile) -> torch.Tensor:
    if tile is None:
        return objective(forward_layers(model, net, x, objective.layers), image)
    return _tiled_surrogate(model, net, objective, x, *tile)


def _tiles(size: int, core: int, overlap: int):
    for c0 in range(0, size, core):
        c1 = min(c0 + core, size)
        yield c0, c1, max(0, c0 - overlap), min(size, c1 + overlap)


def tiled_gradient(model: LoadedModel, net: nn.Module, objective: Objective, x: torch.Tensor,
                   core: int, overlap: int) -> tuple[float, torch.Tensor]:
    """(loss, d loss / d x) of an additive one-layer objective, computed window by window."""
    if not objective.additive or len(objective.layers) != 1:
        raise InputError("tiled gradients need an additive objective of one layer (e.g. dream)")
    layer = objective.layers[0]
    s = layer_stride(model, layer)
    core, overlap = max(s, core // s * s), -(-overlap // s) * s  # align to the stride
    x = x.detach()
    grad = torch.zeros_like(x)
    total = 0.0
    h, w = x.shape[-2:]
    for y0, y1, wy0, wy1 in _tiles(h, core, overlap):
        for x0, x1, wx0, wx1 in _tiles(w, core, overlap):
            win = x[..., wy0:wy1, wx0:wx1].clone().requires_grad_(True)
            act = forward_layers(model, net, win, [layer])[layer]
            cy0, cx0 = (y0 - wy0) // s, (x0 - wx0) // s
            cy1, cx1 = -(-(y1 - wy0) // s), -(-(x1 - wx0) // s)
            loss = objective({layer: act[..., cy0:cy1, cx0:cx1]}, win)
            (g,) = torch.autograd.grad(loss, win)
            grad[..., wy0:wy1, wx0:wx1] += g
            total += float(loss.detach())
    return total, grad


def _tiled_surrogate(model, net, objective, x, core, overlap) -> torch.Tensor:
    """A scalar whose value is the tiled loss and whose gradient w.r.t. x is the tiled gradient."""
    value, grad = tiled_gradient(model, net, objective, x, core, overlap)
    linear = (x * grad).sum()
    return linear - linear.detach() + value


class NormalizedDescent(torch.optim.Optimizer):
    """x <- x - lr * g / mean|g|: DeepDream's step, the same size whatever the layer's scale."""

    def __init__(self, params, lr: float = 0.01):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad / (p.grad.abs().mean() + 1e-8), alpha=-group["lr"])
        return loss


def make_optimizer(name: str, params: list[torch.Tensor], lr: float) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "lbfgs":  # one function evaluation per step; curvature history persists
        return torch.optim.LBFGS(params, lr=lr, max_iter=1, history_size=50)
    if name == "normalized":
        return NormalizedDescent(params, lr=lr)
    raise InputError(f"unknown optimizer {name!r}; use adam, lbfgs or normalized")


@dataclass
class RenderResult:
    images: np.ndarray  # uint8 [B, H, W, 3]
    losses: np.ndarray  # float [steps], the loss before each step
    snapshots: list[tuple[int, np.ndarray]] = field(default_factory=list)  # (step, uint8 [B, H, W, 3])
    seconds: float = 0.0

    @property
    def image(self) -> np.ndarray:
        return self.images[0]


StepHook = Callable[[ImageParam, int], None]


def render(
    model: LoadedModel,
    objective: Objective,
    param: ImageParam,
    steps: int,
    lr: float = 0.05,
    optimizer: str = "adam",
    transform: Transform | None = None,
    generator: torch.Generator | None = None,
    smooth: float | None = None,
    avg_pool: bool = False,
    tile: tuple[int, int] | None = None,
    after_step: Sequence[StepHook] = (),
    record: Sequence[int] = (),
) -> RenderResult:
    """Minimise `objective` over `param` for `steps` steps; snapshots after the steps in `record`."""
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    net = network(model, smooth, avg_pool)
    prep = model.preprocessing
    mean = torch.tensor(prep.mean).view(1, 3, 1, 1).to(model.device)
    std = torch.tensor(prep.std).view(1, 3, 1, 1).to(model.device)
    opt = make_optimizer(optimizer, param.params, lr)
    losses, snapshots = [], []
    t0 = time.perf_counter()

    def closure():
        opt.zero_grad()
        image = param()
        x = transform(image, generator) if transform is not None else image
        loss = _evaluate(model, net, objective, image, (x - mean) / std, tile)
        loss.backward()
        return loss

    for step in range(1, steps + 1):
        losses.append(float(opt.step(closure).detach()))
        param.project()
        for hook in after_step:
            hook(param, step)
        if step in record:
            snapshots.append((step, tensor_to_image(param())))
    with torch.no_grad():
        images = tensor_to_image(param())
    return RenderResult(images, np.asarray(losses), snapshots, time.perf_counter() - t0)
