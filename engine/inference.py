"""The one place a batch goes through a model: logits plus the activations asked for."""

from __future__ import annotations

import torch

from engine.hooks import capture
from engine.models import LoadedModel


def run_model(model: LoadedModel, x: torch.Tensor, layers: list[str] | tuple[str, ...] = ()
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward `x` (normalised, on the model's device); return logits and {layer: output}.

    Layer names may be aliases (`fc7`); outputs are keyed by the name asked for. The model
    lock keeps hooked forward passes of concurrent threads apart.
    """
    resolved = {layer: model.resolve(layer) for layer in layers}
    with model.lock, torch.inference_mode(), capture(model.module, sorted(set(resolved.values()))) as acts:
        logits = model.module(x.to(model.device))
    return logits, {layer: acts[name] for layer, name in resolved.items()}
