"""Adversarial attacks in [0, 1] pixel space: FGSM, BIM/I-FGSM, PGD (L-inf and L2),
fooling images and a universal perturbation.

Every attack takes a `forward(x) -> logits` on pixel images `x` (float [B, 3, H, W] in
[0, 1]); `pixel_forward(model)` builds one that applies the model's own normalisation
inside, so eps and step sizes are in pixel units (4/255 = four grey levels) and every
output is a valid image. Model parameters stay frozen: gradients are taken w.r.t. the
input only (`torch.autograd.grad`), for a whole batch at once.

The update rules follow lecture 21 (seeds/003) and Madry et al.; their arithmetic is
written op for op like torchattacks 3.3, so the two agree exactly on the same inputs.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from engine.errors import InputError
from engine.fast import gradient_forward

Forward = Callable[[torch.Tensor], torch.Tensor]
NORMS = ("linf", "l2")
ATTACKS = ("fgsm", "bim", "pgd", "universal")


def pixel_forward(model, fast: bool = False) -> Forward:
    """`x` in [0, 1] -> logits of `model` (a LoadedModel), normalising like its preprocessing.

    `fast=True` differentiates the model's fast form (engine.fast.gradient_forward, what the
    jobs run: PGD 2.4x faster on CPU, input gradients within ~1e-3 of the eager module's);
    the default eager module is what torchattacks, wrapped around the same model, sees."""
    prep = model.preprocessing
    mean = torch.tensor(prep.mean, device=model.device).view(1, 3, 1, 1)
    std = torch.tensor(prep.std, device=model.device).view(1, 3, 1, 1)
    net = gradient_forward(model) if fast else model.module

    def forward(x: torch.Tensor) -> torch.Tensor:
        return net((x - mean) / std)

    return forward


def to_pixels(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float [B, 3, H, W] in [0, 1], contiguous (so are its gradients)."""
    return images_uint8.permute(0, 3, 1, 2).float().div(255.0).contiguous()


def to_uint8(x: torch.Tensor, clean: torch.Tensor | None = None) -> torch.Tensor:
    """float [B, 3, H, W] in [0, 1] -> uint8 [B, H, W, 3], rounded to the nearest grey level;
    or, given the `clean` images x was made from (on the grid), with each pixel's change
    rounded toward zero: the stored image stays inside the eps-ball the float one is in
    (nearest rounding makes an L-inf change of 0.5/255 one of 1/255, or 0.01 one of 3/255)."""
    if clean is None:
        return x.detach().mul(255.0).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()
    base = clean.detach().mul(255.0).round()
    change = x.detach().mul(255.0) - base
    levels = change.sign() * (change.abs() + 1e-4).floor()  # the 1e-4: float error of a whole level
    return (base + levels).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()


