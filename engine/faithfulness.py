"""How faithful is an attribution map? Remove or add pixels in its order and watch the model.

  deletion AUC   pixels replaced by the mean colour, most important first; area under the
                 target's probability curve. Lower is better (Petsiuk et al. 2018, RISE).
  insertion AUC  pixels copied onto a blurred image, most important first; higher is better.
  ROAD           remove-and-debias (Rong et al. 2022): removed pixels are filled by noisy
                 linear imputation (each one the weighted mean of its 8 neighbours, solved
                 with the kept pixels fixed) so the removal mask itself leaks no class
                 information. MoRF = most relevant removed first (lower is better), LeRF =
                 least relevant first (higher is better); `road` = LeRF - MoRF (higher is better).

A random map scored the same way is the reference: a method that does no better than random
order should not be trusted for this model. All perturbed images of a batch (image x step)
go through the model in chunks; ranks are per image and ties go to the lower pixel index.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.filters import gaussian_blur
from engine.inference import run_model
from engine.models import LoadedModel

ROAD_FRACTIONS = (0.1, 0.3, 0.5, 0.7, 0.9)
SCORES = ("deletion", "insertion", "road_morf", "road_lerf", "road")
BETTER = {"deletion": "lower", "insertion": "higher", "road_morf": "lower", "road_lerf": "higher", "road": "higher"}


def neighbour_mean_kernel(channels: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """ROAD's weights of each pixel's 8 neighbours (direct 1/6, diagonal 1/12), as a
    depthwise conv2d weight [channels, 1, 3, 3]."""
    k = torch.tensor([[1 / 12, 1 / 6, 1 / 12], [1 / 6, 0.0, 1 / 6], [1 / 12, 1 / 6, 1 / 12]], dtype=dtype, device=device)
    return k.expand(channels, 1, 3, 3).contiguous()


def target_probs(model: LoadedModel, x: torch.Tensor, targets: torch.Tensor, chunk: int = 32) -> torch.Tensor:
    """Softmax probability of each image's target class, `chunk` images per forward pass."""
    out = []
    for s in range(0, len(x), chunk):
        logits, _ = run_model(model, x[s:s + chunk])
        out.append(logits.float().softmax(1).gather(1, targets[s:s + chunk, None].to(logits.device))[:, 0])
    return torch.cat(out) if out else x.new_zeros(0)


