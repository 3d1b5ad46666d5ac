"""Render engine: Gram/style/content invariants, tiled DeepDream gradients, every optimisation
loop on a real image (large loss decrease, bit-for-bit reproducible), fast-style sizes."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from engine.optvis import objectives as obj
from engine.optvis.param import image_to_tensor
from engine.optvis.render import RenderNetwork, SmoothReLU6, forward_layers, network, tiled_gradient
from engine.style import fit_size, mean_grams, normalize, style_objective

SIZE = 64


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """64 px renders gain nothing from a second thread, and lose a lot on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def photo(shared_images):
    from engine.images import open_image

    img = np.asarray(open_image(shared_images / "n02112137" / "n02112137_chow.JPEG"))
    return fit_size(image_to_tensor(img), SIZE)[..., :SIZE, :SIZE].contiguous()


@pytest.fixture(scope="session")
def other_photo(shared_images):
    from engine.images import open_image

    img = np.asarray(open_image(shared_images / "n02391049" / "n02391049_zebra.JPEG"))
    return fit_size(image_to_tensor(img), SIZE)[..., :SIZE, :SIZE].contiguous()


def _acts(model, x, layers, smooth=None):
    return forward_layers(model, network(model, smooth), normalize(model, x), layers)


@pytest.mark.parametrize("beta", [0.5, 2.0, 10.0, 20.0])
def test_smooth_relu6_is_relu6_with_the_two_softplus_gradient(beta):
    """Forward, exactly ReLU6 (the network computes what the model computes); backward, the
    gradient of softplus_b(x) - softplus_b(x - 6) in float64 autograd, from the one-exp form
    (and the fallback past its largest beta), from far below 0 to far above 6."""
    x = torch.cat([torch.linspace(-60, 70, 20001), torch.tensor([-1e4, 1e4, 0.0, 6.0])])
    mine = x.clone().requires_grad_(True)
    y = SmoothReLU6(beta)(mine)
    y.sum().backward()
    ref = x.double().requires_grad_(True)
    y_ref = torch.nn.functional.softplus(ref, beta) - torch.nn.functional.softplus(ref - 6, beta)
    y_ref.sum().backward()
    assert torch.equal(y.detach(), x.clamp(0, 6)) and torch.isfinite(mine.grad).all()
    torch.testing.assert_close(mine.grad.double(), ref.grad, rtol=0, atol=2e-6)


