"""engine.attribution / faithfulness / segmentation against Captum, pytorch-grad-cam and brute force."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from engine import attribution as A
from engine import faithfulness as Fa
from engine.backprop_rules import relu_backward_rule
from engine.errors import InputError
from engine.hooks import capture, hook_count
from engine.images import list_images, load_preprocessed
from engine.segmentation import grabcut_mask, grabcut_masks

FOLDERS = ["n01440764", "n01514859"]  # tench, hen


def rel_err(a, b) -> float:
    """max |a - b| / max |b|: the worst pixel against the map's scale."""
    a, b = torch.as_tensor(np.asarray(a)), torch.as_tensor(np.asarray(b))
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="session")
def batch(model, shared_images):
    """Two shared images, normalised, with their predicted classes."""
    paths = [sorted((shared_images / f).iterdir())[0] for f in FOLDERS]
    images = torch.from_numpy(np.stack([load_preprocessed(p, model.preprocessing) for p in paths]))
    x = model.preprocessing.normalize(images)
    with torch.no_grad():
        targets = model.module(x).argmax(1)
    return images, x, targets


def test_saliency_equals_captum(model, batch):
    from captum.attr import Saliency

    _, x, t = batch
    ours = A.saliency(model, x, t)
    ref = Saliency(model.module).attribute(x.clone().requires_grad_(True), target=t, abs=True).amax(1)
    assert ours.shape == (2, 224, 224)
    assert rel_err(ours, ref) < 1e-4
    # the fast form (folded batch norm) is the same map up to folding's rounding
    assert rel_err(A.saliency(model, x, t, fast=True), ref) < 2e-3


@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
@pytest.mark.parametrize("rule", ["gausslegendre", "riemann_right"])
def test_integrated_gradients_equal_captum(model, batch, layout, rule):
    """Same rule, steps, baseline and batches of (step, image) pairs; the path keeps the
    batch's layout as Captum does (oneDNN's NCHW and channels-last kernels give input
    gradients ~1e-3 apart on this net, which is what an NCHW path from a channels-last
    batch measured: 1.2e-3)."""
    from captum.attr import IntegratedGradients

    _, x, t = batch
    x = x if layout == "channels_last" else x.contiguous()
    ours, _ = A.integrated_gradients(model, x, t, steps=8, chunk=8, rule=rule)
    ref = IntegratedGradients(model.module).attribute(x.clone(), baselines=0.0, target=t, n_steps=8,
                                                      method=rule, internal_batch_size=8)
    assert rel_err(ours, ref) < 1e-4


@pytest.mark.parametrize("name", ["black", "blur"])
def test_named_ig_baselines_equal_captum_from_the_same_baseline(model, batch, name):
    """`black` and `blur`: the baseline image against one built independently (the pixels black,
    or blurred in pixel space, Gaussian sigma 16 px at 224, before normalising); the attributions
    against Captum's from that same baseline tensor. (Not from the independent one: the ~1e-5
    float difference moves path points across ReLU6 kinks, ~3% of a map's maximum at 8 nodes.)"""
    from captum.attr import IntegratedGradients
    from torchvision.transforms.functional import gaussian_blur

    images, x, t = batch
    pixels = images.permute(0, 3, 1, 2).float()
    pixels = torch.zeros_like(pixels) if name == "black" else gaussian_blur(pixels, [97, 97], [16.0, 16.0])
    base = model.preprocessing.normalize(pixels).contiguous(memory_format=torch.channels_last)
    ours_base = A.path_baseline(model, x, name)
    assert rel_err(ours_base, base) < 1e-4  # float32 sums in another order
    ours, _ = A.integrated_gradients(model, x, t, baseline=name, steps=8, chunk=8, rule="gausslegendre")
    ours_base = ours_base.contiguous(memory_format=torch.channels_last)  # the batch's layout, as the path keeps it
    ref = IntegratedGradients(model.module).attribute(x.clone(), baselines=ours_base, target=t, n_steps=8,
                                                      method="gausslegendre", internal_batch_size=8)
    assert rel_err(ours, ref) < 1e-4
    assert A.check_ig_baseline("0.5") == 0.5
    with pytest.raises(InputError, match="baseline 'grey'"):
        A.check_ig_baseline("grey")


