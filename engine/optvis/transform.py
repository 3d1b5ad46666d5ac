"""Random, differentiable image transforms applied before every forward pass.

Optimising an image that must keep its effect under small shifts, scalings and rotations
("transformation robustness") suppresses the adversarial high-frequency patterns that
plain gradient ascent finds. Every transform is a callable `(x [B, 3, H, W], generator)
-> x'`; the generator makes a seeded render reproducible bit for bit.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

Transform = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def _pick(options: Sequence, generator: torch.Generator):
    return options[int(torch.randint(len(options), (1,), generator=generator))]


def pad(width: int, value: float = 0.5) -> Transform:
    """Constant (mid-grey) border, so jitter and rotation do not reveal the image's edges."""
    def apply(x, generator):
        return F.pad(x, (width,) * 4, mode="constant", value=value)
    return apply


def jitter(d: int) -> Transform:
    """Random crop shrinking each side by `d` pixels in total: a shift of up to d - 1."""
    def apply(x, generator):
        dy, dx = (int(v) for v in torch.randint(d, (2,), generator=generator))
        h, w = x.shape[-2:]
        return x[..., dy:h - d + 1 + dy, dx:w - d + 1 + dx]
    return apply


def roll(max_shift: int) -> Transform:
    """Random circular shift (DeepDream's jitter): no pixel is lost, seams move every step."""
    def apply(x, generator):
        dy, dx = (int(v) - max_shift for v in torch.randint(2 * max_shift + 1, (2,), generator=generator))
        return torch.roll(x, shifts=(dy, dx), dims=(-2, -1))
    return apply


def random_scale(scales: Sequence[float]) -> Transform:
    """Bilinear rescale by a factor drawn from `scales`."""
    def apply(x, generator):
        s = _pick(scales, generator)
        h, w = x.shape[-2:]
        return F.interpolate(x, size=(max(1, round(h * s)), max(1, round(w * s))), mode="bilinear",
                             align_corners=False)
    return apply


def random_rotate(degrees: Sequence[float]) -> Transform:
    """Rotation about the centre by an angle (degrees) drawn from `degrees`."""
    def apply(x, generator):
        a = math.radians(_pick(degrees, generator))
        theta = torch.tensor([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0]],
                             dtype=x.dtype, device=x.device).expand(x.shape[0], 2, 3)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    return apply


def compose(transforms: Sequence[Transform]) -> Transform:
    def apply(x, generator):
        for t in transforms:
            x = t(x, generator)
        return x
    return apply


def standard_robustness(size: int) -> Transform:
    """Lucid's recipe (pad 12, jitter 8, scale ±10 %, rotate ±10°, jitter 4), scaled to `size`.

    The pixel amounts are for 224 px renders; smaller renders get proportionally less.
    """
    k = size / 224
    return compose([
        pad(max(1, round(12 * k))),
        jitter(max(1, round(8 * k))),
        random_scale([1 + (i - 5) / 50 for i in range(11)]),
        random_rotate(list(range(-10, 11))),
        jitter(max(1, round(4 * k))),
    ])
