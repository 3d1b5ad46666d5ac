"""The model's fast form cut after its deepest requested layer: activations, no logits.

A neuron catalogue needs some layers' outputs, never the logits, so every layer after the
deepest one is wasted work (for EfficientNet-Lite0's `_blocks.5`, most of the network's
depth). This builds on the fast form of engine/fast.py: its FX graph is copied with the
output replaced by the requested layers' nodes, and dead code removed, so the activations
are the same numbers as `run_model` gives, bit for bit, from fewer operations (the fused
inference graph, or the folded one for gradients). Cut graphs are never compiled: with
NEUROCAT_FAST_COMPILE they differ from `run_model`'s compiled output by rounding (~1e-6).
Where the fast path falls back to hooks on the eager module, a forward hook stops the pass by
raising once every requested layer has been seen.
"""

from __future__ import annotations

import threading
import weakref
from typing import Callable

import torch
from torch import fx

from engine.fast import FastModel, fast_module
from engine.hooks import forward_hooks, snapshot
from engine.models import LoadedModel

Activations = dict[str, torch.Tensor]


class _AllSeen(Exception):
    """Raised by the last hook of an eager pass: the rest of the network need not run."""


def cut_graph(graph: fx.GraphModule) -> fx.GraphModule:
    """A copy of a fast graph (returning `(logits, *layers)`) that returns `layers` only and
    computes nothing they do not depend on (submodules and parameters are shared)."""
    out = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    output = None
    for node in graph.graph.nodes:
        if node.op == "output":
            output = node
            break
        env[node] = out.node_copy(node, lambda n: env[n])
    _, *layers = output.args[0]
    out.output(tuple(env[n] for n in layers))
    cut = fx.GraphModule(graph, out)
    cut.graph.eliminate_dead_code()
    cut.recompile()
    return cut


class UptoModel:
    """`um(x) -> {layer: activation}`, running the model only as far as it must."""

    def __init__(self, fm: FastModel):
        self.fm = fm
        self.graph = cut_graph(fm.graph) if fm.graph is not None else None

    @property
    def module(self) -> torch.nn.Module:
        """The module whose ReLUs run (to swap backward rules on): the cut graph, or the eager model."""
        return self.graph if self.graph is not None else self.fm.model.module

    def __call__(self, x: torch.Tensor) -> Activations:
        fm = self.fm
        x = x.to(fm.model.device)
        if self.graph is None:
            return self._eager(x)
        if fm.options.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        outputs = self.graph(x)
        if not fm.for_grad:
            outputs = [o.contiguous() for o in outputs]
        return dict(zip(fm.layers, outputs))

    def _eager(self, x: torch.Tensor) -> Activations:
        acts: Activations = {}
        wanted = set(self.fm.layers)

        def hook_for(name: str) -> Callable:
            def hook(_m, _i, out):
                acts[name] = snapshot(out, detach=not self.fm.for_grad)
                if wanted <= acts.keys():
                    raise _AllSeen
            return hook

        try:
            with forward_hooks(self.fm.model.module, {name: hook_for(name) for name in wanted}):
                self.fm.model.module(x)
        except _AllSeen:
            pass
        return {name: acts[name] for name in self.fm.layers}


_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def upto_module(model: LoadedModel, layers: tuple[str, ...] | list[str], *, for_grad: bool = False) -> UptoModel:
    """The fast form of `model` cut after `layers` (resolved names), one per fast form."""
    fm = fast_module(model, tuple(layers), for_grad=for_grad)
    with _LOCK:
        if fm not in _CACHE:
            _CACHE[fm] = UptoModel(fm)
        return _CACHE[fm]
