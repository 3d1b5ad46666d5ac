"""The one place a batch goes through a model: logits plus the activations asked for."""

from __future__ import annotations

import torch

from engine.fast import FastOptions, fast_module
from engine.models import LoadedModel
from engine.truncate import upto_module


def run_model(model: LoadedModel, x: torch.Tensor, layers: list[str] | tuple[str, ...] = (),
              fast: FastOptions | bool | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward `x` (normalised, on the model's device); return logits and {layer: output}.

    Layer names may be aliases (`fc7`); outputs are keyed by the name asked for. The batch
    runs through the model's fast form (engine/fast.py: folded, channels-last, compiled when
    it pays; `NEUROCAT_FAST=0` or `fast=False` gives plain eager), with the same results
    within 1e-3. The model lock keeps concurrent threads' passes apart.
    """
    resolved = {layer: model.resolve(layer) for layer in layers}
    options = FastOptions.off() if fast is False else (fast if isinstance(fast, FastOptions) else None)
    fm = fast_module(model, tuple(sorted(set(resolved.values()))), options=options)
    with model.lock, torch.inference_mode():
        logits, acts = fm(x)
    return logits, {layer: acts[name] for layer, name in resolved.items()}


def run_layers(model: LoadedModel, x: torch.Tensor, layers: list[str] | tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Forward `x` only as far as the deepest of `layers`; return {layer: output}, no logits.

    The same activations as `run_model`, bit for bit (the same fast form, cut after the
    layers: engine/truncate.py), without computing the rest of the network.
    """
    resolved = {layer: model.resolve(layer) for layer in layers}
    um = upto_module(model, tuple(sorted(set(resolved.values()))))
    with model.lock, torch.inference_mode():
        acts = um(x)
    return {layer: acts[name] for layer, name in resolved.items()}


def pooled(activation: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, C] by global average; [B, C, 1, 1] or [B, D] -> [B, D].

    The definition of `/features/<layer>` for spatial layers."""
    if activation.dim() == 4:
        return activation.mean(dim=(2, 3))
    return activation.flatten(1)
