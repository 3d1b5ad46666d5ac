"""Image parameterisations: what the optimiser actually changes.

A parameterisation owns some tensors (`.params`) and maps them to an RGB image batch in
[0, 1], float [B, 3, H, W] (`param()`). Feature visualisation works far better in a
decorrelated space (Olah et al., "Feature Visualization", 2017): a Fourier spectrum scaled
by 1/f (so every frequency moves at the same rate) and colours in a decorrelated basis
squashed by a sigmoid. Photos being edited (DeepDream, style transfer) use plain pixels,
kept in range by `project()` after every step.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

# Square root of the ImageNet colour covariance (columns: decorrelated -> RGB), the
# constant the Lucid papers publish; normalised so the largest column has unit norm.
_COLOR_SQRT_COV = np.array([[0.26, 0.09, 0.02],
                            [0.27, 0.00, -0.05],
                            [0.27, -0.09, 0.03]], dtype=np.float32)
COLOR_DECORRELATION = torch.from_numpy(_COLOR_SQRT_COV / np.linalg.norm(_COLOR_SQRT_COV, axis=0).max())


def decorrelated_to_rgb(x: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] in the decorrelated colour basis -> RGB (still unbounded)."""
    return torch.einsum("ij,bjhw->bihw", COLOR_DECORRELATION.to(x), x)


class ImageParam:
    """Base: tensors to optimise and the map from them to an image in [0, 1]."""

    params: list[torch.Tensor]

    def __call__(self) -> torch.Tensor:
        raise NotImplementedError

    def project(self) -> None:
        """Bring the parameters back into their valid set after an optimiser step."""

    def to(self, device) -> "ImageParam":
        """The parameters (and constants) moved to `device`, as fresh leaves to optimise."""
        for name, value in list(vars(self).items()):
            if isinstance(value, torch.Tensor):
                moved = value.detach().to(device)
                setattr(self, name, moved.requires_grad_(True) if value.requires_grad else moved)
        self.params = [getattr(self, name) for name, value in vars(self).items()
                       if isinstance(value, torch.Tensor) and value.requires_grad]
        return self


class PixelParam(ImageParam):
    """The pixels themselves, in [0, 1]; `project()` clamps them after every step.

    `init` (float [B, 3, H, W] in [0, 1]) starts from a photo (content image, dream base);
    without it, uniform noise around mid-grey drawn from `generator`.
    """

    def __init__(self, init: torch.Tensor | None = None, shape: tuple[int, int, int, int] | None = None,
                 noise: float = 0.1, generator: torch.Generator | None = None):
        if init is None:
            if shape is None:
                raise ValueError("PixelParam needs init or shape")
            init = 0.5 + noise * (2 * torch.rand(shape, generator=generator) - 1)
        self.pixels = init.detach().float().contiguous().clone().requires_grad_(True)
        self.params = [self.pixels]

    def __call__(self) -> torch.Tensor:
        return self.pixels

    def project(self) -> None:
        with torch.no_grad():
            self.pixels.clamp_(0.0, 1.0)


class FourierParam(ImageParam):
    """A real-FFT spectrum per colour channel, scaled by 1/f^decay, decorrelated colours, sigmoid.

    Low frequencies get large steps and high ones small, which removes the high-frequency
    noise plain pixel ascent produces; the sigmoid keeps every value in (0, 1).
    """

    def __init__(self, shape: tuple[int, int, int, int], sd: float = 0.01, decay_power: float = 1.0,
                 decorrelate: bool = True, generator: torch.Generator | None = None):
        b, c, h, w = shape
        fy = torch.fft.fftfreq(h)[:, None]
        fx = torch.fft.rfftfreq(w)[None, :]
        freqs = torch.sqrt(fx * fx + fy * fy)
        self.scale = 1.0 / torch.clamp(freqs, min=1.0 / max(h, w)) ** decay_power
        self.size = (h, w)
        self.decorrelate = decorrelate
        self.spectrum = (sd * torch.randn((b, c, *freqs.shape, 2), generator=generator)).requires_grad_(True)
        self.params = [self.spectrum]

    def __call__(self) -> torch.Tensor:
        spec = torch.view_as_complex(self.spectrum) * self.scale
        x = torch.fft.irfft2(spec, s=self.size, norm="ortho") / 4.0
        if self.decorrelate:
            x = decorrelated_to_rgb(x)
        return torch.sigmoid(x)


def image_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] or [B, H, W, 3] -> float [B, 3, H, W] in [0, 1]."""
    a = np.asarray(images)
    if a.ndim == 3:
        a = a[None]
    return torch.from_numpy(np.array(a, dtype=np.uint8)).permute(0, 3, 1, 2).float().div(255.0)


def tensor_to_image(x: torch.Tensor) -> np.ndarray:
    """float [B, 3, H, W] in [0, 1] -> uint8 [B, H, W, 3] (rounded, clipped)."""
    a = x.detach().clamp(0, 1).mul(255.0).round().to(torch.uint8).permute(0, 2, 3, 1)
    return a.cpu().numpy()


def resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of [B, 3, H, W] with antialiasing when shrinking."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False,
                         antialias=size[0] < x.shape[-2] or size[1] < x.shape[-1])
