"""Attribution maps for a batch: which pixels made the model score class c.

Every method takes a `LoadedModel`, a normalised batch `x` [B, 3, H, W] (on the model's
device) and the class to explain per image, `targets` [B] (see `resolve_targets`), and
returns a map [B, H, W] where larger means more important for that class:

  saliency              max over colour channels of |dS_c/dI|                (Simonyan 2014)
  guided_backprop       the same with the guided ReLU backward rule          (Springenberg 2015)
  gradcam               ReLU(sum_k alpha_k A_k), alpha = GAP of dS_c/dA, upsampled, in [0, 1]
  guided_gradcam        guided backprop x Grad-CAM, max |.| over channels    (Selvaraju 2017)
  cam                   sum_k w_ck f_k at the GAP input, upsampled (GAP nets only; Zhou 2016)
  occlusion             mean drop of p_c over the grey patches covering a pixel (Zeiler 2014)
  integrated_gradients  (x - x0) * integral of dS_c/dI on the straight path, summed over channels
  smoothgrad            mean over noisy copies of |dS_c/dI|, max over channels (Smilkov 2017)

Work is batched: gradient methods push chunks of `chunk` images (or image x step /
image x occluder pairs) through one forward/backward, never one image at a time. Hooks
live in context managers and are removed on exit, also after an exception.
"""

from __future__ import annotations

import contextlib
import math
import zlib
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engine.backprop_rules import relu_backward_rule
from engine.errors import InputError
from engine.fast import gradient_forward
from engine.hooks import forward_hooks
from engine.inference import run_model
from engine.models import LoadedModel

METHODS = ("saliency", "guided_backprop", "gradcam", "guided_gradcam", "cam", "occlusion",
           "integrated_gradients", "smoothgrad")


# ---- targets --------------------------------------------------------------------------
def parse_target(target: str | int) -> str | int:
    """`pred`, `label` or a class index (as int or decimal string); anything else is an InputError."""
    if isinstance(target, int) or (isinstance(target, str) and target.strip().isdigit()):
        index = int(target)
        if not 0 <= index < 1000:
            raise InputError(f"target class index {index} is outside 0..999")
        return index
    if target in ("pred", "label"):
        return target
    raise InputError(f"--target must be pred, label or a class index, not {target!r}")


def resolve_targets(target: str | int, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Class index per image: the prediction, the folder label (the prediction where the
    folder is not a known class, label -1), or one fixed class."""
    pred = logits.argmax(1)
    if target == "pred":
        return pred
    if target == "label":
        labels = labels.to(pred.device)
        return torch.where(labels >= 0, labels, pred)
    return torch.full_like(pred, int(target))


# ---- plumbing -------------------------------------------------------------------------
def _chunks(n: int, size: int) -> Iterator[slice]:
    for s in range(0, n, max(1, size)):
        yield slice(s, min(s + size, n))


def _gradient_module(model: LoadedModel, fast: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """x -> logits for a backward pass: the fast form (engine.fast.gradient_forward) or the
    eager module, which a backward rule patches (guided backprop) and hooks see."""
    return gradient_forward(model) if fast else model.module


def _input_gradients(model: LoadedModel, x: torch.Tensor, targets: torch.Tensor, fast: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """dS_t/dx and the logits for one chunk (the caller holds the model lock)."""
    forward = _gradient_module(model, fast)
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = forward(x)
        (grad,) = torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), x)
    return grad.contiguous(), logits.detach()


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    """The layout of a 4-d batch: channels-last (what `normalize` gives for NHWC images) or NCHW."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _gradients_along(model: LoadedModel, like: torch.Tensor, n: int, make: Callable[[torch.Tensor], torch.Tensor],
                     targets: torch.Tensor, chunk: int, reduce: Callable[[torch.Tensor, torch.Tensor], None]
                     ) -> None:
    """Gradients of `n` generated inputs (`make(idx)` builds the inputs `idx`), `chunk` at a time,
    handed to `reduce(idx, grad)`: integrated gradients and SmoothGrad never hold all of them.

    The inputs keep the memory layout of `like` (the caller's batch): oneDNN runs channels-last
    and NCHW convolutions with different kernels, and on this net their float32 input
    gradients differ by ~1e-3 (relative) with more than one thread, so a path built in
    another layout than the batch would not reproduce Captum (which keeps the layout)."""
    device, layout = targets.device, _memory_format(like)
    for sl in _chunks(n, chunk):
        idx = torch.arange(sl.start, sl.stop, device=device)
        grad, _ = _input_gradients(model, make(idx).contiguous(memory_format=layout), targets[idx])
        reduce(idx, grad)