@pytest.mark.parametrize("layer", ["_conv_head", "_blocks.15"])
def test_gradcam_equals_pytorch_grad_cam(model, batch, layer):
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    _, x, t = batch
    before = hook_count(model.module)
    ours = A.gradcam(model, x, t, layer=layer)
    assert hook_count(model.module) == before
    with GradCAM(model.module, [model.module.get_submodule(layer)]) as cam:
        # the model's weights are frozen: the library needs the input to require grad to see gradients
        ref = cam(x.clone().requires_grad_(True), targets=[ClassifierOutputTarget(int(c)) for c in t])
    assert ours.shape == (2, 224, 224) and float(ours.min()) >= 0 and float(ours.max()) <= 1
    assert np.abs(ours.numpy() - ref).max() < 1e-4


def test_gradcam_at_a_layer_the_net_then_changes_in_place(batch):
    """AlexNet's default Grad-CAM layer (its last conv) feeds ReLU(inplace=True), ResNet's bn2
    feeds `out += identity`: Grad-CAM runs there and equals a brute force from the layer's
    output captured apart (architecture only: random weights, shared images)."""
    from engine.models import load_model

    _, x, _ = batch
    t = torch.tensor([3, 7])
    torch.manual_seed(0)
    rest = {  # the net from the layer's output on, written out, given the captured activations
        "alexnet": ("features.10", lambda m, a, acts: m.classifier(torch.flatten(m.avgpool(m.features[11:](a)), 1))),
        "resnet18": ("layer4.1.bn2", lambda m, a, acts: m.fc(torch.flatten(m.avgpool(F.relu(a + acts["layer4.0"])), 1))),
    }
    for name, (layer, head) in rest.items():
        m = load_model(name, require_weights=False)
        ours = A.gradcam(m, x, t, layer=None if name == "alexnet" else layer)  # alexnet: its default layer
        with torch.no_grad(), capture(m.module, [layer, "layer4.0"] if name == "resnet18" else [layer]) as acts:
            m.module(x)
        acts = {k: v.clone() for k, v in acts.items()}
        a = acts[layer].requires_grad_(True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(head(m.module, a * 1, acts).gather(1, t[:, None]).sum(), a)
        cams = F.relu((g.mean((2, 3), keepdim=True) * a.detach()).sum(1, keepdim=True))
        cams = F.interpolate(cams, size=x.shape[2:], mode="bilinear", align_corners=False)[:, 0].flatten(1)
        cams = cams - cams.amin(1, keepdim=True)
        assert rel_err(ours, (cams / (1e-7 + cams.amax(1, keepdim=True))).view_as(ours)) < 1e-4, name  # grad-cam's scaling


def test_cam_is_classifier_weights_on_the_pooled_activation(model, batch):
    """Brute force: EfficientNet pools ReLU6(_bn1(...)); CAM = sum_k w_ck of that, upsampled."""
    _, x, t = batch
    with torch.no_grad(), capture(model.module, ["_bn1"]) as acts:
        model.module(x)
    pooled_input = acts["_bn1"].clamp(0, 6)
    low = torch.einsum("bkhw,bk->bhw", pooled_input, model.module._fc.weight[t])
    # the mean of the low-resolution CAM plus the bias is the logit (the CAM identity)
    with torch.no_grad():
        logits = model.module(x)
    assert torch.allclose(low.mean((1, 2)) + model.module._fc.bias[t], logits.gather(1, t[:, None])[:, 0], atol=1e-3)
    expected = F.interpolate(low[:, None], size=(224, 224), mode="bilinear", align_corners=False)[:, 0]
    assert torch.allclose(A.cam(model, x, t), expected, atol=1e-4)


def completeness(model, x, t, attr, base=None):
    """|sum(attr) - (S_t(x) - S_t(base))| / |S_t(x) - S_t(base)| (base: 0), computed independently
    on the eager model."""
    base = torch.zeros_like(x) if base is None else base
    with torch.no_grad():
        s = model.module(torch.cat([x, base])).gather(1, torch.cat([t, t])[:, None])[:, 0]
    delta = s[:len(x)] - s[len(x):]
    return ((attr.sum((1, 2, 3)) - delta).abs() / delta.abs()).numpy()


def test_integrated_gradients_reports_its_completeness_error(model, batch):
    _, x, t = batch
    attr, error = A.integrated_gradients(model, x[:1], t[:1], steps=8)
    assert np.allclose(error.numpy(), completeness(model, x[:1], t[:1], attr), atol=1e-3)


def test_adaptive_quadrature_stays_on_the_scores_device():
    """The probes are made on the CPU, the scores come from the model's device (CUDA on a GPU
    worker; PyTorch's shape-only meta device stands in for it here)."""
    probes = A.probe_alphas(16)
    nodes, weights = A.adaptive_quadrature(torch.rand(2, 17, dtype=torch.float64, device="meta"), probes, 8)
    assert nodes.device.type == weights.device.type == "meta" and nodes.shape == weights.shape == (2, 8)


def test_adaptive_quadrature_crowds_nodes_into_a_spike():
    """A path score whose derivative is 1 with a spike of 500 on [0.005, 0.008] (this net's
    integrand has such spikes near the baseline): the adaptive nodes find the spike from the
    score at the probes, and integrate the known derivative far better than Gauss-Legendre."""
    def derivative(a):
        return 1.0 + 500.0 * ((a >= 0.005) & (a < 0.008))

    def score(a):
        return a + 500.0 * np.clip(np.minimum(a, 0.008) - 0.005, 0, None)

    probes = A.probe_alphas(64)
    nodes, weights = (v[0].numpy() for v in A.adaptive_quadrature(torch.from_numpy(score(probes.numpy()))[None],
                                                                   probes, 64))
    # one midpoint per cell, the cells a partition of [0, 1]
    edges = np.concatenate([[0], np.cumsum(weights)])
    assert (weights > 0).all() and abs(edges[-1] - 1) < 1e-12
    assert np.allclose(nodes, (edges[:-1] + edges[1:]) / 2)
    gl_nodes, gl_weights = A.quadrature("gausslegendre", 64)
    def in_spike(a):
        return int(((a >= 0.005) & (a < 0.008)).sum())
    assert in_spike(nodes) >= 10 and in_spike(gl_nodes) == 0
    exact = score(1.0)
    assert abs((weights * derivative(nodes)).sum() - exact) / exact < 0.005
    assert abs((gl_weights * derivative(gl_nodes)).sum() - exact) / exact > 0.5
    # with all the mass on length it is the midpoint rule
    uniform, _ = A.adaptive_quadrature(torch.from_numpy(score(probes.numpy()))[None], probes, 64, uniform=1.0)
    assert np.allclose(uniform[0].numpy(), A.quadrature("riemann_middle", 64)[0])


COMPLETENESS_SAMPLE = 10  # every 25th of the 250 shared images in index order: not chosen by their error


@pytest.fixture(scope="module")
def completeness_sample(model, shared_images):
    """The sampled shared images (normalised), their predicted classes and folder names."""
    entries = list_images(shared_images)
    paths = [shared_images / e.path for e in entries][::len(entries) // COMPLETENESS_SAMPLE]
    x = model.preprocessing.normalize(torch.from_numpy(np.stack([load_preprocessed(p, model.preprocessing)
                                                                 for p in paths])))
    with torch.no_grad():
        t = model.module(x).argmax(1)
    return x, t, [p.parent.name for p in paths]


@pytest.fixture(scope="module")
def adaptive_errors(model, completeness_sample):
    x, t, _ = completeness_sample
    attr, _ = A.integrated_gradients(model, x, t, steps=64)
    return completeness(model, x, t, attr)


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="measured on the 10 sampled shared images, 64 nodes of the "
                   "default adaptive rule (64 forward probes), target logit, baseline 0 (mean colour): 1 of 10 "
                   "within 1% (median 1.7%, max 3.5%; Gauss-Legendre: 1/10, median 3.6%, max 20.8%). The "
                   "piecewise-linear ReLU6 net's path gradient has kinks below the probes' resolution whose "
                   "error 64 gradients average only to ~1-3%; signed errors scatter around 0. Tried 2026-12-03: cells "
                   "snapped to 256 probes, each node in the probe interval whose slope is closest to its cell's mean "
                   "slope: 5/10 (median 0.98%, max 3.70%), at 1.7x the cost; on the worst image the error is spread "
                   "over ~30 cells in alpha 0.007-0.07, each off by 5-10% of its own integral. A black-image baseline: "
                   "7/10 (median 0.57%, max 2.91%); a blurred one (sigma 16 px) 8/10 (0.76%, 1.54%), held out 7/10; "
                   "noise 2/10; F = softmax probability 3/10, log-probability 4/10 (bench/RESULTS.md). Not at 64 steps but "
                   "per image: refinement (A.refined_integrated_gradients, the explain job's default) doubles the "
                   "steps of the images over 1%: 10/10 within it at <= 256 steps, 2.2-3.2x the 64-step time")
def test_integrated_gradients_completeness_within_1_percent_at_64_steps(completeness_sample, adaptive_errors):
    names = completeness_sample[2]
    assert (adaptive_errors <= 0.01).all(), dict(zip(names, adaptive_errors.round(4)))


@pytest.mark.slow
def test_adaptive_nodes_beat_gauss_legendre_on_the_sample(model, completeness_sample, adaptive_errors):
    """The default rule's reason to be: on the same images, its median and worst
    completeness errors are below those of Captum's Gauss-Legendre rule with as many gradients."""
    x, t, _ = completeness_sample
    attr, _ = A.integrated_gradients(model, x, t, steps=64, rule="gausslegendre")
    gauss = completeness(model, x, t, attr)
    assert np.median(adaptive_errors) < np.median(gauss) and adaptive_errors.max() < gauss.max(), (
        adaptive_errors.round(4), gauss.round(4))


@pytest.mark.slow
def test_blurred_baseline_integrates_more_accurately_than_the_mean_colour(model, completeness_sample,
                                                                          adaptive_errors):
    """Why `--ig-baseline blur` is offered: on the same images and nodes, its median and worst
    completeness errors are below the default baseline's (measured 0.76% / 1.54% vs 1.68% / 3.51%)."""
    x, t, _ = completeness_sample
    attr, _ = A.integrated_gradients(model, x, t, baseline="blur", steps=64)
    blurred = completeness(model, x, t, attr, A.path_baseline(model, x, "blur"))
    assert np.median(blurred) < np.median(adaptive_errors) and blurred.max() < adaptive_errors.max(), (
        blurred.round(4), adaptive_errors.round(4))


def test_refinement_integrates_only_the_images_over_the_tolerance_again(model, batch):
    """Images over the tolerance get twice the steps and probes, each refined image's result is
    `integrated_gradients` of it alone at its final steps, and one within the tolerance keeps
    its first result. (At 2-8 steps these images' errors are far over 1%: the tolerance is set
    between them so that one stops early.)"""
    _, x, t = batch
    first, first_error = A.integrated_gradients(model, x, t, steps=2, probes=4)
    tolerance = float(first_error.min()) * 1.01  # the better image is within it, the other is not
    attr, error, used = A.refined_integrated_gradients(model, x, t, tolerance=tolerance, max_steps=8, steps=2,
                                                       probes=4)
    kept = int(first_error.argmin())
    assert used[kept] == 2 and torch.equal(attr[kept], first[kept]) and error[kept] == first_error[kept]
    other = 1 - kept
    assert used[other] in (4, 8) and (used[other] == 8 or error[other] <= tolerance), (used, error)
    steps = int(used[other])
    alone, alone_error = A.integrated_gradients(model, x[other:other + 1], t[other:other + 1], steps=steps,
                                                probes=4 * steps // 2)
    assert rel_err(attr[other:other + 1], alone) < 1e-4 and abs(float(error[other] - alone_error[0])) < 1e-4
    assert np.allclose(error.numpy(), completeness(model, x, t, attr), atol=1e-3)  # the errors are the results'
    _, _, none = A.refined_integrated_gradients(model, x, t, tolerance=tolerance, max_steps=3, steps=2, probes=4)
    assert (none == 2).all()  # doubling would pass max_steps


@pytest.mark.slow
def test_refined_integrated_gradients_are_complete_within_1_percent_on_the_sample(model, completeness_sample):
    """What refinement buys on the sample the 64-step completeness test fails on (1/10 within
    1% at 64 steps, measured 9/10 at 128 and 10/10 at 256): every image within 1%, by the
    independent completeness check, and only the images that needed it integrated again."""
    x, t, names = completeness_sample
    attr, error, used = A.refined_integrated_gradients(model, x, t)
    independent = completeness(model, x, t, attr)
    assert (independent <= 0.0101).all(), dict(zip(names, independent.round(4)))
    assert (used <= A.IG_MAX_STEPS).all() and (used < A.IG_MAX_STEPS).any(), used


def test_guided_backprop_leaves_the_model_unchanged(model, batch):
    _, x, t = batch
    before_hooks = hook_count(model.module)
    plain_before = A.saliency(model, x[:1], t[:1])
    guided = A.guided_gradients(model, x[:1], t[:1])
    plain_after = A.saliency(model, x[:1], t[:1])
    assert torch.equal(plain_before, plain_after)
    assert hook_count(model.module) == before_hooks
    assert not any("forward" in m.__dict__ for m in model.module.modules())
    assert not torch.allclose(guided.abs().amax(1), plain_before)  # the rule really was active
    with pytest.raises(RuntimeError, match="boom"):  # restored after an exception too
        with relu_backward_rule(model.module, "guided"):
            raise RuntimeError("boom")
    assert not any("forward" in m.__dict__ for m in model.module.modules())
    assert torch.equal(A.saliency(model, x[:1], t[:1]), plain_before)


@pytest.mark.parametrize("rule", ["guided", "deconvnet"])
def test_relu_rules_equal_backward_hooks(model, batch, rule):
    """The rule's input gradient against an independent one: full backward hooks on every ReLU6
    that rewrite the gradient leaving it (guided: the plain ReLU6 gradient's positive part;
    deconvnet: the positive part of the gradient arriving, ignoring the forward mask)."""
    _, x, t = batch

    def input_gradient():
        xg = x.clone().requires_grad_(True)
        model.module(xg).gather(1, t[:, None]).sum().backward()
        return xg.grad

    def rewrite(module, grad_in, grad_out):
        return ((grad_in[0] if rule == "guided" else grad_out[0]).clamp(min=0),)

    relus = [m for m in model.module.modules() if isinstance(m, torch.nn.ReLU6)]
    assert relus
    handles = [m.register_full_backward_hook(rewrite) for m in relus]
    try:
        expected = input_gradient()
    finally:
        for h in handles:
            h.remove()
    with relu_backward_rule(model.module, rule):
        ours = input_gradient()
    assert rel_err(ours, expected) < 1e-5


def test_occlusion_peaks_on_a_pasted_object(model, batch):
    """A tench crop pasted on a flat grey canvas: hiding the fish must hurt the most."""
    images, _, _ = batch
    canvas = torch.full((1, 224, 224, 3), 128, dtype=torch.uint8)
    y0, x0, side = 16, 112, 96
    fish = F.interpolate(images[:1].permute(0, 3, 1, 2).float(), size=(side, side), mode="area")
    canvas[0, y0:y0 + side, x0:x0 + side] = fish[0].permute(1, 2, 0).round().byte()
    x = model.preprocessing.normalize(canvas)
    with torch.no_grad():
        t = model.module(x).argmax(1)
    heat = A.occlusion(model, x, t, patch=32, stride=16)[0]
    y, xx = divmod(int(heat.argmax()), 224)
    assert y0 <= y < y0 + side and x0 <= xx < x0 + side, (y, xx)
    assert float(heat[y0:y0 + side, x0:x0 + side].mean()) > float(heat[140:, :100].mean())


def test_occluders_cover_the_image():
    masks = A.occluder_masks(224, 32, 24)
    assert masks.sum(0).min() >= 1 and masks.shape[1:] == (224, 224)
    with pytest.raises(Exception, match="patch"):
        A.occluder_masks(224, 0, 16)
    with pytest.raises(InputError, match="stride <= patch"):  # would leave pixels between occluders unscored
        A.occluder_masks(224, 16, 32)


def test_smoothgrad_of_an_image_is_its_own_whatever_the_batch(model, batch):
    """Brute force from its definition (mean |gradient| of the noisy copies, max over colours)
    with the noise the image's key gives, and the same map alone, first or second in a batch,
    in other chunks (float noise of oneDNN's batch-size-dependent kernels aside)."""
    _, x, t = batch
    both = A.smoothgrad(model, x, t, samples=3, chunk=4)
    assert torch.equal(both, A.smoothgrad(model, x, t, samples=3, chunk=4)) and both.shape == (2, 224, 224)
    alone = A.smoothgrad(model, x[1:], t[1:], samples=3, chunk=2)
    swapped = A.smoothgrad(model, x.flip(0), t.flip(0), samples=3, chunk=3)
    assert rel_err(alone[0], both[1]) < 1e-2 and rel_err(swapped[0], both[1]) < 1e-2
    sigma = 0.15 * (x[1].max() - x[1].min())
    grads = []
    for s in range(3):
        noisy = (x[1] + sigma * A.smoothgrad_noise(A.image_key(x[1]), s, x.shape[1:]))[None].requires_grad_(True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(model.module(noisy)[0, t[1]], noisy)
        grads.append(g[0].abs())
    assert rel_err(both[1], torch.stack(grads).mean(0).amax(0)) < 1e-2


def test_targets():
    logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 1.0]])
    labels = torch.tensor([2, -1])
    assert A.resolve_targets("pred", logits, labels).tolist() == [1, 0]
    assert A.resolve_targets("label", logits, labels).tolist() == [2, 0]
    assert A.resolve_targets(2, logits, labels).tolist() == [2, 2]
    assert A.parse_target("7") == 7
    for bad in ["cat", "1000", -1]:
        with pytest.raises(Exception):
            A.parse_target(bad)
    with pytest.raises(Exception, match="unknown explanation method"):
        A.parse_methods("saliency,magic")


