"""Attacks of engine/attacks.py on the shipped model and the shared images.

Checked against the definitions (FGSM = one PGD step, eps-ball and pixel range) and against
an independent implementation (torchattacks 3.3) on the same images and seeds.
"""

import numpy as np
import pytest
import torch
import torchattacks
from torch import nn

from engine.attacks import (bim, fgsm, fooling_images, noise_images, parse_eps_list, pgd, pixel_forward,
                            to_pixels, to_uint8, universal_perturbation)
from engine.errors import InputError
from engine.images import list_images, load_preprocessed

EPS = 4 / 255


def load(model, root, entries):
    images = np.stack([load_preprocessed(root / e.path, model.preprocessing) for e in entries])
    labels = torch.tensor([model.classes.index_of[e.label] for e in entries])
    return to_pixels(torch.from_numpy(images)), labels


@pytest.fixture(scope="module")
def batch(model, shared_images):
    """12 shared images spread over the 250 classes, in [0, 1], with their labels (the whole
    set runs in the slow tests: one PGD-10 batch costs 10 forward-backward passes)."""
    return load(model, shared_images, list_images(shared_images)[::21])


@pytest.fixture(scope="module")
def forward(model):
    return pixel_forward(model)


@pytest.fixture(scope="module")
def pgd10(batch, forward):
    x, y = batch
    return pgd(forward, x, y, EPS, steps=10, generator=torch.Generator().manual_seed(0))


def predict(forward, x):
    with torch.no_grad():
        return forward(x).argmax(1)


def test_fgsm_is_one_pgd_step_without_random_start(batch, forward, model):
    x, y = batch[0][:2], batch[1][:2]
    a = fgsm(forward, x, y, EPS)
    b = pgd(forward, x, y, EPS, steps=1, step_size=EPS, random_init=False)
    assert torch.equal(a, b)
    moved = (a - x).abs()
    inside = (x > EPS) & (x < 1 - EPS)  # pixels that clipping to [0, 1] cannot touch
    assert torch.allclose(moved[inside], torch.full_like(moved[inside], EPS), atol=1e-6)
    assert all(not p.requires_grad and p.grad is None for p in model.module.parameters())


def test_pgd_stays_in_eps_ball_and_pixel_range(batch, forward, pgd10):
    x, y = batch
    assert (pgd10 - x).abs().max() <= EPS + 1e-6
    assert pgd10.min() >= 0 and pgd10.max() <= 1
    assert ((pgd10 - x).abs() > EPS / 2).float().mean() > 0.5  # it used the budget
    q = to_pixels(to_uint8(pgd10, x))  # the stored uint8 image stays in the ball too
    assert (q - x).abs().max() <= EPS + 1e-6
    for eps, norm in [(0.5 / 255, "linf"), (0.01, "linf"), (0.5, "l2")]:  # budgets between grey levels
        adv = pgd(forward, x[:4], y[:4], eps, steps=2, norm=norm, generator=torch.Generator().manual_seed(1))
        stored = to_pixels(to_uint8(adv, x[:4])) - x[:4]
        size = stored.abs().flatten(1).amax(1) if norm == "linf" else stored.flatten(1).norm(dim=1)
        assert (size <= eps + 1e-6).all(), (eps, norm, size)
        assert (stored * (adv - x[:4]) >= 0).all() and (stored.abs() <= (adv - x[:4]).abs() + 1e-6).all()
    l2 = pgd(forward, x[:4], y[:4], 0.5, steps=2, norm="l2", generator=torch.Generator().manual_seed(1))
    norms = (l2 - x[:4]).flatten(1).norm(dim=1)
    assert (norms <= 0.5 + 1e-4).all() and (norms > 0.25).all()
    assert l2.min() >= 0 and l2.max() <= 1


def test_pgd10_at_4_over_255_drops_accuracy_below_10_percent(batch, forward, pgd10):
    x, y = batch
    assert (predict(forward, x) == y).float().mean() >= 0.8
    assert (predict(forward, pgd10) == y).float().mean() < 0.1
    assert (predict(forward, to_pixels(to_uint8(pgd10))) == y).float().mean() < 0.1


def test_the_jobs_fast_form_attacks_like_the_eager_model(batch, forward, model, pgd10):
    """What the jobs run (folded, fused, channels-last) against the eager module: the input
    gradients agree closely, so FGSM moves nearly every pixel the same way (a sign can flip only
    where the gradient is ~0), and PGD-10 fools it as well."""
    from engine.attacks import loss_gradient

    fast = pixel_forward(model, fast=True)
    x, y = batch
    g_fast, g_eager = loss_gradient(fast, x, y)[0], loss_gradient(forward, x, y)[0]
    assert float((g_fast - g_eager).norm() / g_eager.norm()) < 1e-2
    same = (fgsm(fast, x, y, EPS) == fgsm(forward, x, y, EPS)).float().mean()
    assert same > 0.99, float(same)
    adv = pgd(fast, x, y, EPS, steps=10, generator=torch.Generator().manual_seed(0))
    assert (predict(forward, adv) == y).float().mean() < 0.1
    assert (predict(fast, pgd10) == y).float().mean() < 0.1


def targeted_hits(forward, x, y, seed):
    target = (y + 500) % 1000
    adv = pgd(forward, x, target, 8 / 255, steps=10, targeted=True, generator=torch.Generator().manual_seed(seed))
    assert (adv - x).abs().max() <= 8 / 255 + 1e-6
    return (predict(forward, adv) == target).float().mean()


