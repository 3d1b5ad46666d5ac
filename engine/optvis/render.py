"""The one optimisation loop every render uses, and the forward pass it differentiates.

`render(model, objective, param, ...)`: each step draws the image from the
parameterisation, applies random transforms, normalises it the model's way, runs the
network only as deep as the objective needs, and lets Adam, L-BFGS or normalised gradient
descent take a step; `project()` and optional between-step regularisers (Yosinski's blur
and clipping) follow. Seeded with one `torch.Generator`, a render is reproducible bit for
bit on one machine.

The forward pass is the model's folded graph cut after the objective's layers
(`RenderNetwork`). Two options change it:
- `smooth=beta` gives every ReLU6 the gradient of softplus(x) - softplus(x - 6) with
  sharpness beta (and every ReLU softplus's), its forward pass unchanged: gradients no
  longer vanish where a unit is off or saturated, which EfficientNet-Lite0 (all ReLU6)
  needs for clean renders, and the network still computes the model's function. (Softplus
  in the forward pass too, at beta 2, left none of 16 top-1 predictions standing, so an
  inversion matched features the model never computes: fc7 cosine 0.58 to the target on the
  real network vs 0.95 now; feature visualisations of _blocks.15 excite the real units 2-3x
  more.)
- `tile=(core, overlap)` computes the gradient of an additive objective tile by tile
  (DeepDream on large images): each tile's window is its core plus `overlap` pixels of
  context, aligned to the layer's stride, and only the output cells of the core count,
  so with an overlap of at least the receptive-field radius the gradient equals the
  untiled one.
"""

from __future__ import annotations

import copy
import functools
import math
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import numpy as np
import torch
from torch import fx, nn

from engine.errors import InputError
from engine.fast import FastOptions, Unsupported, build_graph
from engine.hooks import forward_hooks, snapshot
from engine.models import LoadedModel
from engine.optvis.objectives import Objective
from engine.optvis.param import ImageParam, tensor_to_image
from engine.optvis.transform import Transform
from engine.truncate import cut_graph


class _SmoothGradReLU6(torch.autograd.Function):
    """ReLU6 forward; backward, the derivative of softplus_b(x) - softplus_b(x - 6). With
    u = e^(bx) and c = e^(-6b) that is u (1 - c) / ((1 + u)(1 + cu)), from one exp; x is
    clipped at 6 + 20/b, where it is 0 to float precision, so u stays finite for
    b <= MAX_BETA (two sigmoids past it)."""

    MAX_BETA = 10.0

    @staticmethod
    def forward(ctx, x, beta):
        ctx.save_for_backward(x)
        ctx.beta = beta
        return x.clamp(0.0, 6.0)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        b = ctx.beta
        if b > _SmoothGradReLU6.MAX_BETA:
            return grad * (torch.sigmoid(b * x) - torch.sigmoid(b * (x - 6.0))), None
        c = math.exp(-6.0 * b)
        u = x.clamp(max=6.0 + 20.0 / b).mul(b).exp_()
        return grad * u * (1 - c) / (u + 1).mul_(u.mul(c).add_(1)), None


class _SmoothGradReLU(torch.autograd.Function):
    """ReLU forward; backward, the derivative of softplus_b: sigmoid(bx)."""

    @staticmethod
    def forward(ctx, x, beta):
        ctx.save_for_backward(x)
        ctx.beta = beta
        return x.clamp(min=0.0)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * torch.sigmoid(ctx.beta * x), None


class SmoothReLU6(nn.Module):
    """ReLU6 whose gradient is that of softplus_b(x) - softplus_b(x - 6): the network computes
    what the model computes, and gradients still flow where a unit is off or saturated."""

    function = _SmoothGradReLU6

    def __init__(self, beta: float):
        super().__init__()
        self.beta = beta

    def forward(self, x):
        return self.function.apply(x, self.beta)


class SmoothReLU(SmoothReLU6):
    """ReLU whose gradient is softplus_b's, sigmoid(bx)."""

    function = _SmoothGradReLU


def _swap_modules(net: nn.Module, smooth: float | None, avg_pool: bool) -> nn.Module:
    """Replace (in place) ReLU6 / ReLU by their smooth-gradient forms and max pools by average pools."""
    for parent in list(net.modules()):
        for name, child in list(parent.named_children()):
            if smooth and isinstance(child, nn.ReLU6):
                setattr(parent, name, SmoothReLU6(smooth))
            elif smooth and isinstance(child, nn.ReLU):
                setattr(parent, name, SmoothReLU(smooth))
            elif avg_pool and isinstance(child, nn.MaxPool2d):
                setattr(parent, name, nn.AvgPool2d(child.kernel_size, child.stride, child.padding,
                                                   ceil_mode=child.ceil_mode))
    return net