def pixel_ranks(maps: torch.Tensor) -> torch.Tensor:
    """Rank of every pixel [B, H, W]: 0 = most important; ties to the lower pixel index."""
    order = torch.argsort(-maps.flatten(1).float(), dim=1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return ranks.view_as(maps)


def blurred(x: torch.Tensor) -> torch.Tensor:
    """The insertion canvas: the image blurred beyond recognition (kernel 11, sigma 5, as RISE)."""
    return gaussian_blur(x, 5.0, radius=5)


def _curve(model, x, targets, ranks, fractions, fill, chunk: int) -> torch.Tensor:
    """p(target) [B, len(fractions)] of `fill(b, top, x[b])`, where `top` [n, 1, H, W] marks
    the `fraction` of pixels ranked first; rows of the batch are (fraction, image) pairs."""
    B, n = len(x), ranks[0].numel()
    total = B * len(fractions)
    out = torch.empty(total, device=x.device)
    cut = torch.tensor([round(f * n) for f in fractions], device=x.device)
    for s in range(0, total, chunk):
        idx = torch.arange(s, min(s + chunk, total), device=x.device)
        b, f = idx % B, idx // B
        top = (ranks[b] < cut[f].view(-1, 1, 1))[:, None].to(x.dtype)
        out[idx] = target_probs(model, fill(b, top, x[b]), targets[b], chunk)
    return out.view(len(fractions), B).T


def _auc(curve: torch.Tensor, fractions: torch.Tensor) -> torch.Tensor:
    return torch.trapezoid(curve, fractions, dim=1)


def deletion_insertion(model: LoadedModel, x: torch.Tensor, targets: torch.Tensor, maps: torch.Tensor,
                       steps: int = 10, chunk: int = 32, ends: dict | None = None) -> dict[str, torch.Tensor]:
    """Deletion and insertion AUC per image over `steps` equal fractions of the pixels.

    The curves' end points do not depend on the map (the image itself, the fully grey and
    the fully blurred image): pass `ends` from `curve_ends` to share them across methods."""
    ends = ends or curve_ends(model, x, targets, chunk)
    fractions = torch.linspace(0, 1, steps + 1, device=x.device)
    inner = fractions[1:-1].tolist()
    ranks = pixel_ranks(maps.to(x.device))
    canvas = ends["blurred"]
    dele = _curve(model, x, targets, ranks, inner, lambda b, top, xb: xb * (1 - top), chunk)  # grey = 0
    ins = _curve(model, x, targets, ranks, inner, lambda b, top, xb: xb * top + canvas[b] * (1 - top), chunk)
    dele = torch.cat([ends["p"][:, None], dele, ends["p_grey"][:, None]], 1)
    ins = torch.cat([ends["p_blur"][:, None], ins, ends["p"][:, None]], 1)
    return {"deletion": _auc(dele, fractions), "insertion": _auc(ins, fractions),
            "deletion_curve": dele, "insertion_curve": ins}


def curve_ends(model: LoadedModel, x: torch.Tensor, targets: torch.Tensor, chunk: int = 32) -> dict:
    """p(target) of the image, of the all-grey and of the blurred image (shared by all methods)."""
    canvas = blurred(x)
    p = target_probs(model, torch.cat([x, torch.zeros_like(x[:1]), canvas]),
                     torch.cat([targets, targets[:1], targets]), chunk)
    B = len(x)
    return {"p": p[:B], "p_grey": p[B].expand(B), "p_blur": p[B + 1:], "blurred": canvas}


def impute(x: torch.Tensor, removed: torch.Tensor, cycles: int = 2, noise: float = 0.02,
           seed: int = 0) -> torch.Tensor:
    """ROAD's noisy linear imputation, batched: removed pixels ([B, 1, H, W], 1 = removed) take
    the solution of `value = weighted mean of the 8 neighbours` with the kept pixels fixed (a
    sparse linear system ROAD's reference code solves exactly, image by image), then Gaussian
    noise of std `noise` (normalised units).

    Solved by full multigrid, then `cycles` - 1 more V(2,2)-cycles on the full grid. Plain
    Jacobi sweeps spread information only a pixel a sweep: 40 of them left the holes of
    Grad-CAM-ranked removals 0.05-0.33 (mean) from the exact solution; 3 V-cycles from a blurred
    fill 0.003-0.008, this 0.0014-0.0028 at 0.89-0.95x their time (bench/faithfulness.py;
    tests/test_explain_engine.py checks against scipy's sparse solve)."""
    x = x.contiguous(memory_format=torch.channels_last)
    levels = _hole_levels(removed, x.shape[1])
    v = _full_multigrid(x, levels)
    for _ in range(cycles - 1):
        v = _corrected(v, levels)
    gen = torch.Generator(device=x.device).manual_seed(seed)
    return v + removed * noise * torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)


def _full_multigrid(v: torch.Tensor, levels: list[_Level], depth: int = 0) -> torch.Tensor:
    """v with the holes of `levels[depth]` solved: started from the next coarser grid's
    solution of the same problem (a coarse cell fixed to the mean of its kept pixels; the
    coarsest grid from the mean of all of them), then corrected by one V-cycle."""
    level = levels[depth]
    keep = 1 - level.hole
    if depth < len(levels) - 1:
        coarse = F.avg_pool2d(v * keep, 2, ceil_mode=True) / F.avg_pool2d(keep, 2, ceil_mode=True).clamp(min=1e-6)
        coarse = _full_multigrid(coarse.contiguous(memory_format=torch.channels_last), levels, depth + 1)
        start = F.interpolate(coarse, size=v.shape[-2:], mode="bilinear", align_corners=False)
    else:
        start = (v * keep).sum((2, 3), keepdim=True) / keep.sum((2, 3), keepdim=True).clamp(min=1)
    return _corrected(torch.where(level.hole.bool(), start, v).contiguous(memory_format=torch.channels_last),
                      levels, depth)


def _corrected(v: torch.Tensor, levels: list[_Level], depth: int = 0) -> torch.Tensor:
    """v plus one V-cycle's solution for its residual on `levels[depth]`."""
    return v + _v_cycle(torch.zeros_like(v), _residual(levels[depth], v), levels, depth)


