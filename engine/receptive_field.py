"""Exact receptive fields of every layer, found by tracing the real forward pass.

A `TorchFunctionMode` follows each tensor through the model and composes, per spatial
axis, the affine map from an output position to its input box: convolutions and pools
grow it by (k - 1) * dilation * jump and multiply the jump by the stride, explicit pads
shift its start, and element-wise ops (residual adds, activations, batch norm) take the
union of their inputs' fields. Works for static "same" padding, depthwise and dilated
convs, and branches, with no per-architecture table.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from engine.hooks import forward_hooks


@dataclass(frozen=True)
class RF:
    """Output position i covers input pixels [start + i*stride, start + i*stride + size) per axis."""

    size: tuple[int, int]
    stride: tuple[int, int]
    start: tuple[int, int]
    is_global: bool = False

    def box(self, y: int, x: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(y0, x0, y1, x1), end exclusive, clipped to a height x width input."""
        if self.is_global:
            return 0, 0, height, width
        y0 = self.start[0] + y * self.stride[0]
        x0 = self.start[1] + x * self.stride[1]
        return (max(y0, 0), max(x0, 0),
                min(y0 + self.size[0], height), min(x0 + self.size[1], width))

    def union(self, other: "RF") -> "RF":
        if self.is_global or other.is_global or self.stride != other.stride:
            return GLOBAL
        start = tuple(min(a, b) for a, b in zip(self.start, other.start))
        end = tuple(max(a + sa, b + sb) for a, sa, b, sb in zip(self.start, self.size, other.start, other.size))
        return RF(tuple(e - s for e, s in zip(end, start)), self.stride, start)

    def window(self, kernel, stride, padding, dilation) -> "RF":
        if self.is_global:
            return GLOBAL
        size = tuple(s + (k - 1) * d * j for s, k, d, j in zip(self.size, kernel, dilation, self.stride))
        start = tuple(st - p * j for st, p, j in zip(self.start, padding, self.stride))
        return RF(size, tuple(j * s for j, s in zip(self.stride, stride)), start)


IDENTITY = RF((1, 1), (1, 1), (0, 0))
GLOBAL = RF((0, 0), (0, 0), (0, 0), is_global=True)


def _pair(v, default=None):
    if v is None:
        v = default
    if isinstance(v, int):
        return (v, v)
    v = tuple(v)
    return v if len(v) == 2 else (v[0], v[0])


_CONVS = {F.conv2d, torch.conv2d}
_AVG_POOLS = {F.avg_pool2d, torch._C._nn.avg_pool2d}
_POOLS = {F.max_pool2d, torch.max_pool2d, F.max_pool2d_with_indices} | _AVG_POOLS
_PADS = {F.pad, torch._C._nn.pad}


class _RFTracker(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.rf: dict[int, RF] = {}
        self._keep: list[torch.Tensor] = []  # keep tensors alive so ids are not reused

    def set(self, t, rf: RF):
        if isinstance(t, torch.Tensor):
            self.rf[id(t)] = rf
            self._keep.append(t)

    def get(self, t) -> RF | None:
        return self.rf.get(id(t)) if isinstance(t, torch.Tensor) else None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        first = args[0] if args else None
        src = self.get(first)
        if func in _CONVS and src is not None:
            weight = args[1] if len(args) > 1 else kwargs["weight"]
            stride = _pair(args[3] if len(args) > 3 else kwargs.get("stride"), 1)
            padding = args[4] if len(args) > 4 else kwargs.get("padding", 0)
            dilation = _pair(args[5] if len(args) > 5 else kwargs.get("dilation"), 1)
            kernel = tuple(weight.shape[-2:])
            if isinstance(padding, str):
                padding = (0, 0) if padding == "valid" else tuple((d * (k - 1)) // 2 for k, d in zip(kernel, dilation))
            self.set(out, src.window(kernel, stride, _pair(padding), dilation))
        elif func in _POOLS and src is not None:
            names = ("kernel_size", "stride", "padding", "dilation")
            vals = [args[i + 1] if len(args) > i + 1 else kwargs.get(n) for i, n in enumerate(names)]
            kernel = _pair(vals[0])
            stride = _pair(vals[1] or kernel)
            dilation = (1, 1) if func in _AVG_POOLS else _pair(vals[3], 1)
            self.set(out if isinstance(out, torch.Tensor) else out[0],
                     src.window(kernel, stride, _pair(vals[2], 0), dilation))
        elif func in _PADS and src is not None:
            pad = args[1] if len(args) > 1 else kwargs["pad"]
            left, right, top, bottom = (list(pad) + [0, 0, 0, 0])[:4]
            start = (src.start[0] - top * src.stride[0], src.start[1] - left * src.stride[1])
            self.set(out, GLOBAL if src.is_global else RF(src.size, src.stride, start))
        elif isinstance(out, torch.Tensor):
            self._elementwise(args, kwargs, out)
        return out

    def _elementwise(self, args, kwargs, out):
        inputs = [a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)]
        inputs += [t for a in args if isinstance(a, (list, tuple)) for t in a if isinstance(t, torch.Tensor)]
        known = [(t, self.get(t)) for t in inputs if self.get(t) is not None]
        if not known:
            return
        if out.dim() != 4:
            self.set(out, GLOBAL)
            return
        rf = None
        for t, r in known:
            if t.dim() == 4 and t.shape[-2:] == out.shape[-2:]:
                rf = r if rf is None else rf.union(r)
            elif t.dim() == 4 and t.shape[-2:] == (1, 1) and r.is_global:
                rf = GLOBAL  # e.g. squeeze-and-excitation gates
            else:
                rf = GLOBAL  # resampling or pooling we do not model: be conservative
        self.set(out, rf)


def receptive_fields(model, input_size: int | None = None) -> dict[str, RF]:
    """RF of every module's output, for a square input of `input_size` (default: the crop)."""
    size = input_size or model.preprocessing.crop
    module = model.module
    found: dict[str, RF] = {}
    tracker = _RFTracker()

    def hook_for(name):
        def hook(_m, _i, out):
            t = out if isinstance(out, torch.Tensor) else None
            rf = tracker.get(t)
            if rf is not None and name not in found:
                found[name] = rf
        return hook

    names = [n for n, _ in module.named_modules() if n]
    x = torch.zeros(1, 3, size, size, device=next(module.parameters()).device)
    # the model lock: other threads' forward passes must neither fire these hooks nor ours
    with model.lock, torch.no_grad(), forward_hooks(module, {n: hook_for(n) for n in names}):
        tracker.set(x, IDENTITY)
        with tracker:
            module(x)
    return found
