"""Hooks that are always removed: the model's hook count is the same before and after."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import nn


@contextlib.contextmanager
def forward_hooks(module: nn.Module, hooks: dict[str, Callable]) -> Iterator[None]:
    """Register `hooks[name]` as forward hooks on `module.get_submodule(name)`, then remove them."""
    handles = []
    try:
        for name, fn in hooks.items():
            handles.append(module.get_submodule(name).register_forward_hook(fn))
        yield
    finally:
        for h in handles:
            h.remove()


def snapshot(out: torch.Tensor, detach: bool = True) -> torch.Tensor:
    """A hooked output that the rest of the forward pass cannot change: ResNet's blocks add
    the identity in place onto their bn2's output (`out += identity`)."""
    return (out.detach() if detach else out).clone()


@contextlib.contextmanager
def capture(module: nn.Module, layers: list[str], detach: bool = True) -> Iterator[dict[str, torch.Tensor]]:
    """Collect the outputs of `layers` during forward passes inside the block.

    The dict is filled as the model runs; with `detach=False` the tensors stay in the
    autograd graph (Grad-CAM needs that).
    """
    outputs: dict[str, torch.Tensor] = {}

    def hook_for(name: str):
        def hook(_m, _inputs, out):
            outputs[name] = snapshot(out, detach)
        return hook

    with forward_hooks(module, {name: hook_for(name) for name in layers}):
        yield outputs


def hook_count(module: nn.Module) -> int:
    """Number of hooks of every kind on `module` and its children (to check nothing leaks)."""
    total = 0
    for m in module.modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                     "_backward_pre_hooks", "_forward_hooks_with_kwargs"):
            total += len(getattr(m, attr, {}) or {})
    return total