class _Level:
    """One grid of the imputation's multigrid: where the unknowns are, and the 8-neighbour
    mean's weights there (1 / the sum of the weights that fall inside the image)."""

    def __init__(self, hole: torch.Tensor, channels: int):
        self.kernel = neighbour_mean_kernel(channels, hole.dtype, hole.device)
        inverse_weight = 1 / F.conv2d(torch.ones((1, channels, *hole.shape[-2:]), dtype=hole.dtype,
                                                 device=hole.device), self.kernel, padding=1, groups=channels)
        self.hole = hole
        self.scale = (hole * inverse_weight).contiguous(memory_format=torch.channels_last)

    def neighbour_sum(self, e: torch.Tensor) -> torch.Tensor:
        return F.conv2d(e, self.kernel, padding=1, groups=e.shape[1])


def _hole_levels(removed: torch.Tensor, channels: int, smallest: int = 4) -> list[_Level]:
    """The grids, each half the previous; a coarse cell is unknown only if all four of its
    fine cells are (a cell with a kept pixel holds a zero correction)."""
    holes = [removed]
    while min(holes[-1].shape[-2:]) > smallest:
        holes.append(-F.max_pool2d(-holes[-1], 2, ceil_mode=True))
    return [_Level(h, channels) for h in holes]


def _smooth(level: _Level, e: torch.Tensor, r: torch.Tensor, sweeps: int) -> torch.Tensor:
    """Jacobi sweeps for (I - mean) e = r on the holes (e = 0 elsewhere). Undamped: for this
    stencil every high-frequency mode shrinks by at least 3x a sweep."""
    for _ in range(sweeps):
        e = torch.addcmul(r, level.scale, level.neighbour_sum(e))
    return e


def _residual(level: _Level, e: torch.Tensor, r: torch.Tensor | float = 0.0) -> torch.Tensor:
    """r - (I - mean) e on the holes: what a correction e still leaves of r (with r = 0 and the
    image v for e: mean(v) - v, how far v is from the solution's equations)."""
    return torch.addcmul(r - level.hole * e, level.scale, level.neighbour_sum(e))


def _v_cycle(e: torch.Tensor, r: torch.Tensor, levels: list[_Level], depth: int = 0, sweeps: int = 2,
             coarsest_sweeps: int = 20) -> torch.Tensor:
    """The correction e solving (I - mean) e = r on the holes of `levels[depth]`."""
    level = levels[depth]
    if depth == len(levels) - 1:
        return _smooth(level, e, r, coarsest_sweeps)
    e = _smooth(level, e, r, sweeps)
    # on a grid twice as coarse the operator is 4x larger for the same smooth function
    coarse_r = (4 * levels[depth + 1].hole * F.avg_pool2d(_residual(level, e, r), 2, ceil_mode=True)).contiguous(
        memory_format=torch.channels_last)
    coarse_e = _v_cycle(torch.zeros_like(coarse_r), coarse_r, levels, depth + 1, sweeps, coarsest_sweeps)
    e = torch.addcmul(e, level.hole, F.interpolate(coarse_e, size=e.shape[-2:], mode="bilinear", align_corners=False))
    return _smooth(level, e, r, sweeps)


def road(model: LoadedModel, x: torch.Tensor, targets: torch.Tensor, maps: torch.Tensor,
         fractions: tuple[float, ...] = ROAD_FRACTIONS, chunk: int = 32) -> dict[str, torch.Tensor]:
    """Mean p(target) over `fractions` removed by noisy linear imputation, MoRF and LeRF."""
    ranks = pixel_ranks(maps.to(x.device))
    reversed_ranks = ranks[0].numel() - 1 - ranks  # least relevant first

    def removed(b, top, xb):
        return impute(xb, top)

    morf = _curve(model, x, targets, ranks, list(fractions), removed, chunk)
    lerf = _curve(model, x, targets, reversed_ranks, list(fractions), removed, chunk)
    morf, lerf = morf.mean(1), lerf.mean(1)
    return {"road_morf": morf, "road_lerf": lerf, "road": lerf - morf}


def random_maps(shape: tuple[int, ...], seed: int = 0, device=None) -> torch.Tensor:
    """The reference ordering: uniform noise maps."""
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)).to(device)


def faithfulness(model: LoadedModel, x: torch.Tensor, targets: torch.Tensor, maps: torch.Tensor,
                 steps: int = 10, chunk: int = 32, ends: dict | None = None) -> dict[str, torch.Tensor]:
    """Every score of SCORES per image [B] for one method's maps."""
    scores = deletion_insertion(model, x, targets, maps, steps, chunk, ends)
    scores.update(road(model, x, targets, maps, chunk=chunk))
    return {k: scores[k] for k in SCORES}