def _upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[B, h, w] -> [B, H, W], bilinear (half-pixel centres, like cv2.resize)."""
    return F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def _minmax(maps: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Per-map (m - min) / max, as pytorch-grad-cam scales its CAMs."""
    flat = maps.flatten(1)
    flat = flat - flat.min(1, keepdim=True).values
    return (flat / (eps + flat.max(1, keepdim=True).values)).view_as(maps)


def is_gap_net(model: LoadedModel) -> bool:
    """Does the net end in global average pooling + one linear layer (what CAM needs)?"""
    gap, fc = model.layer("fc7"), model.layer("logits")
    return (isinstance(gap, nn.AdaptiveAvgPool2d) and gap.output_size in (1, (1, 1))
            and isinstance(fc, nn.Linear))


@contextlib.contextmanager
def _layer_activation(model: LoadedModel, layer: str | None, leaf: bool) -> Iterator[dict]:
    """Yield {"act": A} filled during the forward pass: the output of `layer`, or with
    `layer=None` on a GAP net, the input of the global pooling (the activation that is
    really pooled; EfficientNet's post-head ReLU6 is a shared module that cannot be hooked).

    With `leaf=True` the activation is replaced by a detached copy that requires grad, so
    a backward pass from the logits stops at A instead of running down to the pixels. The net
    goes on with a copy of A: it may change its input in place (AlexNet's ReLU(inplace=True)
    after its last conv, ResNet's `out += identity`), which A must not see.
    """
    out: dict[str, torch.Tensor] = {}

    def keep(a: torch.Tensor) -> torch.Tensor:
        out["act"] = a.detach().requires_grad_(True) if leaf else a
        return out["act"].clone()

    if layer is None and is_gap_net(model):
        gap = model.layer("fc7")

        def hook(_m, inputs, _output):
            return F.adaptive_avg_pool2d(keep(inputs[0]), gap.output_size)
        name = model.resolve("fc7")
    else:
        name = model.resolve(layer or "last_conv")

        def hook(_m, _inputs, output):
            if not isinstance(output, torch.Tensor) or output.dim() != 4:
                raise InputError(f"layer {name!r} does not output a [B, C, H, W] feature map")
            return keep(output)
    with forward_hooks(model.module, {name: hook}):
        yield out


# ---- gradient methods -----------------------------------------------------------------
def saliency(model: LoadedModel, x: torch.Tensor, targets: torch.Tensor, chunk: int = 32,
             fast: bool = False) -> torch.Tensor:
    """max_c |dS_t/dI_c| per pixel (the seeds' definition of a vanilla gradient saliency map).

    `fast=True` differentiates the folded, channels-last form of the model (engine/fast.py):
    about 1.5x faster on CPU, but folded batch norm moves the map by ~4e-4 (relative L2)
    from the eager model's, which Captum reproduces to float precision."""
    out = x.new_empty((len(x),) + x.shape[2:])
    with model.lock:
        for sl in _chunks(len(x), chunk):
            grad, _ = _input_gradients(model, x[sl], targets[sl], fast)
            out[sl] = grad.abs().amax(1)
    return out


def guided_gradients(model: LoadedModel, x: torch.Tensor, targets: torch.Tensor, chunk: int = 32) -> torch.Tensor:
    """dS_t/dI [B, 3, H, W] with the guided-backprop ReLU rule (the model is restored after)."""
    out = torch.empty_like(x)
    with model.lock, relu_backward_rule(model.module, "guided"):
        for sl in _chunks(len(x), chunk):
            out[sl], _ = _input_gradients(model, x[sl], targets[sl])
    return out


