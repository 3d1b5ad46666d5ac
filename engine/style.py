"""Neural style transfer and texture synthesis from Gram matrices (Gatys et al. 2015, 2016).

Style of image s at layer l: the Gram matrix G = F F^T of its feature maps F (N channels x
M positions); the per-layer loss is E_l = 1 / (4 N^2 M^2) * sum (G - G_s)^2, weighted over
layers (`objectives.style`). Content: ||phi(x) - phi(c)||^2 per element at one deeper
layer. Texture synthesis is style transfer without content, from noise.

Settings for EfficientNet-Lite0 (the default network), found by looking at renders of the
demo images: its block outputs are linear bottlenecks behind ReLU6, and the raw network
gives blotchy, checkerboarded results; smoothing the ReLU6 (beta 2, `render.network`)
makes gradients reach every pixel. Style layers: the stem and the outputs of blocks 1, 3,
5 and 8 (112, 56, 28, 14, 14 px at 224 input), equally weighted; content layer: block 5;
L-BFGS (lr 1) from the content image, 150 steps at 224 px; style weight 3 against
content weight 1 with the normalisations above (0.3: content dominates, 30: the content is
gone); TV weight 0 (smoothing already removes most high frequencies). For VGG-19 (`--model vgg19 --weights FILE`) the classic: relu1_1
.. relu5_1, content relu4_2, average instead of max pooling, no smoothing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from engine.errors import InputError
from engine.models import LoadedModel, smallest_input
from engine.optvis import objectives as obj
from engine.optvis.param import PixelParam, image_to_tensor, resize
from engine.optvis.render import RenderResult, forward_layers, network, render


@dataclass(frozen=True)
class StyleLayers:
    """Where a network's style and content live, and how to make it render well."""

    style: tuple[str, ...]
    content: str
    smooth: float | None = None
    avg_pool: bool = False


STYLE_LAYERS = {
    "efficientnet_lite0": StyleLayers(("_bn0", "_blocks.1", "_blocks.3", "_blocks.5", "_blocks.8"),
                                      "_blocks.5", smooth=2.0),
    # Gatys et al.: relu1_1, relu2_1, relu3_1, relu4_1, relu5_1 for style, relu4_2 for content
    "vgg16": StyleLayers(("features.1", "features.6", "features.11", "features.18", "features.25"),
                         "features.20", avg_pool=True),
    "vgg19": StyleLayers(("features.1", "features.6", "features.11", "features.20", "features.29"),
                         "features.22", avg_pool=True),
}


def step_size(optimizer: str, lr: float | None) -> float:
    """L-BFGS takes whole steps (lr 1); Adam on [0, 1] pixels 0.05 (at L-BFGS's 1 its first step
    moved every pixel across the whole range: colour noise, the loss up 20x)."""
    return lr if lr is not None else (1.0 if optimizer == "lbfgs" else 0.05)


def style_layers(model: LoadedModel) -> StyleLayers:
    if model.name not in STYLE_LAYERS:
        raise InputError(f"no default style layers for {model.name}; pass --style-layers and --content-layer")
    return STYLE_LAYERS[model.name]