def test_targeted_pgd_reaches_the_target_class(batch, forward):
    assert targeted_hits(forward, batch[0][:4], batch[1][:4], seed=2) >= 0.9


class Normalized(nn.Module):
    """The model with its normalisation in front, for torchattacks (which works in [0, 1])."""

    def __init__(self, model):
        super().__init__()
        self.module = model.module
        self.register_buffer("mean", torch.tensor(model.preprocessing.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(model.preprocessing.std).view(1, 3, 1, 1))

    def forward(self, x):
        return self.module((x - self.mean) / self.std)


def test_agrees_with_torchattacks(batch, forward, model):
    x, y = batch[0][:2], batch[1][:2]
    net = Normalized(model).eval()
    assert torch.equal(fgsm(forward, x, y, EPS), torchattacks.FGSM(net, eps=EPS)(x, y))

    ours = pgd(forward, x, y, EPS, steps=2, step_size=1 / 255, random_init=False)
    theirs = torchattacks.PGD(net, eps=EPS, alpha=1 / 255, steps=2, random_start=False)(x, y)
    assert torch.equal(ours, theirs)

    torch.manual_seed(7)
    ours = pgd(forward, x, y, EPS, steps=2, step_size=1 / 255, random_init=True)
    torch.manual_seed(7)
    theirs = torchattacks.PGD(net, eps=EPS, alpha=1 / 255, steps=2, random_start=True)(x, y)
    assert torch.equal(ours, theirs)

    ours = bim(forward, x, y, EPS, steps=2, step_size=1 / 255)
    theirs = torchattacks.BIM(net, eps=EPS, alpha=1 / 255, steps=2)(x, y)
    assert torch.allclose(ours, theirs, atol=1e-6)

    ours = pgd(forward, x, y, 0.5, steps=2, step_size=0.2, norm="l2", random_init=False)
    theirs = torchattacks.PGDL2(net, eps=0.5, alpha=0.2, steps=2, random_start=False)(x, y)
    assert torch.allclose(ours, theirs, atol=1e-6)

    target = (y + 1) % 1000
    ours = pgd(forward, x, target, EPS, steps=2, step_size=1 / 255, random_init=False, targeted=True)
    atk = torchattacks.PGD(net, eps=EPS, alpha=1 / 255, steps=2, random_start=False)
    atk.set_mode_targeted_by_function(lambda images, labels: (labels + 1) % 1000)
    assert torch.equal(ours, atk(x, y))


def test_fooling_images_from_noise_and_from_an_image(batch, forward):
    x = batch[0][:1]
    start = torch.cat([noise_images(1, generator=torch.Generator().manual_seed(3)), x])
    target = torch.tensor([954, 954])  # banana
    images, steps, prob, losses = fooling_images(forward, start, target, step_size=2 / 255, max_steps=40)
    assert (predict(forward, images) == target).all()
    assert (prob >= 0.9).all() and (steps > 0).all() and (steps < 40).all()
    assert images.min() >= 0 and images.max() <= 1
    assert len(losses) == int(steps.max()) + 1 and losses[-1] < losses[0]


def test_universal_perturbation_fools_more_than_random_noise_of_its_size(batch, forward):
    x = batch[0][:8]
    delta, rates = universal_perturbation(forward, [x[:4], x[4:]], 8 / 255, epochs=3, step_size=2 / 255)
    assert delta.shape == x.shape[1:] and delta.abs().max() <= 8 / 255 + 1e-6
    clean = predict(forward, x)
    fooled = (predict(forward, torch.clamp(x + delta, 0, 1)) != clean).float().mean()
    noise = (torch.randint(0, 2, delta.shape, generator=torch.Generator().manual_seed(4)) * 2 - 1) * 8 / 255
    by_noise = (predict(forward, torch.clamp(x + noise, 0, 1)) != clean).float().mean()
    assert fooled >= 0.5 and fooled > by_noise
    assert len(rates) <= 3


@pytest.mark.parametrize("text", ["", "abc", "4/0", "-1/255", "nan", "1/255,,x"])
def test_bad_eps_is_an_input_error(text):
    with pytest.raises(InputError):
        parse_eps_list(text)


def test_eps_fractions_parse():
    assert parse_eps_list("1/255, 2/255,0.5") == [1 / 255, 2 / 255, 0.5]
    assert parse_eps_list("8/255,1/255,4/255,1/255") == [1 / 255, 4 / 255, 8 / 255]  # a curve's x axis: increasing
    assert parse_eps_list("0.5,3", "l2") == [0.5, 3.0]  # an L2 budget may exceed 1
    with pytest.raises(InputError, match="did you mean 8/255"):
        parse_eps_list("1/255,8", "linf")


@pytest.mark.slow
def test_pgd10_on_all_250_shared_images(model, shared_images, forward):
    entries = list_images(shared_images)
    correct = 0
    for i in range(0, len(entries), 32):
        x, y = load(model, shared_images, entries[i:i + 32])
        adv = pgd(forward, x, y, EPS, steps=10, generator=torch.Generator().manual_seed(i))
        correct += int((predict(forward, to_pixels(to_uint8(adv))) == y).sum())
    assert correct / len(entries) < 0.1


@pytest.mark.slow
def test_targeted_pgd_on_32_shared_images(model, shared_images, forward):
    x, y = load(model, shared_images, list_images(shared_images)[3::7][:32])
    assert targeted_hits(forward, x, y, seed=5) >= 0.9