def test_deletion_and_insertion_prefer_gradcam_order_to_its_reverse(model, batch):
    _, x, t = batch
    cam = A.gradcam(model, x[:1], t[:1])
    good = Fa.deletion_insertion(model, x[:1], t[:1], cam, steps=5)
    bad = Fa.deletion_insertion(model, x[:1], t[:1], -cam, steps=5)
    assert float(good["deletion"][0]) < float(bad["deletion"][0])
    assert float(good["insertion"][0]) > float(bad["insertion"][0])
    curve = good["deletion_curve"][0]
    with torch.no_grad():
        p = model.module(x[:1]).softmax(1)[0, t[0]]
    assert abs(float(curve[0]) - float(p)) < 1e-3  # nothing deleted: the image's own probability (fast path)


def test_imputation_is_linear_and_keeps_kept_pixels():
    """Noisy linear imputation without noise reproduces a linear ramp in the holes."""
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    ramp = torch.stack([yy / 64, xx / 64, (yy + xx) / 128])[None]
    removed = torch.zeros(1, 1, 64, 64)
    removed[..., 10:30, 20:50] = 1
    filled = Fa.impute(ramp, removed, cycles=8, noise=0.0)
    assert torch.equal(filled[..., removed[0, 0] == 0], ramp[..., removed[0, 0] == 0])
    assert float((filled - ramp).abs().max()) < 1e-3