def test_smoothed_render_network_computes_the_models_function(model, photo):
    """A smoothed network changes gradients only: its logits are the model's (softplus in the
    forward pass, at beta 2, had left none of 16 top-1 predictions standing)."""
    x = normalize(model, photo)
    with torch.no_grad():
        logits = model.module(x)
        smoothed = network(model, 2.0).eager(x)
    torch.testing.assert_close(smoothed, logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("smooth", [None, 2.0])
def test_render_graph_gives_the_eager_activations_and_gradients(model, photo, smooth):
    """The folded, cut, channels-last graph a render runs against hooks on the eager module with
    the same activations swapped; a layer that is no graph output (a ReLU6 module called twice
    a block) falls back to hooks and still answers."""
    from engine.optvis.render import _swap_modules

    layers = ["_blocks.3", "_blocks.10"]
    net = RenderNetwork(model, smooth, False)
    eager = _swap_modules(copy.deepcopy(model.module), smooth, False)
    x = normalize(model, photo)
    fast_x, eager_x = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    fast, ref = forward_layers(model, net, fast_x, layers), forward_layers(model, eager, eager_x, layers)
    assert net.graph(tuple(layers)) is not None
    for name in layers:
        assert fast[name].is_contiguous()
        torch.testing.assert_close(fast[name], ref[name], rtol=1e-4, atol=1e-4)
    sum(a.square().mean() for a in fast.values()).backward()
    sum(a.square().mean() for a in ref.values()).backward()
    torch.testing.assert_close(fast_x.grad, eager_x.grad, rtol=1e-3, atol=1e-3 * float(eager_x.grad.abs().max()))
    twice = "_blocks.3._swish"
    assert net.graph((twice,)) is None
    torch.testing.assert_close(forward_layers(model, net, x, [twice])[twice],
                               forward_layers(model, eager, x, [twice])[twice])


def test_gram_is_invariant_to_a_permutation_of_pixels(model, photo):
    f = _acts(model, photo, ["_blocks.3"])["_blocks.3"].detach().double()  # exact sums
    b, c, h, w = f.shape
    perm = torch.randperm(h * w, generator=torch.Generator().manual_seed(1))
    shuffled = f.flatten(2)[..., perm].view(b, c, h, w)
    g, gs = obj.gram(f), obj.gram(shuffled)
    assert not torch.equal(f, shuffled)
    torch.testing.assert_close(gs, g, rtol=1e-10, atol=1e-9)
    # and it is F F^T: brute force over positions
    brute = sum(torch.outer(f[0, :, i, j], f[0, :, i, j]) for i in range(h) for j in range(w))
    torch.testing.assert_close(g[0], brute, rtol=1e-10, atol=1e-9)


def test_style_loss_is_zero_for_the_style_image_and_positive_otherwise(model, photo, other_photo):
    layers = ("_bn0", "_blocks.1", "_blocks.3", "_blocks.5")
    net = network(model, 2.0)
    style = style_objective(model, net, [photo], layers, None, None)
    same = style(_acts(model, photo, style.layers, 2.0), photo)
    other = style(_acts(model, other_photo, style.layers, 2.0), other_photo)
    assert float(same) == pytest.approx(0.0, abs=1e-9)
    assert float(other) > 1e-3
    # E_l = 1/(4 N^2 M^2) sum (G - G_s)^2 with unnormalised G when sizes agree
    f = _acts(model, other_photo, ["_blocks.3"], 2.0)["_blocks.3"][0]
    fs = _acts(model, photo, ["_blocks.3"], 2.0)["_blocks.3"][0]
    n, m = f.shape[0], f.shape[1] * f.shape[2]
    lecture = ((obj.gram(f[None]) - obj.gram(fs[None])) ** 2).sum() / (4 * n * n * m * m)
    mine = obj.style("_blocks.3", mean_grams(model, net, photo, ("_blocks.3",))["_blocks.3"])
    torch.testing.assert_close(mine({"_blocks.3": f[None]}, other_photo), lecture, rtol=1e-4, atol=0)


def test_content_loss_and_its_gradient_are_zero_at_the_content_image(model, photo, other_photo):
    target = _acts(model, photo, ["_blocks.5"])["_blocks.5"].detach()
    loss_fn = obj.content("_blocks.5", target)
    x = photo.clone().requires_grad_(True)
    loss = loss_fn(_acts(model, x, ["_blocks.5"]), x)
    loss.backward()
    assert float(loss.detach()) == 0.0
    assert float(x.grad.abs().max()) == 0.0
    y = other_photo.clone().requires_grad_(True)
    loss_fn(_acts(model, y, ["_blocks.5"]), y).backward()
    assert float(y.grad.abs().max()) > 0


def test_tiled_dream_gradient_equals_untiled_when_tiles_overlap_enough(model, photo):
    from engine.receptive_field import receptive_fields

    layer = "_blocks.2"
    x = normalize(model, photo).requires_grad_(True)
    objective = obj.dream(layer)
    full = objective(forward_layers(model, model.module, x, [layer]), x)
    (g_full,) = torch.autograd.grad(full, x)
    overlap = max(receptive_fields(model)[layer].size)
    value, g_tiled = tiled_gradient(model, model.module, objective, x, core=16, overlap=overlap)
    assert value == pytest.approx(float(full.detach()), rel=1e-4)
    torch.testing.assert_close(g_tiled, g_full, rtol=1e-3, atol=1e-3 * float(g_full.abs().max()))
    # without overlap the tile borders change the gradient: the test can tell
    _, g_cut = tiled_gradient(model, model.module, objective, x, core=16, overlap=0)
    assert float((g_cut - g_full).abs().max()) > 0.05 * float(g_full.abs().max())


def _uint8(x: torch.Tensor) -> np.ndarray:
    return (x[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def _loops(photo, other_photo):
    from engine.classvis import ClassVisOptions, InvertOptions, class_visualisation, invert_features
    from engine.dream import DreamOptions, deep_dream
    from engine.optvis.featvis import feature_visualisation
    from engine.style import StyleOptions, TextureOptions, style_transfer, synthesize_texture

    c, s = _uint8(photo), _uint8(other_photo)
    return {
        # kind: (run(model) -> RenderResult, how much the loss must fall)
        "style": (lambda m: style_transfer(m, c, [s], StyleOptions(size=SIZE, steps=16)), "ratio"),
        "texture": (lambda m: synthesize_texture(m, s, TextureOptions(size=SIZE, steps=8)), "ratio"),
        "invert": (lambda m: invert_features(m, c, InvertOptions(layer="_blocks.8", size=SIZE, steps=10, jitter=0,
                                                                 tv_weight=0.5)), "ratio"),
        "dream": (lambda m: deep_dream(m, c, DreamOptions(layer="_blocks.4", octaves=1, steps=6, lr=0.05)), "ascent"),
        "classvis": (lambda m: class_visualisation(m, 340, ClassVisOptions(size=SIZE, steps=10)), "ascent"),
        "featvis": (lambda m: feature_visualisation(m, "_blocks.6", 3, size=SIZE, steps=10), "ascent"),
    }


@pytest.mark.parametrize("kind", ["style", "texture", "invert", "dream", "classvis", "featvis"])
def test_every_loop_improves_a_lot_and_is_reproducible(model, photo, other_photo, kind):
    run, how = _loops(photo, other_photo)[kind]
    first, again = run(model), run(model)
    losses = first.losses
    if how == "ratio":  # a loss bounded below by 0 falls by a large factor
        assert losses[-1] < 0.3 * losses[0], losses
    else:  # an ascent objective (negative loss): the excited quantity grows a lot
        assert -losses[-1] > -losses[0] + 0.5 * abs(losses[0]) + 1.0, losses
    assert first.images.dtype == np.uint8 and first.images.shape[-1] == 3
    np.testing.assert_array_equal(first.images, again.images)


@pytest.mark.parametrize("layer, size", [("_blocks.2", 64), ("_blocks.8", 236)])
def test_inversion_of_a_spatial_layer_jitters_without_changing_its_shape(model, photo, layer, size):
    """The default jitter (4 px) padded by 4 and cropped by 4: the rendered image was 4 px
    larger than the target's, so a spatial layer's map could have another shape (stride 4:
    always, 17 x 17 against 16 x 16 at 64 px; stride 16 at 236 px: 15 x 15 against 14 x 14)
    and `render invert --layer _blocks.2` crashed."""
    from engine.classvis import InvertOptions, invert_features

    result = invert_features(model, _uint8(photo), InvertOptions(layer=layer, size=size, steps=3))
    assert result.image.shape == (size, size, 3) and np.isfinite(result.losses).all()


def test_small_renders_run_on_deep_layers(model, photo, other_photo):
    """Octaves and style images were scaled down to 8 px, below what the model runs on (its
    smallest input, 32 px here): DeepDream at 64 px on _blocks.15 and a style at 33 px with
    --style-scale 0.5 crashed in a convolution. They stop at the model's smallest input."""
    from engine.dream import DreamOptions, deep_dream
    from engine.models import load_model, smallest_input
    from engine.style import StyleOptions, style_transfer

    assert smallest_input(model) == 32
    assert smallest_input(load_model("alexnet", require_weights=False)) == 63  # `layers --input-size 33` crashed
    dreamed = deep_dream(model, _uint8(photo)[:64, :48], DreamOptions(layer="_blocks.15", steps=1))
    assert dreamed.image.shape == (64, 48, 3)
    styled = style_transfer(model, _uint8(photo), [_uint8(other_photo)],
                            StyleOptions(size=33, steps=1, style_scale=0.5, style_layers=("_blocks.0", "_blocks.15")))
    assert min(styled.image.shape[:2]) == 33


@pytest.mark.parametrize("kind", ["style", "texture"])
def test_adam_style_and_texture_descend_from_their_first_step(model, photo, other_photo, kind):
    """With Adam, style and texture took L-BFGS's lr 1: the first step moved every pixel across
    the whole range (the loss went up 20x, the image was colour noise). Adam now steps 0.05."""
    from engine.style import StyleOptions, TextureOptions, style_transfer, synthesize_texture

    c, s = _uint8(photo), _uint8(other_photo)
    result = (style_transfer(model, c, [s], StyleOptions(size=SIZE, steps=30, optimizer="adam")) if kind == "style"
              else synthesize_texture(model, s, TextureOptions(size=SIZE, steps=30, optimizer="adam")))
    losses = result.losses
    assert result.settings["lr"] == 0.05
    assert losses[1] < losses[0] and losses[-1] < 0.5 * losses[0], losses[:3]


def test_fast_style_trains_and_keeps_odd_input_sizes(model, photo, other_photo):
    from engine.fast_style import FastStyleOptions, TransformNet, apply_fast_style, train_fast_style

    net = TransformNet(width=8, blocks=1, n_styles=2)
    for h, w in [(37, 53), (64, 65), (5, 7)]:
        assert net(torch.rand(1, 3, h, w), [0.3, 0.7]).shape == (1, 3, h, w)
    content = [_uint8(photo)]
    ck, losses = train_fast_style(model, content, [_uint8(other_photo)],
                                  FastStyleOptions(width=8, blocks=1, size=32, batch=1, steps=80, lr=1e-2))
    # Adam's first steps from the random net overshoot (the loss of the network as it is, not
    # a smoothed stand-in); from there on training must cut it a lot
    assert losses[-5:].mean() < 0.7 * losses[1:6].mean(), losses.round()
    out = apply_fast_style(ck.build(), _uint8(photo)[:41, :39])
    assert out.shape == (41, 39, 3) and out.dtype == np.uint8


def test_fast_style_checkpoint_round_trips_without_pickle(tmp_path):
    from engine.fast_style import Checkpoint, TransformNet

    net = TransformNet(width=4, blocks=1, n_styles=3)
    ck = Checkpoint.of(net, note="x")
    ck.save_npz(tmp_path / "ck.npz")
    back = Checkpoint.load_npz(tmp_path / "ck.npz")
    assert back.config["n_styles"] == 3 and back.config["note"] == "x"
    x = torch.rand(1, 3, 20, 21)
    torch.testing.assert_close(back.build()(x, 2), net.eval()(x, 2))


@pytest.mark.parametrize("arch", ["vgg16", "vgg19"])
def test_vgg_style_layers_are_gatys_relus(arch):
    """Style at relu1_1 .. relu5_1, content at relu4_2 (Gatys et al. 2016), named from the
    architecture itself: VGG-16 and VGG-19 put them at different indices."""
    import torchvision

    from engine.style import STYLE_LAYERS

    names, block, conv = {}, 1, 0
    for i, m in enumerate(getattr(torchvision.models, arch)().features):
        if isinstance(m, torch.nn.Conv2d):
            conv += 1
        elif isinstance(m, torch.nn.ReLU):
            names[f"features.{i}"] = f"relu{block}_{conv}"
        elif isinstance(m, torch.nn.MaxPool2d):
            block, conv = block + 1, 0
    layers = STYLE_LAYERS[arch]
    assert [names[s] for s in layers.style] == ["relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1"]
    assert names[layers.content] == "relu4_2"


def test_a_batch_of_units_on_a_vector_layer_is_one_objective():
    """The catalogue visualises a list of units at once, on a vector layer (logits, [B, C]) too:
    image b excites unit index[b] (this raised IndexError on [B] picks)."""
    acts = {"L": torch.randn(2, 10), "M": torch.randn(2, 4, 3, 3)}
    assert torch.allclose(obj.channel("L", [3, 5])(acts, None), -(acts["L"][0, 3] + acts["L"][1, 5]))
    assert torch.allclose(obj.channel("M", [1, 2])(acts, None), -(acts["M"][0, 1].mean() + acts["M"][1, 2].mean()))


def test_every_render_runs_on_the_models_device(model, monkeypatch):
    """With --device cuda the images being optimised, the inputs and the constants must live
    where the model does (they stayed on the CPU). No GPU here: the model goes to PyTorch's
    shape-only meta device, which checks devices as CUDA does; reading a loss or copying an
    image out of it is the one thing meta cannot do, so those read zeros."""
    import dataclasses

    from engine.classvis import ClassVisOptions, InvertOptions, class_visualisation, invert_features
    from engine.dream import DreamOptions, deep_dream
    from engine.fast_style import FastStyleOptions, train_fast_style
    from engine.optvis.featvis import feature_visualisation
    from engine.style import StyleOptions, TextureOptions, style_transfer, synthesize_texture

    for name, real in (("item", torch.Tensor.item), ("__float__", torch.Tensor.__float__)):
        monkeypatch.setattr(torch.Tensor, name, lambda t, real=real: 0.0 if t.is_meta else real(t))
    real_cpu = torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "cpu", lambda t, *a, **k: torch.zeros(t.shape, dtype=t.dtype) if t.is_meta
                        else real_cpu(t, *a, **k))
    meta = dataclasses.replace(model, module=copy.deepcopy(model.module).to("meta"), device=torch.device("meta"))
    img = (np.random.default_rng(0).random((48, 48, 3)) * 255).astype(np.uint8)
    feature_visualisation(meta, "_blocks.6", [3, 4], size=32, steps=1)
    class_visualisation(meta, 3, ClassVisOptions(size=32, steps=1))
    invert_features(meta, img, InvertOptions(size=32, steps=1))
    deep_dream(meta, img, DreamOptions(steps=1, octaves=2))
    for colour in ("none", "luminance"):
        style_transfer(meta, img, [img], StyleOptions(size=32, steps=1, optimizer="adam", preserve_color=colour))
    synthesize_texture(meta, img, TextureOptions(size=32, steps=1, optimizer="adam"))
    train_fast_style(meta, [img], [img], FastStyleOptions(steps=1, size=32, batch=1, style_size=32))