def guided_backprop(model: LoadedModel, x: torch.Tensor, targets: torch.Tensor, chunk: int = 32) -> torch.Tensor:
    return guided_gradients(model, x, targets, chunk).abs().amax(1)


def gradcam(model: LoadedModel, x: torch.Tensor, target_index: torch.Tensor, layer: str | None = None,
            chunk: int = 32) -> torch.Tensor:
    """Grad-CAM [B, H, W] in [0, 1] at `layer` (default: the activation a GAP net pools, else
    the model's `last_conv`). The backward pass runs only from the logits down to `layer`."""
    out = x.new_empty((len(x),) + x.shape[2:])
    with model.lock:
        for sl in _chunks(len(x), chunk):
            with _layer_activation(model, layer, leaf=True) as store, torch.enable_grad():
                logits = model.module(x[sl].detach())
                acts = store["act"]
                (grad,) = torch.autograd.grad(logits.gather(1, target_index[sl, None]).sum(), acts)
            weights = grad.mean((2, 3), keepdim=True)
            cams = F.relu((weights * acts.detach()).sum(1))
            out[sl] = _minmax(_upsample(cams, x.shape[2:]))
    return out


def guided_gradcam(model: LoadedModel, x: torch.Tensor, targets: torch.Tensor, layer: str | None = None,
                   chunk: int = 32) -> torch.Tensor:
    """Guided backprop gated by Grad-CAM: fine detail, but only where the class evidence is."""
    return (guided_gradients(model, x, targets, chunk) * gradcam(model, x, targets, layer, chunk)[:, None]
            ).abs().amax(1)


def cam(model: LoadedModel, x: torch.Tensor, targets: torch.Tensor, chunk: int = 32) -> torch.Tensor:
    """Class activation map sum_k w_ck f_k(x, y) from the classifier weights (no ReLU), upsampled."""
    if not is_gap_net(model):
        raise InputError(f"cam needs a net that ends in global average pooling + one linear layer; "
                         f"{model.name} does not (use gradcam)")
    weight = model.layer("logits").weight
    out = x.new_empty((len(x),) + x.shape[2:])
    with model.lock, torch.inference_mode():
        for sl in _chunks(len(x), chunk):
            with _layer_activation(model, None, leaf=False) as store:
                model.module(x[sl])
            maps = torch.einsum("bkhw,bk->bhw", store["act"], weight[targets[sl]])
            out[sl] = _upsample(maps, x.shape[2:])
    return out


IG_RULES = ("adaptive", "gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid")


def check_ig_rule(rule: str, steps: int) -> None:
    """An InputError for an unknown rule or too few steps for it."""
    if rule not in IG_RULES:
        raise InputError(f"unknown integration rule {rule!r}; choose from {', '.join(IG_RULES)}")
    if steps < (1 if rule in ("adaptive", "gausslegendre") else 2):
        raise InputError(f"integrated gradients needs more steps than {steps} with {rule}")


# Named integrated-gradients baselines besides a number (a constant after normalisation; 0 is
# the mean colour, Captum's default): the IG paper's black image, and the image blurred
# (Sturmfels et al., Distill 2020), Gaussian sigma BLUR_SIGMA x the crop side (16 px at 224).
# Completeness at 64 adaptive nodes on two samples of 10 shared images: mean colour 1/10 and
# 5/10 within 1%, black 7/10 and 7/10, blur 8/10 and 7/10 (bench/RESULTS.md).
IG_BASELINES = ("black", "blur")
BLUR_SIGMA = 16 / 224


def check_ig_baseline(baseline: float | str) -> float | str:
    """A number, or one of IG_BASELINES (as text from the command line, a number may come as a string)."""
    if isinstance(baseline, str) and baseline not in IG_BASELINES:
        try:
            baseline = float(baseline)
        except ValueError:
            raise InputError(f"unknown integrated-gradients baseline {baseline!r}: a number (after "
                             f"normalisation) or one of {', '.join(IG_BASELINES)}") from None
    if isinstance(baseline, float) and not math.isfinite(baseline):
        raise InputError(f"integrated-gradients baseline {baseline} is not a finite number")
    return baseline