def sparse_imputation(image: np.ndarray, hole: np.ndarray) -> np.ndarray:
    """ROAD's imputation solved exactly, as its reference code does: one sparse linear system
    per image, unknowns the removed pixels, each equal to the weighted mean of its neighbours
    inside the image (direct 1/6, diagonal 1/12), the kept pixels fixed."""
    import scipy.sparse as sp
    import scipy.sparse.linalg as spl

    C, H, W = image.shape
    unknown = np.flatnonzero(hole.ravel())
    number = np.full(H * W, -1)
    number[unknown] = np.arange(len(unknown))
    ys, xs = np.divmod(unknown, W)
    steps = [(dy, dx, 1 / 6 if dy == 0 or dx == 0 else 1 / 12) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]
    inside = [((ys + dy >= 0) & (ys + dy < H) & (xs + dx >= 0) & (xs + dx < W)) for dy, dx, _ in steps]
    total = sum(w * ok for (_, _, w), ok in zip(steps, inside))
    rows, cols, vals = [np.arange(len(unknown))], [np.arange(len(unknown))], [np.ones(len(unknown))]
    rhs = np.zeros((len(unknown), C))
    flat = image.reshape(C, -1)
    for (dy, dx, w), ok in zip(steps, inside):
        r = np.flatnonzero(ok)
        q = (ys[r] + dy) * W + xs[r] + dx
        free = number[q] >= 0
        rows.append(r[free]), cols.append(number[q[free]]), vals.append(-w / total[r[free]])
        rhs[r[~free]] += (w / total[r[~free]])[:, None] * flat[:, q[~free]].T
    system = sp.csc_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))))
    out = flat.copy()
    out[:, unknown] = spl.spsolve(system, rhs).T
    return out.reshape(C, H, W)