@dataclass
class StyleOptions:
    """Every knob of a style transfer; stored whole in the render's attrs."""

    size: int = 224
    steps: int = 150
    optimizer: str = "lbfgs"
    lr: float | None = None  # None: the optimizer's own (`step_size`)
    content_weight: float = 1.0
    style_weight: float = 3.0
    tv_weight: float = 0.0
    style_layers: tuple[str, ...] | None = None  # None: the model's defaults
    content_layer: str | None = None
    layer_weights: tuple[float, ...] | None = None  # per style layer; None: equal
    blend: tuple[float, ...] | None = None  # per style image; None: equal
    style_scale: float = 1.0
    init: str = "content"  # content | style | noise
    preserve_color: str = "none"  # none | luminance | histogram
    seed: int = 0
    record: tuple[int, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict:
        return asdict(self)


def _layers(model: LoadedModel, opts: StyleOptions) -> tuple[StyleLayers, tuple[str, ...], str]:
    defaults = style_layers(model) if (opts.style_layers is None or opts.content_layer is None) else None
    s = tuple(model.resolve(l) for l in (opts.style_layers or defaults.style))
    c = model.resolve(opts.content_layer or defaults.content)
    tuned = defaults or STYLE_LAYERS.get(model.name, StyleLayers(s, c))
    return tuned, s, c


def mean_grams(model: LoadedModel, net, image: torch.Tensor, layers: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Gram matrix per position (G / M) of each layer for one image [1, 3, H, W] in [0, 1]."""
    with torch.no_grad():
        acts = forward_layers(model, net, normalize(model, image), layers)
    return {l: obj.gram(a)[0] / (a.shape[2] * a.shape[3]) for l, a in acts.items()}


def normalize(model: LoadedModel, x: torch.Tensor) -> torch.Tensor:
    p = model.preprocessing
    return (x - torch.tensor(p.mean).view(1, 3, 1, 1).to(x)) / torch.tensor(p.std).view(1, 3, 1, 1).to(x)


def fit_size(image: torch.Tensor, size: int) -> torch.Tensor:
    """Resize so the shorter side is `size` (keeps the aspect ratio)."""
    h, w = image.shape[-2:]
    k = size / min(h, w)
    return resize(image, (max(1, round(h * k)), max(1, round(w * k))))


def style_objective(model, net, styles: list[torch.Tensor], layers: tuple[str, ...],
                    layer_weights, blend) -> obj.Objective:
    """sum_k blend_k * sum_l w_l E_l(style k): several styles blended by their losses."""
    lw = np.asarray(layer_weights if layer_weights is not None else [1.0] * len(layers), float)
    bw = np.asarray(blend if blend is not None else [1.0] * len(styles), float)
    if len(lw) != len(layers) or len(bw) != len(styles):
        raise InputError("need one layer weight per style layer and one blend weight per style image")
    bw = bw / bw.sum()
    terms = []
    for k, s in enumerate(styles):
        grams = mean_grams(model, net, s, layers)
        terms += [float(bw[k] * lw[i]) * obj.style(l, grams[l]) for i, l in enumerate(layers)]
    return sum(terms)


# ---- colour preservation (Gatys et al., "Preserving colour in neural artistic style transfer") ----
_RGB2YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


def to_yiq(x: torch.Tensor) -> torch.Tensor:
    return torch.einsum("ij,bjhw->bihw", _RGB2YIQ.to(x), x)


def from_yiq(x: torch.Tensor) -> torch.Tensor:
    return torch.einsum("ij,bjhw->bihw", torch.linalg.inv(_RGB2YIQ).to(x), x)


def luminance(x: torch.Tensor) -> torch.Tensor:
    """Grey RGB image of x's luminance (Y of YIQ)."""
    return to_yiq(x)[:, :1].expand(-1, 3, -1, -1).contiguous()


def match_histograms(source: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-channel exact histogram matching of `source` to `reference` (both [1, 3, H, W])."""
    out = torch.empty_like(source)
    for c in range(3):
        s = source[0, c].flatten()
        ref = torch.sort(reference[0, c].flatten()).values
        ranks = torch.argsort(torch.argsort(s))
        q = (ranks.float() + 0.5) / len(s)
        out[0, c] = ref[(q * len(ref)).long().clamp_max(len(ref) - 1)].view_as(source[0, c])
    return out


def _match_luminance_stats(style_y: torch.Tensor, content_y: torch.Tensor) -> torch.Tensor:
    """Shift and scale the style's luminance to the content's mean and spread."""
    return (style_y - style_y.mean()) * (content_y.std() / style_y.std().clamp_min(1e-6)) + content_y.mean()


def style_transfer(model: LoadedModel, content: np.ndarray, styles: list[np.ndarray],
                   opts: StyleOptions = StyleOptions()) -> RenderResult:
    """Content (uint8 [H, W, 3]) painted in the blended style of `styles` (uint8 images)."""
    tuned, s_layers, c_layer = _layers(model, opts)
    net = network(model, tuned.smooth, tuned.avg_pool)
    c = fit_size(image_to_tensor(content), opts.size)
    style_size = max(smallest_input(model), round(opts.size * opts.style_scale))
    ss = [fit_size(image_to_tensor(s), style_size) for s in styles]
    if opts.preserve_color == "histogram":
        ss = [match_histograms(s, c) for s in ss]
    elif opts.preserve_color == "luminance":
        ss = [_match_luminance_stats(luminance(s), luminance(c)) for s in ss]
        c_color, c = c, luminance(c)
    elif opts.preserve_color != "none":
        raise InputError(f"unknown colour preservation {opts.preserve_color!r}; use none, luminance or histogram")
    with torch.no_grad():
        c_target = forward_layers(model, net, normalize(model, c), [c_layer])[c_layer]
    objective = opts.content_weight * obj.content(c_layer, c_target) + opts.style_weight * style_objective(
        model, net, ss, s_layers, opts.layer_weights, opts.blend)
    if opts.tv_weight:
        objective = objective + opts.tv_weight * obj.tv(2.0)
    g = torch.Generator().manual_seed(opts.seed)
    init = {"content": lambda: c, "style": lambda: resize(ss[0], c.shape[-2:]),
            "noise": lambda: torch.rand(c.shape, generator=g)}
    if opts.init not in init:
        raise InputError(f"unknown init {opts.init!r}; use content, style or noise")
    param = PixelParam(init[opts.init]())
    lr = step_size(opts.optimizer, opts.lr)
    result = render(model, objective, param, opts.steps, lr=lr, optimizer=opts.optimizer, generator=g,
                    smooth=tuned.smooth, avg_pool=tuned.avg_pool, record=opts.record)
    if opts.preserve_color == "luminance":
        result.images = _recolor(result.images, c_color)
        result.snapshots = [(k, _recolor(im, c_color)) for k, im in result.snapshots]
    result.settings = {**opts.to_dict(), "lr": lr, "style_layers": list(s_layers), "content_layer": c_layer,
                       "smooth": tuned.smooth, "avg_pool": tuned.avg_pool}
    return result


def _recolor(images_uint8: np.ndarray, color: torch.Tensor) -> np.ndarray:
    """Luminance of the rendered (grey) images with the colour (I, Q) of `color`."""
    y = to_yiq(image_to_tensor(images_uint8))[:, :1]
    iq = to_yiq(color)[:, 1:].expand(y.shape[0], -1, -1, -1)
    from engine.optvis.param import tensor_to_image

    return tensor_to_image(from_yiq(torch.cat([y, iq], 1)))


@dataclass
class TextureOptions:
    size: int = 224
    steps: int = 200
    optimizer: str = "lbfgs"
    lr: float | None = None  # None: the optimizer's own (`step_size`)
    layers: tuple[str, ...] | None = None  # None: the model's style layers
    layer_weights: tuple[float, ...] | None = None
    source_scale: float = 1.0
    seed: int = 0
    record: tuple[int, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict:
        return asdict(self)


def synthesize_texture(model: LoadedModel, source: np.ndarray, opts: TextureOptions = TextureOptions()) -> RenderResult:
    """A new size x size image from noise whose Gram matrices match those of `source`."""
    tuned = style_layers(model) if opts.layers is None else STYLE_LAYERS.get(model.name, StyleLayers((), ""))
    layers = tuple(model.resolve(l) for l in (opts.layers or tuned.style))
    net = network(model, tuned.smooth, tuned.avg_pool)
    src = fit_size(image_to_tensor(source), max(smallest_input(model), round(opts.size * opts.source_scale)))
    objective = style_objective(model, net, [src], layers, opts.layer_weights, None)
    g = torch.Generator().manual_seed(opts.seed)
    param = PixelParam(shape=(1, 3, opts.size, opts.size), noise=0.5, generator=g)
    lr = step_size(opts.optimizer, opts.lr)
    result = render(model, objective, param, opts.steps, lr=lr, optimizer=opts.optimizer, generator=g,
                    smooth=tuned.smooth, avg_pool=tuned.avg_pool, record=opts.record)
    result.settings = {**opts.to_dict(), "lr": lr, "layers": list(layers), "smooth": tuned.smooth,
                       "avg_pool": tuned.avg_pool}
    return result
