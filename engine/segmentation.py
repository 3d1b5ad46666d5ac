"""Foreground masks without segmentation labels: GrabCut seeded by a saliency map.

As Simonyan et al. (2014): the colour models of GrabCut are initialised from the pixels
whose saliency is above the 95% quantile (foreground) and below the 30% quantile
(background); GrabCut then labels the rest. OpenCV's GrabCut works on one image at a time
(~0.45 s at 224 px), so a batch's images run on a few threads, on CPU, after the model's
batched work is done.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import torch


def grabcut_mask(image: np.ndarray, saliency: np.ndarray, fg_quantile: float = 0.95,
                 bg_quantile: float = 0.30, iterations: int = 5, smooth: float = 2.0) -> np.ndarray:
    """bool [H, W] foreground of uint8 RGB `image` [H, W, 3] seeded by `saliency` [H, W].

    The map is lightly blurred first (raw gradients are speckled); a flat map has no seeds
    and gives an empty mask."""
    sal = np.asarray(saliency, dtype=np.float32)
    if smooth > 0:
        sal = cv2.GaussianBlur(sal, (0, 0), smooth)
    hi, mid, lo = np.quantile(sal, [fg_quantile, 0.5, bg_quantile])
    if not hi > lo:
        return np.zeros(sal.shape, dtype=bool)
    mask = np.where(sal > mid, cv2.GC_PR_FGD, cv2.GC_PR_BGD).astype(np.uint8)
    mask[sal >= hi] = cv2.GC_FGD
    mask[sal <= lo] = cv2.GC_BGD
    bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    bgr = np.ascontiguousarray(image[..., ::-1])
    cv2.setRNGSeed(0)  # GrabCut's GMM initialisation uses OpenCV's RNG: same image, same mask
    cv2.grabCut(bgr, mask, None, bgd, fgd, iterations, cv2.GC_INIT_WITH_MASK)
    return (mask == cv2.GC_FGD) | (mask == cv2.GC_PR_FGD)


def grabcut_masks(images: np.ndarray, saliency: np.ndarray, threads: int | None = None, **params) -> np.ndarray:
    """bool [B, H, W] masks of a batch (uint8 [B, H, W, 3] images, [B, H, W] maps), images
    on `threads` threads (default: torch's intra-op count, the cores this task was given):
    OpenCV releases the GIL and its RNG is per thread, so the masks are the same."""
    if len(images) == 0:
        return np.zeros((0,) + images.shape[1:3], dtype=bool)
    threads = min(len(images), threads or torch.get_num_threads())
    with ThreadPoolExecutor(threads, thread_name_prefix="grabcut") as pool:
        return np.stack(list(pool.map(lambda pair: grabcut_mask(*pair, **params), zip(images, saliency))))