class RenderNetwork:
    """The network a render differentiates, run only as deep as the layers asked for.

    For each set of layers, the model's folded graph (engine/fast.py: batch norm and static
    padding folded into the convolutions, channels-last), cut after those layers
    (engine/truncate.py), with the activations swapped: 1.5x faster forward+backward than
    hooks on the eager module (EfficientNet-Lite0 at 144 px, smoothed). Where a layer is no
    graph output, or NEUROCAT_FAST=0, hooks on an eager copy stop the pass at the last layer.
    """

    def __init__(self, model: LoadedModel, smooth: float | None, avg_pool: bool):
        self.model, self.smooth, self.avg_pool = model, smooth, avg_pool
        options = FastOptions.from_env()
        self.options = replace(options, fuse=False, compile=False, amp=False)
        self._graphs: dict[tuple[str, ...], fx.GraphModule | None] = {}
        self._eager: nn.Module | None = None
        self._lock = threading.Lock()

    @property
    def eager(self) -> nn.Module:
        """The model's module, or a copy with the activations and pools swapped."""
        with self._lock:
            if self._eager is None:
                changed = self.smooth or self.avg_pool
                self._eager = _swap_modules(copy.deepcopy(self.model.module), self.smooth, self.avg_pool) \
                    if changed else self.model.module
            return self._eager

    def graph(self, paths: tuple[str, ...]) -> fx.GraphModule | None:
        with self._lock:
            if paths not in self._graphs:
                self._graphs[paths] = self._build(paths)
            return self._graphs[paths]

    def _build(self, paths: tuple[str, ...]) -> fx.GraphModule | None:
        if not self.options.any:
            return None
        base = self.model.module
        if self.avg_pool:  # pools are graph leaves: swap them before tracing
            base = _swap_modules(copy.deepcopy(base), None, True)
        try:
            with torch.inference_mode(False), torch.no_grad():
                graph = cut_graph(build_graph(base, paths, self.options))
        except (Unsupported, fx.proxy.TraceError):
            return None
        _swap_modules(graph, self.smooth, False)  # build_graph made its own copy
        if self.options.channels_last:
            graph.to(memory_format=torch.channels_last)
        return graph

    def __call__(self, x: torch.Tensor, paths: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """{path: output} of the layers at `paths`, in the autograd graph."""
        graph = self.graph(paths)
        if graph is None:
            return _hooked_outputs(self.model, self.eager, x, paths)
        if self.options.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return {p: out.contiguous() for p, out in zip(paths, graph(x))}


@functools.lru_cache(maxsize=8)
def network(model: LoadedModel, smooth: float | None = None, avg_pool: bool = False) -> RenderNetwork:
    """The network to differentiate: the model, or with smoothed ReLU6 / average pooling.

    Average instead of max pooling is Gatys et al.'s choice for VGG: gradients reach every
    pixel of a pooling window, not only the winner's.
    """
    return RenderNetwork(model, smooth, avg_pool)


class _Collected(Exception):
    """Raised by the last hook the objective needs: the rest of the network is not run."""


def _hooked_outputs(model: LoadedModel, module: nn.Module, x: torch.Tensor, paths: tuple[str, ...]) -> dict:
    acts: dict[str, torch.Tensor] = {}

    def hook_for(path):
        def hook(_m, _i, out):
            acts[path] = snapshot(out, detach=False)
            if len(acts) == len(paths):
                raise _Collected
        return hook

    with model.lock, forward_hooks(module, {p: hook_for(p) for p in paths}):
        try:
            module(x)
        except _Collected:
            pass
    return acts


def forward_layers(model: LoadedModel, net: RenderNetwork | nn.Module, x: torch.Tensor,
                   layers: Sequence[str]) -> dict:
    """Outputs (in the autograd graph) of `layers` (names or aliases) for normalised input x."""
    names = {name: model.resolve(name) for name in layers}
    paths = tuple(dict.fromkeys(names.values()))
    acts = net(x, paths) if isinstance(net, RenderNetwork) else _hooked_outputs(model, net, x, paths)
    return {name: acts[path] for name, path in names.items()}


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
    settings: dict = field(default_factory=dict)  # every setting the render used, defaults resolved
    facts: dict = field(default_factory=dict)  # what came out, where the loss does not say it

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
    param.to(model.device)
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