def test_imputation_solves_odd_sized_noise_images():
    """Grids of odd, unequal sides (coarse grids round up) and scattered plus one large hole,
    on white noise (no smoothness to lean on): still within 0.01 of the exact solve on average."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 97, 83, generator=gen)
    removed = (torch.rand(2, 1, 97, 83, generator=gen) > 0.6).float()
    removed[0, :, 20:90, 10:70] = 1
    got = Fa.impute(x, removed, noise=0.0)
    for i in range(2):
        hole = removed[i, 0].bool()
        want = torch.from_numpy(sparse_imputation(x[i].double().numpy(), hole.numpy())).float()
        assert float((got[i] - want)[:, hole].abs().mean()) < 0.01


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9])
def test_imputation_is_close_to_the_exact_sparse_solve(model, batch, fraction):
    """On shared photos with their Grad-CAM's most relevant pixels removed (one large hole, as
    ROAD's MoRF makes), the multigrid imputation is within 0.005 on average (0.06 at worst) of
    the exact solution, in normalised units where ROAD's noise has std 0.02; kept pixels are
    untouched and the noise is exactly `noise` x N(0, 1) of the seed."""
    _, x, t = batch
    ranks = Fa.pixel_ranks(A.gradcam(model, x, t))
    removed = (ranks < round(fraction * ranks[0].numel()))[:, None].float()
    got = Fa.impute(x, removed, noise=0.0)
    for i in range(len(x)):
        hole = removed[i, 0].bool()
        want = torch.from_numpy(sparse_imputation(x[i].double().numpy(), hole.numpy())).float()
        error = (got[i] - want)[:, hole].abs()
        assert float(error.mean()) < 0.005 and float(error.max()) < 0.06, (float(error.mean()), float(error.max()))
        assert torch.equal(got[i][:, ~hole], x[i][:, ~hole])
    noisy = Fa.impute(x, removed, noise=0.02, seed=5)
    noise = removed * 0.02 * torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    assert float((noisy - got - noise).abs().max()) < 1e-6


@pytest.mark.parametrize("sigma,radius", [(8.0, 15), (5.0, 5), (16.0, 48), (1.5, None)])
def test_separable_gaussian_blur_equals_torchvision(sigma, radius):
    from torchvision.transforms.functional import gaussian_blur as blur_2d

    from engine.filters import gaussian_blur

    x = torch.randn(2, 4, 120, 100, generator=torch.Generator().manual_seed(1))
    size = 2 * (radius if radius is not None else round(3 * sigma)) + 1
    want = blur_2d(x, [size, size], [sigma, sigma])
    assert float((gaussian_blur(x, sigma, radius) - want).abs().max()) < 1e-5
    cl = gaussian_blur(x.contiguous(memory_format=torch.channels_last), sigma, radius)
    assert float((cl - want).abs().max()) < 1e-5


def test_pixel_ranks_break_ties_by_index():
    ranks = Fa.pixel_ranks(torch.tensor([[[1.0, 3.0], [3.0, 0.0]]]))
    assert ranks.tolist() == [[[2, 0], [1, 3]]]


def test_grabcut_finds_a_disk_seeded_by_a_blob():
    rng = np.random.default_rng(0)
    image = (rng.normal(0, 12, (128, 128, 3)) + [60, 140, 70]).clip(0, 255).astype(np.uint8)
    yy, xx = np.mgrid[:128, :128]
    disk = (yy - 60) ** 2 + (xx - 70) ** 2 < 30 ** 2
    image[disk] = (rng.normal(0, 12, (int(disk.sum()), 3)) + [200, 40, 50]).clip(0, 255).astype(np.uint8)
    blob = np.exp(-((yy - 60) ** 2 + (xx - 70) ** 2) / (2 * 18.0 ** 2))
    mask = grabcut_mask(image, blob)
    iou = (mask & disk).sum() / (mask | disk).sum()
    assert iou > 0.85, iou
    assert not grabcut_mask(image, np.zeros((128, 128))).any()  # a flat map has no seeds


def test_grabcut_masks_on_threads_equal_one_image_at_a_time(shared_images):
    """A batch's masks come from a thread pool; OpenCV's RNG is per thread and seeded per
    image, so they equal the masks made one by one (real photos, seeded by a centred blob)."""
    paths = sorted(shared_images.rglob("*.JPEG"))[::50][:5]
    images = np.stack([np.asarray(Image.open(p).convert("RGB").resize((160, 160))) for p in paths])
    yy, xx = np.mgrid[:160, :160]
    seeds = np.stack([np.exp(-((yy - 80 + 7 * i) ** 2 + (xx - 80) ** 2) / (2 * 30.0 ** 2)) for i in range(5)])
    one_by_one = np.stack([grabcut_mask(img, s) for img, s in zip(images, seeds)])
    assert 0.02 < one_by_one.mean() < 0.98
    assert np.array_equal(grabcut_masks(images, seeds, threads=3), one_by_one)


def test_guided_gradcam_run_with_its_parts_is_their_product_bit_for_bit(model, batch, monkeypatch):
    """explain_batch with guided backprop and Grad-CAM makes guided Grad-CAM from their maps
    (each gradient computed once; twice before): the same bytes as computed alone, and as the
    gated guided gradients the definition multiplies out."""
    from engine.explanations import explain_batch

    images, x, t = batch
    alone = explain_batch(model, images, [-1, -1], ["guided_gradcam"], steps=0)
    passes = []
    guided = A.guided_gradients
    monkeypatch.setattr(A, "guided_gradients", lambda *a, **k: passes.append(1) or guided(*a, **k))
    both = explain_batch(model, images, [-1, -1], ["guided_gradcam", "guided_backprop", "gradcam"], steps=0)
    monkeypatch.undo()
    assert len(passes) == 1
    assert list(both.maps) == ["guided_backprop", "gradcam", "guided_gradcam"]
    assert np.array_equal(alone.maps["guided_gradcam"], both.maps["guided_gradcam"])
    defined = (A.guided_gradients(model, x, t) * A.gradcam(model, x, t)[:, None]).abs().amax(1)
    assert torch.equal(A.guided_backprop(model, x, t) * A.gradcam(model, x, t), defined)
    other = explain_batch(model, images, [-1, -1], ["guided_gradcam", "guided_backprop", "gradcam"], steps=0,
                          params={"gradcam": {"layer": "_blocks.10"}})  # another Grad-CAM layer: computed on its own
    assert np.array_equal(other.maps["guided_gradcam"], alone.maps["guided_gradcam"])
    assert not np.array_equal(other.maps["gradcam"], both.maps["gradcam"])