def path_baseline(model: LoadedModel, x: torch.Tensor, baseline: torch.Tensor | float | str) -> torch.Tensor:
    """The baseline image of each normalised image in x, [B, 3, H, W]: a tensor or number as
    given, `black` the normalised black image, `blur` x blurred (blur and normalisation are both
    per-channel linear, so blurring the normalised image is normalising the blurred one)."""
    baseline = check_ig_baseline(baseline)
    if baseline == "black":
        zeros = torch.zeros((1, *x.shape[2:], 3), dtype=torch.uint8, device=x.device)
        return model.preprocessing.normalize(zeros).to(x.dtype).expand_as(x)
    if baseline == "blur":
        from engine.filters import gaussian_blur

        sigma = BLUR_SIGMA * min(x.shape[-2:])
        return gaussian_blur(x, sigma, radius=int(3 * sigma))
    return torch.as_tensor(baseline, dtype=x.dtype, device=x.device).expand_as(x)


def quadrature(rule: str, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Nodes alpha in [0, 1] and weights (summing to 1) of a `steps`-point rule for the path
    integral, the same for every image. Gauss-Legendre and the left/right/middle Riemann sums
    are Captum's; the trapezoid here has step 1 / (steps - 1), where Captum's weights sum to
    (steps - 1) / steps. (`adaptive` nodes depend on the image: see `adaptive_quadrature`.)"""
    check_ig_rule(rule, steps)
    if rule == "adaptive":
        raise InputError("the adaptive rule's nodes depend on the image: use adaptive_quadrature")
    if rule == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(steps)
        return 0.5 * (nodes + 1), 0.5 * weights
    if rule == "riemann_trapezoid":
        weights = np.full(steps, 1.0 / (steps - 1))
        weights[[0, -1]] /= 2
        return np.linspace(0, 1, steps), weights
    offset = {"riemann_left": 0.0, "riemann_middle": 0.5, "riemann_right": 1.0}[rule]
    return (np.arange(steps) + offset) / steps, np.full(steps, 1.0 / steps)


def probe_alphas(probes: int) -> torch.Tensor:
    """Where the adaptive rule looks at the score: (j / probes)^2, dense near the baseline,
    where the logit of this net rises and its path gradient has its narrow spikes."""
    return torch.linspace(0, 1, probes + 1, dtype=torch.float64) ** 2


def adaptive_quadrature(scores: torch.Tensor, alphas: torch.Tensor, steps: int, uniform: float = 0.2
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image nodes and weights [B, steps] from the score S_t at probe points `alphas`
    [M + 1] of the path (`scores` [B, M + 1]).

    The path is cut into `steps` cells of equal mass and each cell gets one midpoint node
    weighted by its length, so the weights are a partition of [0, 1]. A midpoint's error
    in a cell of length h is about h^2 V, V being how much the integrand dS_t/dalpha jumps
    per unit of path there; cells of length ~ V^(-1/2) make these errors equal. V is read
    off the probes as the change of slope between neighbouring probe intervals, and the
    mass is (1 - `uniform`) x that sqrt(V) density plus `uniform` x length, so every part
    of the path keeps some nodes."""
    alphas = alphas.to(device=scores.device, dtype=torch.float64)
    length = alphas.diff()
    slope = scores.to(torch.float64).diff(dim=1) / length
    jump = slope.diff(dim=1).abs()
    variation = (F.pad(jump, (1, 0)) + F.pad(jump, (0, 1))) / 2  # per probe interval
    mass = (variation / length).sqrt() * length
    mass = (1 - uniform) * mass / mass.sum(1, keepdim=True).clamp(min=1e-300) + uniform * length
    cum = torch.cat([torch.zeros_like(mass[:, :1]), mass.cumsum(1)], 1)
    cum = cum / cum[:, -1:]
    level = torch.linspace(0, 1, steps + 1, dtype=torch.float64, device=cum.device).expand(len(cum), -1).contiguous()
    j = (torch.searchsorted(cum, level, right=True) - 1).clamp(0, len(length) - 1)
    frac = ((level - cum.gather(1, j)) / (cum.gather(1, j + 1) - cum.gather(1, j))).clamp(0, 1)
    edges = alphas[j] + frac * length[j]
    edges[:, 0], edges[:, -1] = 0.0, 1.0
    return (edges[:, :-1] + edges[:, 1:]) / 2, edges.diff(dim=1)


def path_scores(model: LoadedModel, x: torch.Tensor, base: torch.Tensor, targets: torch.Tensor,
                alphas: torch.Tensor, chunk: int = 32) -> torch.Tensor:
    """S_t(base + alpha (x - base)) [B, len(alphas)] by forward passes only (the model's fast
    form), batched over (image, alpha) pairs."""
    B, P = len(x), len(alphas)
    alphas = alphas.to(device=x.device, dtype=x.dtype)
    out = torch.empty(B * P, dtype=torch.float64, device=x.device)
    for sl in _chunks(B * P, chunk):
        idx = torch.arange(sl.start, sl.stop, device=x.device)
        b, j = idx // P, idx % P
        logits, _ = run_model(model, base[b] + alphas[j].view(-1, 1, 1, 1) * (x[b] - base[b]))
        out[sl] = logits.gather(1, targets[b][:, None])[:, 0].double()
    return out.view(B, P)


def integrated_gradients(model: LoadedModel, x: torch.Tensor, targets: torch.Tensor,
                         baseline: torch.Tensor | float | str = 0.0, steps: int = 64, chunk: int = 32,
                         rule: str = "adaptive", probes: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Integrated gradients [B, 3, H, W] of the target logit on the straight path from
    `baseline` (`path_baseline`: a number, a tensor, `black` or `blur`) to x; and the
    completeness error per image,
    |sum(attr) - (S_t(x) - S_t(baseline))| / |S_t(x) - S_t(baseline)|, which the store and
    report keep for every image.

    The net is piecewise linear (ReLU6), so the integrand dS_t/dalpha is piecewise constant,
    with a few spikes (to +-900 where the whole path integral is ~10) a few thousandths of
    the path wide close to the baseline, where the logit rises. Fixed nodes miss them:
    Gauss-Legendre (Captum's rule) puts ~6 of 64 nodes in [0, 0.02]. The default
    `adaptive` rule first probes S_t at `probes` points of the path with forward passes
    only (on the model's fast form; 2 shared CPU cores: ~0.7 s per image for 64 probes
    beside ~4 s for 64 gradients, bench/ig_rules.py), then places the `steps` gradient
    nodes where S_t bends (`adaptive_quadrature`). Completeness error at 64 steps and 64
    probes, on every 25th shared image: 1/10 within 1%, median 1.7%, max 3.5%
    (Gauss-Legendre: 1/10, 3.6%, 20.8%); on every 25th from the 13th (not used to choose
    the rule): 5/10, median 0.95%, max 2.3% (Gauss-Legendre: 1/10, 5.4%, 15.1%). Fixed
    nodes graded towards the baseline, alpha = ((k + 1/2) / 64)^2, gave 2/10, median 2.6%,
    max 6.8% on the first sample. What is left looks like noise: the signed errors scatter
    around 0, and the integrand's kinks below the probes' resolution move it by a few
    percent of its size, which 64 gradients average only to ~1-3%. The error per image is
    therefore measured and stored, not assumed.

    `rule="gausslegendre"` (or a Riemann rule) with baseline 0 is Captum's: the same nodes
    for every image in Captum's (step, image) order, so equal chunks give Captum's result to
    float precision."""
    check_ig_rule(rule, steps)
    base = path_baseline(model, x, baseline)
    B = len(x)
    if rule == "adaptive":
        probe_at = probe_alphas(probes)
        nodes, weights = adaptive_quadrature(path_scores(model, x, base, targets, probe_at, chunk), probe_at, steps)
    else:
        nodes, weights = (torch.from_numpy(a).expand(B, -1) for a in quadrature(rule, steps))
    alphas = nodes.to(device=x.device, dtype=x.dtype)
    step_w = weights.to(device=x.device, dtype=x.dtype)
    total = torch.zeros_like(x)
    flat_targets = targets.repeat(steps)  # pair i = (step i // B, image i % B), Captum's order

    def make(idx):
        s, b = idx // B, idx % B
        return base[b] + alphas[b, s].view(-1, 1, 1, 1) * (x[b] - base[b])

    def reduce(idx, grad):
        s, b = idx // B, idx % B
        total.index_add_(0, b, grad * step_w[b, s].view(-1, 1, 1, 1))

    with model.lock:
        _gradients_along(model, x, B * steps, make, flat_targets, chunk, reduce)
    attr = (x - base) * total
    # the ends through the eager module, the function whose gradients were integrated
    ends, _ = run_model(model, torch.cat([x, base]), fast=False)
    scores = ends.double().gather(1, torch.cat([targets, targets])[:, None])[:, 0]
    delta = scores[:B] - scores[B:]
    error = (attr.double().sum((1, 2, 3)) - delta).abs() / delta.abs().clamp(min=1e-12)
    return attr, error.to(x.dtype)


# Completeness a refined run aims for, and the most steps it may double to. The path integral's
# error at a fixed number of nodes behaves like noise that falls with the steps (every 25th
# shared image, adaptive rule, mean-colour baseline: 1/10 within 1% at 64 steps, 9/10 at 128,
# 10/10 at 256; blurred baseline 7/10 at 64), so refining only the images over it costs
# 2.2-3.2x the 64-step pass on the default baseline, 0.74-0.80x of 256 steps everywhere.
IG_TOLERANCE = 0.01
IG_MAX_STEPS = 256


def refined_integrated_gradients(model: LoadedModel, x: torch.Tensor, targets: torch.Tensor,
                                 tolerance: float = IG_TOLERANCE, max_steps: int = IG_MAX_STEPS, steps: int = 64,
                                 probes: int = 64, baseline: torch.Tensor | float | str = 0.0, **params
                                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`integrated_gradients`, then the images whose completeness error is over `tolerance`
    integrated again with twice the steps and probes, batched, until within it or at
    `max_steps`; a refined image keeps its latest (most accurate in expectation) result, not
    the one with the smaller error. Returns attributions, errors and steps used [B]."""
    attr, error = integrated_gradients(model, x, targets, baseline, steps, probes=probes, **params)
    used = torch.full((len(x),), steps, dtype=torch.int32)
    per_image = isinstance(baseline, torch.Tensor) and baseline.dim() == x.dim() and len(baseline) == len(x)
    while 2 * steps <= max_steps:
        todo = torch.nonzero(error > tolerance)[:, 0]
        if not len(todo):
            break
        steps, probes = 2 * steps, 2 * probes
        base = baseline[todo] if per_image else baseline
        attr[todo], error[todo] = integrated_gradients(model, x[todo], targets[todo], base, steps, probes=probes,
                                                       **params)
        used[todo] = steps
    return attr, error, used


def smoothgrad(model: LoadedModel, x: torch.Tensor, targets: torch.Tensor, samples: int = 16,
               noise: float = 0.15, chunk: int = 32, seed: int = 0) -> torch.Tensor:
    """Mean |dS_t/dI| over `samples` copies of x with Gaussian noise of std `noise` x (max - min)
    of each image, then max over colour channels. Seeded per image (`smoothgrad_noise`): a
    rerun gives the same map, whatever batch or chunk the image is in."""
    sigma = noise * (x.flatten(1).amax(1) - x.flatten(1).amin(1))
    keys = [image_key(image) for image in x]
    total = torch.zeros_like(x)
    flat_targets = targets.repeat_interleave(samples)

    def make(idx):
        b = idx // samples
        eps = torch.stack([smoothgrad_noise(keys[i], s, x.shape[1:], seed) for i, s in
                           zip(b.tolist(), (idx % samples).tolist())]).to(device=x.device, dtype=x.dtype)
        return x[b] + sigma[b].view(-1, 1, 1, 1) * eps

    def reduce(idx, grad):
        total.index_add_(0, idx // samples, grad.abs())

    with model.lock:
        _gradients_along(model, x, len(x) * samples, make, flat_targets, chunk, reduce)
    return (total / samples).amax(1)


def image_key(image: torch.Tensor) -> int:
    """A number from an image's values (CRC-32 of its bytes): what seeds its SmoothGrad noise."""
    return zlib.crc32(image.detach().float().cpu().numpy().tobytes())


def smoothgrad_noise(key: int, sample: int, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """N(0, 1) noise [shape] of the `sample`-th noisy copy of the image with `image_key` key."""
    gen = torch.Generator().manual_seed(((seed * 1_000_003 + key) * 1_000_003 + sample) % 2**63)
    return torch.randn(shape, generator=gen)


# ---- perturbation -----------------------------------------------------------------------
def occluder_masks(size: int, patch: int, stride: int, device=None) -> torch.Tensor:
    """Square occluders [P, size, size] (1 = hidden) on a grid that covers the whole image."""
    if not 0 < patch <= size or not 1 <= stride <= patch:  # a stride over the patch leaves pixels unscored
        raise InputError(f"occlusion needs 0 < patch <= {size} and 1 <= stride <= patch (got patch {patch}, "
                         f"stride {stride})")
    starts = list(range(0, size - patch + 1, stride))
    if starts[-1] != size - patch:
        starts.append(size - patch)
    pos = torch.tensor(starts, device=device)
    line = (torch.arange(size, device=device)[None] >= pos[:, None]) & (
        torch.arange(size, device=device)[None] < pos[:, None] + patch)  # [n, size]
    return (line[:, None, :, None] & line[None, :, None, :]).flatten(0, 1).float()


def occlusion(model: LoadedModel, x: torch.Tensor, targets: torch.Tensor, patch: int = 32, stride: int = 16,
              baseline: float = 0.0, chunk: int = 32) -> torch.Tensor:
    """Drop of the target's probability when a `patch` square is set to `baseline` (in
    normalised units: 0 is the mean colour, grey here), averaged over the occluders that
    cover each pixel. Every (image, occluder) pair is one row of a batched forward pass."""
    H = x.shape[-1]
    masks = occluder_masks(H, patch, stride, x.device)
    P, B = len(masks), len(x)
    with torch.inference_mode():
        logits, _ = run_model(model, x)
        base_p = logits.softmax(1).gather(1, targets[:, None])[:, 0]
        drops = torch.empty(B * P, device=x.device)
        for sl in _chunks(B * P, chunk):
            idx = torch.arange(sl.start, sl.stop, device=x.device)
            b, p = idx // P, idx % P
            m = masks[p][:, None]
            occluded = x[b] * (1 - m) + baseline * m
            out, _ = run_model(model, occluded)
            drops[sl] = base_p[b] - out.softmax(1).gather(1, targets[b][:, None])[:, 0]
    heat = torch.einsum("bp,phw->bhw", drops.view(B, P), masks)
    return heat / masks.sum(0).clamp(min=1)


# ---- dispatch ---------------------------------------------------------------------------
def explain(method: str, model: LoadedModel, x: torch.Tensor, targets: torch.Tensor, chunk: int = 32,
            **params) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One method's maps [B, H, W] and its per-image extras (IG: completeness error, steps)."""
    if method == "integrated_gradients":
        attr, error, steps = refined_integrated_gradients(model, x, targets, chunk=chunk, **params)
        return attr.sum(1), {"completeness_error": error, "steps": steps}
    fns = {"saliency": saliency, "guided_backprop": guided_backprop, "gradcam": gradcam,
           "guided_gradcam": guided_gradcam, "cam": cam, "occlusion": occlusion, "smoothgrad": smoothgrad}
    if method not in fns:
        raise InputError(f"unknown explanation method {method!r}; choose from {', '.join(METHODS)}")
    return fns[method](model, x, targets, chunk=chunk, **params), {}


def parse_methods(text: str | list[str] | tuple[str, ...]) -> list[str]:
    """Comma-separated method names -> list, checked, duplicates dropped."""
    names = [m.strip() for m in (text.split(",") if isinstance(text, str) else text) if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        raise InputError(f"unknown explanation method(s) {', '.join(unknown) or '(none given)'}; "
                         f"choose from {', '.join(METHODS)}")
    return list(dict.fromkeys(names))
