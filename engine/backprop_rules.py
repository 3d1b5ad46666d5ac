"""Modified ReLU backward rules: guided backpropagation and the Zeiler-Fergus deconvnet.

Both only change how a gradient crosses a ReLU (or ReLU6):
  plain gradient:  g_in = g_out * [x > 0]
  deconvnet:       g_in = max(g_out, 0)                 (ignores the forward pass)
  guided backprop: g_in = max(g_out, 0) * [x > 0]       (both masks)
The rule is installed by swapping each activation module's `forward` (or setting the
`relu_rule` of a conv whose ReLU is fused into it, engine.fast.FusedConv) inside a context
manager and restored on exit, even after an exception, so the model is unchanged
afterwards. In-place ReLUs (torchvision) and shared modules (EfficientNet's `_swish`)
work, since nothing is hooked.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

RULES = ("guided", "deconvnet")


def relu_gradient(grad: torch.Tensor, y: torch.Tensor, upper: float | None, rule: str | None) -> torch.Tensor:
    """The gradient entering clamp(x, 0, upper) (upper None: a ReLU) from the one leaving it,
    under `rule` (None: the plain gradient), given the output y.

    y is in (0, upper) exactly where x is, so aten's fused ReLU/ReLU6 backward kernels on y
    give the forward mask in one pass over memory (a saved boolean mask cost four passes and
    a dtype conversion: about half of a projection's time on EfficientNet-Lite0).
    """
    if rule == "deconvnet":
        return grad.clamp(min=0)
    if upper is None:
        masked = torch.ops.aten.threshold_backward(grad, y, 0)
    else:
        masked = torch.ops.aten.hardtanh_backward(grad, y, 0.0, upper)
    return masked.clamp_(min=0) if rule == "guided" else masked


class _RuleReLU(torch.autograd.Function):
    """clamp(x, 0, upper) whose backward is the rule's (it saves the output, not a mask)."""

    @staticmethod
    def forward(ctx, x, upper, rule):
        ctx.rule, ctx.upper = rule, upper
        y = x.clamp(min=0) if upper is None else x.clamp(0, upper)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return relu_gradient(grad, y, ctx.upper, ctx.rule), None, None


def _activation_bounds(m: nn.Module) -> tuple[bool, float | None]:
    if isinstance(m, nn.ReLU6):
        return True, 6.0
    if isinstance(m, nn.ReLU):
        return True, None
    if isinstance(m, nn.Hardtanh) and m.min_val == 0.0:
        return True, float(m.max_val)
    return False, None


@contextlib.contextmanager
def relu_backward_rule(module: nn.Module, rule: str) -> Iterator[nn.Module]:
    """Inside the block, backward passes through `module`'s ReLUs use `rule`."""
    if rule not in RULES:
        raise ValueError(f"unknown backward rule {rule!r}; use one of {RULES}")
    patched, fused = [], []
    try:
        for m in module.modules():
            is_relu, upper = _activation_bounds(m)
            if is_relu and "forward" not in m.__dict__:
                m.forward = (lambda x, _u=upper: _RuleReLU.apply(x, _u, rule))
                patched.append(m)
            elif getattr(m, "relu_like", False):  # a conv with its ReLU inside (engine.fast.FusedConv)
                m.relu_rule = rule
                fused.append(m)
        yield module
    finally:
        for m in patched:
            del m.forward
        for m in fused:
            m.relu_rule = None
