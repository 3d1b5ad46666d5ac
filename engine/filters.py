"""Image filters shared by the explanations and the renders."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gaussian_blur(x: torch.Tensor, sigma: float, radius: int | None = None) -> torch.Tensor:
    """Gaussian blur of [B, C, H, W] with reflected borders, as two 1-D passes: torchvision's
    `gaussian_blur` with kernel size 2 * radius + 1 (default radius round(3 sigma)), but
    2 (2r + 1) multiplications a pixel instead of (2r + 1)^2, 12x fewer at radius 15."""
    r = max(1, int(round(3 * sigma))) if radius is None else int(radius)
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=x.dtype, device=x.device) / sigma) ** 2)
    k = k / k.sum()
    C = x.shape[1]
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1).expand(C, 1, 1, -1), groups=C)
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1).expand(C, 1, -1, 1), groups=C)
