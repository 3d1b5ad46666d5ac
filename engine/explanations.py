"""One batch of images -> every requested explanation, its faithfulness scores and a mask.

This is what a shard of `neurocat explain` does per batch, kept free of Prefect and of
storage so it can be tested on its own. Maps come back normalised per image to a maximum
|value| of 1 (their order, which is all faithfulness and the overlays use, is unchanged),
so float16 keeps their precision.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from engine import attribution, faithfulness
from engine.models import LoadedModel
from engine.segmentation import grabcut_masks

REFERENCE = "random"  # faithfulness of a random ordering, the bar every method must clear
IMAGE_SIDE = 112  # side of the image copy stored for overlays


@dataclass
class BatchExplanation:
    targets: np.ndarray  # int64 [B]
    probs: np.ndarray  # float32 [B], p(target)
    maps: dict[str, np.ndarray] = field(default_factory=dict)  # float16 [B, H, W] per method
    scores: dict[str, np.ndarray] = field(default_factory=dict)  # float32 [B, len(SCORES)] per method + REFERENCE
    extras: dict[str, np.ndarray] = field(default_factory=dict)  # e.g. IG completeness error [B]
    mask: np.ndarray | None = None  # uint8 [B, H, W], 1 = foreground
    images: np.ndarray | None = None  # uint8 [B, IMAGE_SIDE, IMAGE_SIDE, 3]


def normalise(maps: torch.Tensor) -> torch.Tensor:
    """Divide each map by its max |value| (an all-zero map stays zero)."""
    scale = maps.flatten(1).abs().amax(1).clamp(min=1e-30)
    return maps / scale.view(-1, *([1] * (maps.dim() - 1)))


def small_images(images_uint8: torch.Tensor, side: int = IMAGE_SIDE) -> np.ndarray:
    """uint8 [B, H, W, 3] -> uint8 [B, side, side, 3] by area averaging."""
    x = images_uint8.permute(0, 3, 1, 2).float()
    return F.interpolate(x, size=(side, side), mode="area").round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()


def _guided_gradcam_parts(raw: dict[str, torch.Tensor], params: dict[str, dict]) -> bool:
    """Whether guided Grad-CAM can be the product of the batch's guided-backprop and Grad-CAM
    maps: max_c |g_c * cam| = cam * max_c |g_c| for cam >= 0, bit for bit (float rounding is
    monotone and exact in sign), so a run of all three computes each gradient once."""
    return ("guided_backprop" in raw and "gradcam" in raw
            and params.get("guided_gradcam", {}).get("layer") == params.get("gradcam", {}).get("layer"))


def explain_batch(model: LoadedModel, images_uint8: torch.Tensor, labels, methods: list[str],
                  target: str | int = "pred", params: dict[str, dict] | None = None, steps: int = 10,
                  segment_with: str | None = None, chunk: int = 32) -> BatchExplanation:
    """Maps of `methods` for one batch, with faithfulness scores (`steps` = 0 skips them)
    and a GrabCut mask seeded by the map of `segment_with` (None: no mask). `labels` [B] are
    class indices of the folder labels, -1 where unknown."""
    params = params or {}
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    x = model.preprocessing.normalize(images_uint8.to(model.device))
    with torch.inference_mode():
        logits, _ = attribution.run_model(model, x)
    targets = attribution.resolve_targets(target, logits, labels)
    out = BatchExplanation(targets=targets.cpu().numpy(),
                           probs=logits.float().softmax(1).gather(1, targets[:, None])[:, 0].cpu().numpy(),
                           images=small_images(images_uint8.cpu()))
    ends = faithfulness.curve_ends(model, x, targets, chunk) if steps else None
    raw: dict[str, torch.Tensor] = {}
    for method in sorted(methods, key=lambda m: m == "guided_gradcam"):  # after the two maps it is made of
        if method == "guided_gradcam" and _guided_gradcam_parts(raw, params):
            maps, extra = raw["guided_backprop"] * raw["gradcam"], {}
        else:
            maps, extra = attribution.explain(method, model, x, targets, chunk=chunk, **params.get(method, {}))
        raw[method] = maps.detach().float()
        out.maps[method] = normalise(raw[method]).cpu().numpy().astype(np.float16)
        out.extras.update({f"{method}/{k}": v.detach().cpu().numpy().astype(np.float32) for k, v in extra.items()})
    if steps:
        reference = faithfulness.random_maps(tuple(x.shape[:1] + x.shape[2:]), device=x.device)
        for name, maps in [*raw.items(), (REFERENCE, reference)]:
            scores = faithfulness.faithfulness(model, x, targets, maps, steps, chunk, ends)
            out.scores[name] = torch.stack([scores[k] for k in faithfulness.SCORES], 1).cpu().numpy().astype(np.float32)
    if segment_with is not None:
        seed_map = raw[segment_with].clamp(min=0).cpu().numpy()
        out.mask = grabcut_masks(images_uint8.cpu().numpy(), seed_map).astype(np.uint8)
    return out