# ---- the pieces every attack is made of ---------------------------------------------------
def loss_gradient(forward: Forward, x: torch.Tensor, labels: torch.Tensor, targeted: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient of the cross-entropy w.r.t. `x` (negated when targeted: ascend towards `labels`).

    Returns (gradient, logits). Mean reduction over the batch, as torchattacks does; the
    sign and per-image L2 direction the attacks use do not depend on it.
    """
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = forward(x)
        loss = F.cross_entropy(logits, labels)
        if targeted:
            loss = -loss
        (grad,) = torch.autograd.grad(loss, x)
    return grad, logits.detach()


def _per_image_norm(t: torch.Tensor) -> torch.Tensor:
    return torch.norm(t.reshape(len(t), -1), p=2, dim=1).view(-1, 1, 1, 1)


def ascent_step(x: torch.Tensor, grad: torch.Tensor, step_size: float, norm: str) -> torch.Tensor:
    """One steepest-ascent step of length `step_size` in the given norm."""
    if norm == "linf":
        return x.detach() + step_size * grad.sign()
    return x.detach() + step_size * (grad / (_per_image_norm(grad) + 1e-10))


def clip_delta(delta: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """A perturbation shrunk into the eps-ball (L-inf: clamp each pixel; L2: rescale the image)."""
    if norm == "linf":
        return torch.clamp(delta, min=-eps, max=eps)
    return delta * torch.clamp(eps / _per_image_norm(delta), max=1.0)


def project(x_adv: torch.Tensor, x: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """Back into the eps-ball around `x`, then into the valid pixel range [0, 1]."""
    return torch.clamp(x + clip_delta(x_adv - x, eps, norm), min=0, max=1).detach()


def random_start(x: torch.Tensor, eps: float, norm: str, generator: torch.Generator | None = None
                 ) -> torch.Tensor:
    """A uniformly random point of the eps-ball around `x` (L2: random direction, radius U(0, eps))."""
    if norm == "linf":
        noise = torch.empty_like(x).uniform_(-eps, eps, generator=generator)
    else:
        noise = torch.empty_like(x).normal_(generator=generator)
        radius = torch.zeros(len(x), 1, 1, 1, device=x.device).uniform_(0, 1, generator=generator)
        noise = noise * (radius / _per_image_norm(noise) * eps)
    return torch.clamp(x + noise, min=0, max=1).detach()


# ---- attacks --------------------------------------------------------------------------------
def fgsm(forward: Forward, x: torch.Tensor, labels: torch.Tensor, eps: float, targeted: bool = False
         ) -> torch.Tensor:
    """Fast gradient sign method: one step of size eps along the sign of the loss gradient."""
    grad, _ = loss_gradient(forward, x, labels, targeted)
    return torch.clamp(x.detach() + eps * grad.sign(), min=0, max=1).detach()


def pgd(forward: Forward, x: torch.Tensor, labels: torch.Tensor, eps: float, steps: int = 10,
        step_size: float | None = None, norm: str = "linf", random_init: bool = True,
        targeted: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
    """Projected gradient descent (Madry et al.): `steps` ascent steps, each projected back
    into the eps-ball and [0, 1]; starts at a random point of the ball unless `random_init`
    is off. Default step 2.5 * eps / steps (enough to cross the ball and back)."""
    _check(eps, steps, norm)
    step_size = default_step_size("pgd", eps, steps) if step_size is None else step_size
    x = x.detach()
    adv = random_start(x, eps, norm, generator) if random_init else x.clone()
    for _ in range(steps):
        grad, _ = loss_gradient(forward, adv, labels, targeted)
        adv = project(ascent_step(adv, grad, step_size, norm), x, eps, norm)
    return adv


def bim(forward: Forward, x: torch.Tensor, labels: torch.Tensor, eps: float, steps: int | None = None,
        step_size: float | None = None, norm: str = "linf", targeted: bool = False) -> torch.Tensor:
    """Basic iterative method / I-FGSM (Kurakin et al.): PGD from the clean image, step 1/255,
    min(eps*255 + 4, 1.25 * eps*255) steps by default."""
    steps = default_steps("bim", eps) if steps is None else steps
    step_size = default_step_size("bim", eps, steps) if step_size is None else step_size
    return pgd(forward, x, labels, eps, steps, step_size, norm, random_init=False, targeted=targeted)


def default_steps(attack: str, eps: float) -> int:
    """Iterations (sweeps over the fitting images for `universal`)."""
    if attack == "fgsm":
        return 1
    if attack == "universal":
        return 5
    if attack == "bim":
        return max(1, int(np.ceil(min(eps * 255 + 4, 1.25 * eps * 255))))
    return 10


def default_step_size(attack: str, eps: float, steps: int) -> float:
    if attack == "fgsm":
        return eps
    if attack == "bim":
        return 1 / 255
    if attack == "universal":
        return eps / 10
    return 2.5 * eps / steps


def _check(eps: float, steps: int, norm: str) -> None:
    if norm not in NORMS:
        raise InputError(f"unknown norm {norm!r}; use one of {', '.join(NORMS)}")
    if not eps > 0 or steps < 1:
        raise InputError(f"eps must be > 0 and steps >= 1 (got eps={eps}, steps={steps})")


@dataclass(frozen=True)
class AttackSpec:
    """One attack configuration, fully resolved (what a run stores in its attrs)."""

    attack: str
    norm: str = "linf"
    steps: int | None = None
    step_size: float | None = None
    random_start: bool = True
    targeted: int | None = None  # target class index, None = untargeted

    def resolved(self, eps: float) -> dict:
        """The concrete parameters used at `eps`."""
        steps = self.steps if self.steps is not None else default_steps(self.attack, eps)
        step = self.step_size if self.step_size is not None else default_step_size(self.attack, eps, steps)
        if self.attack == "fgsm":
            steps, step = 1, eps
        return {"attack": self.attack, "norm": self.norm, "eps": eps, "steps": steps, "step_size": step,
                "random_start": self.random_start and self.attack == "pgd", "targeted": self.targeted}

    def run(self, forward: Forward, x: torch.Tensor, labels: torch.Tensor, eps: float,
            generator: torch.Generator | None = None) -> torch.Tensor:
        """The adversarial batch at `eps`; `labels` are true labels, or targets when targeted."""
        if self.attack == "universal":
            raise ValueError("a universal perturbation is fitted over a dataset: see universal_perturbation")
        p = self.resolved(eps)
        targeted = self.targeted is not None
        if self.attack == "fgsm" and self.norm == "linf":
            return fgsm(forward, x, labels, eps, targeted)
        return pgd(forward, x, labels, eps, p["steps"], p["step_size"], self.norm, p["random_start"],
                   targeted, generator)


# ---- fooling images and universal perturbations ------------------------------------------------
def noise_images(n: int, size: int = 224, generator: torch.Generator | None = None) -> torch.Tensor:
    """Grey images with mild Gaussian noise: the start of fooling images 'from nothing'."""
    return torch.clamp(0.5 + 0.1 * torch.randn(n, 3, size, size, generator=generator), 0, 1)


def fooling_images(forward: Forward, start: torch.Tensor, targets: torch.Tensor, step_size: float = 1 / 255,
                   max_steps: int = 100, confidence: float = 0.9, eps: float | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[float]]:
    """Gradient ascent on log p(target) from `start` (noise or real images) until the model
    gives every image's target class at least `confidence` (seeds/002: "stop when the
    network is fooled"); each image stops on its own. `eps` bounds the L-inf distance to
    `start` (None: anywhere in [0, 1]).

    Returns (images, steps each image took, final target probability, the mean -log p(target)
    before each step).
    """
    start = start.detach()
    adv = start.clone()
    taken = torch.zeros(len(start), dtype=torch.int64)
    losses = []
    for step in range(max_steps + 1):
        grad, logits = loss_gradient(forward, adv, targets, targeted=True)
        log_prob = logits.log_softmax(1).gather(1, targets.view(-1, 1)).squeeze(1)
        losses.append(float(-log_prob.mean()))
        prob = log_prob.exp()
        active = prob < confidence
        if step == max_steps or not active.any():
            break
        moved = ascent_step(adv, grad, step_size, "linf")
        moved = project(moved, start, eps, "linf") if eps is not None else moved.clamp(0, 1)
        adv = torch.where(active.view(-1, 1, 1, 1), moved, adv)
        taken += active.cpu()
    return adv.detach(), taken, prob.detach().cpu(), losses


@dataclass
class FoolingOptions:
    size: int = 224  # of the noise start; an image start keeps its own size
    steps: int = 100  # at most: the ascent stops once the model is fooled
    lr: float = 1 / 255  # the L-inf step: each pixel moves one grey level a step
    confidence: float = 0.9
    eps: float | None = None  # L-inf bound on the change of an image start (None: none)
    seed: int = 0


def fooling_render(model, class_index: int, image: np.ndarray | None, opts: FoolingOptions = FoolingOptions()):
    """A fooling image as a render: from `image` (uint8 [H, W, 3]) or from grey noise, stepped
    until the model reads `class_index` with `opts.confidence` (`fooling_images`). The facts
    are those of the stored uint8 image, what a user gets: its target probability and top class."""
    from engine.optvis.render import RenderResult

    g = torch.Generator().manual_seed(opts.seed)
    start = (noise_images(1, opts.size, g) if image is None else to_pixels(torch.from_numpy(image)[None]))
    start = start.to(model.device)
    target = torch.tensor([class_index], device=model.device)
    forward = pixel_forward(model, fast=True)
    t0 = time.perf_counter()
    with model.lock:  # other threads' hooks must not fire inside our forward passes
        adv, taken, _, losses = fooling_images(forward, start, target, opts.lr, opts.steps, opts.confidence,
                                               opts.eps)
        stored = to_uint8(adv, start if image is not None else None)
        pixels = to_pixels(stored)
        with torch.no_grad():
            probs = forward(pixels.to(model.device)).softmax(1)[0]
    result = RenderResult(images=stored.numpy(), losses=np.asarray(losses), seconds=time.perf_counter() - t0)
    result.settings = {"class_index": int(class_index), "start": "noise" if image is None else "image",
                       **asdict(opts)}
    result.facts = {"steps_taken": int(taken[0]), "target_probability": round(float(probs[class_index]), 4),
                    "top_class": int(probs.argmax()),
                    "linf_change": round(float((pixels - start.cpu()).abs().max()), 4) if image is not None else None}
    return result


def universal_perturbation(forward: Forward, batches: Sequence[torch.Tensor], eps: float, norm: str = "linf",
                           step_size: float | None = None, epochs: int = 5, target_rate: float = 0.8
                           ) -> tuple[torch.Tensor, list[float]]:
    """One perturbation delta [3, H, W] that changes the prediction of many images (the
    simple iterative version of Moosavi-Dezfooli et al., seeds/003 §21.7.2): sweep the
    dataset; on each batch, step delta up the loss of the images it does not fool yet
    (their clean predictions as labels), project into the eps-ball; stop once the
    fooling rate of a sweep reaches `target_rate`. Returns (delta, fooling rate per sweep).
    """
    _check(eps, epochs, norm)
    step_size = default_step_size("universal", eps, epochs) if step_size is None else step_size
    with torch.no_grad():
        clean = [forward(x).argmax(1) for x in batches]
    delta = torch.zeros_like(batches[0][:1])
    rates: list[float] = []
    for _ in range(epochs):
        fooled = 0
        for x, y in zip(batches, clean):
            d = delta.detach().requires_grad_(True)
            with torch.enable_grad():
                logits = forward(torch.clamp(x + d, 0, 1))
                alive = logits.argmax(1) == y
                fooled += int((~alive).sum())
                if not alive.any():
                    continue
                loss = F.cross_entropy(logits[alive], y[alive], reduction="sum")
                (grad,) = torch.autograd.grad(loss, d)
            delta = clip_delta(ascent_step(d, grad, step_size, norm), eps, norm)
        rates.append(fooled / sum(len(x) for x in batches))
        if rates[-1] >= target_rate:
            break
    return delta.detach()[0], rates


# ---- measuring and showing perturbations ------------------------------------------------------
def perturbation_norms(adv_uint8: np.ndarray, clean_uint8: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-image L-inf and L2 norms of adv - clean, in [0, 1] pixel units."""
    d = (adv_uint8.astype(np.float32) - clean_uint8.astype(np.float32)).reshape(len(adv_uint8), -1) / 255.0
    if not len(d):
        return np.zeros(0, np.float32), np.zeros(0, np.float32)
    return np.abs(d).max(axis=1), np.sqrt((d ** 2).sum(axis=1))


def amplification(eps: float, norm: str) -> float:
    """Gain that maps the largest possible L-inf perturbation to +-127 grey levels."""
    peak = eps if norm == "linf" else min(1.0, eps)
    return 127.0 / (peak * 255.0)


def amplified(adv_uint8: np.ndarray, clean_uint8: np.ndarray, gain: float) -> np.ndarray:
    """Perturbation made visible: 128 + gain * (adv - clean), clipped to uint8."""
    d = adv_uint8.astype(np.float32) - clean_uint8.astype(np.float32)
    return np.clip(np.round(128.0 + gain * d), 0, 255).astype(np.uint8)


# ---- parsing ------------------------------------------------------------------------------------
def parse_eps(text: str | float) -> float:
    """'4/255', '0.5', 0.03 -> a positive float; anything else is an InputError."""
    num, _, den = str(text).partition("/")
    try:
        value = float(num) / float(den) if den else float(num)
    except (ValueError, ZeroDivisionError):
        raise InputError(f"bad eps {text!r}: use a number or a fraction like 4/255") from None
    if not np.isfinite(value) or value <= 0:
        raise InputError(f"bad eps {text!r}: it must be a positive number")
    return value


def parse_eps_list(text: str | Iterable, norm: str | None = None) -> list[float]:
    """The eps values, increasing and without repeats (a robustness curve's x axis). An L-inf
    eps is a change of a [0, 1] pixel: over 1 it is a grey-level count typed without /255."""
    items = [t for t in str(text).split(",") if t.strip()] if isinstance(text, str) else list(text)
    if not items:
        raise InputError("no eps given: use e.g. --eps 1/255,2/255,4/255")
    values = [parse_eps(t) for t in items]
    if norm == "linf" and max(values) > 1:
        big = next(t for t, v in zip(items, values) if v > 1)
        raise InputError(f"L-inf eps {str(big).strip()} is over 1: eps is in [0, 1] pixel units (did you mean "
                         f"{str(big).strip()}/255?)")
    return sorted(set(values))


def eps_label(eps: float, norm: str) -> str:
    """How an eps reads in reports: '4/255' for L-inf (grey levels), '0.5' for L2."""
    return f"{round(eps * 255, 4):g}/255" if norm == "linf" else f"{round(eps, 6):g}"


def eps_key(eps: float, norm: str) -> str:
    """A store-safe name for one eps: '4_255' for L-inf, '0p5' for L2."""
    return eps_label(eps, norm).replace("/", "_").replace(".", "p")


def parse_class(text: str | int, classes) -> int:
    """A target class given as index ('954'), WordNet id ('n07753592') or name ('banana')."""
    value = str(text).strip()
    if value.isdigit() and int(value) < len(classes):
        return int(value)
    if value in classes.index_of:
        return classes.index_of[value]
    lowered = [n.lower() for n in classes.names]
    if value.lower() in lowered:
        return lowered.index(value.lower())
    raise InputError(f"unknown target class {value!r}: give an index 0..{len(classes) - 1}, a WordNet id or a class name")
