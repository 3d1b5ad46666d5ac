"""Pure helpers of the neuron catalogue: patches, projections, overlays, filter grids, selectivity.

Patches are the receptive-field box of a unit's argmax position, cropped from the
preprocessed image and squared by padding on the side(s) where the box left the image (so a
border patch keeps its scale and shape and shows where the image ended), then resampled to
one size per layer: a whole-factor mean of pixels, what `roi_align` samples there (`extract_patches`).
"""

from __future__ import annotations

import contextlib
import weakref

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from engine.atlas import inferno_lut
from engine.backprop_rules import relu_backward_rule
from engine.inference import run_layers
from engine.models import LoadedModel
from engine.receptive_field import RF, receptive_fields
from engine.topk import EDGES, QUANTILE_LEVELS, ChannelStats
from engine.truncate import upto_module

PAD_GREY = 128.0  # fill of the part of a patch outside the image


@contextlib.contextmanager
def one_thread():
    """This thread's torch ops on one intra-op thread inside the block (also a decorator).

    For per-batch work made of many small ops (patch crops, overlays): each op forks and
    joins the OpenMP team, and with the decode pool busy on the same cores the joins wait.
    A 2,176-image patch pass: crops and overlays 7.0-7.9 s on two threads, 2.5 s on one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def activation_shapes(model: LoadedModel, layers: list[str]) -> dict[str, tuple[int, int, int]]:
    """(C, H, W) of each layer's output for one preprocessed image ([B, C] outputs give H = W = 1)."""
    size = model.preprocessing.crop
    acts = run_layers(model, torch.zeros(1, 3, size, size, device=model.device), layers)  # the pass-1 graph
    return {layer: tuple(a.shape[1:]) + (1,) * (4 - a.dim()) for layer, a in acts.items()}


_RECEPTIVE_FIELDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def model_receptive_fields(model: LoadedModel) -> dict:
    """`receptive_fields(model)` at its input size, traced once per loaded model and process."""
    if model not in _RECEPTIVE_FIELDS:
        _RECEPTIVE_FIELDS[model] = receptive_fields(model)
    return _RECEPTIVE_FIELDS[model]


def patch_geometry(rf: RF, crop: int, smallest: int = 32, largest: int = 112) -> tuple[int, int]:
    """(box side, patch size) of a layer: the RF squared (at most the image), and the side its
    patches are resampled to. A box wider than `largest` shrinks by a whole factor r, its side
    grown by less than r pixels to r x size, so each patch pixel is the mean of r x r image
    pixels (`extract_patches`), not a resampling."""
    side = crop if rf.is_global else min(max(rf.size), crop)
    if side <= largest:
        return side, max(side, smallest)
    r = -(-side // largest)
    size = -(-side // r)
    return r * size, size


def patch_size(rf: RF, crop: int) -> int:
    """The side every patch of a layer is resampled to (`patch_geometry`)."""
    return patch_geometry(rf, crop)[1]


def square_boxes(rf: RF, spatial: tuple[int, int], height: int, width: int) -> np.ndarray:
    """float [H', W', 4] (y0, x0, y1, x1) for every output position of a layer of shape `spatial`.

    Every box of a layer is a square of the side `patch_geometry` gives (the RF size, at most
    the image's): `rf.box` (clipped to the image), grown again on the side(s) where it was
    clipped. The grown part lies outside the image and is filled grey by `crop_boxes`, so
    all patches of a layer share one scale.
    """
    h_out, w_out = spatial
    side = patch_geometry(rf, max(height, width))[0]
    boxes = np.zeros((h_out, w_out, 4), np.float64)
    for y in range(h_out):  # H'·W' positions: a table, not a per-image loop
        for x in range(w_out):
            y0, x0, y1, x1 = rf.box(y, x, height, width)
            boxes[y, x] = (*_grow(y0, y1, side, rf.start[0] + y * rf.stride[0] < y0),
                           *_grow(x0, x1, side, rf.start[1] + x * rf.stride[1] < x0))
    return boxes[..., [0, 2, 1, 3]]


def _grow(lo: int, hi: int, side: int, clipped_at_start: bool) -> tuple[int, int]:
    """[lo, hi) grown to length `side`: backwards if the box was clipped at its start, else forwards."""
    return (hi - side, hi) if clipped_at_start else (lo, lo + side)


def crop_boxes(images: torch.Tensor, rows: np.ndarray, boxes: np.ndarray, size: int,
               fill: float = PAD_GREY) -> torch.Tensor:
    """Crop boxes (y0, x0, y1, x1) [M, 4] from images[rows] ([N, C, H, W] float) to [M, C, size, size].

    Pixels outside the image are `fill`. Bilinear sampling at pixel centres (`aligned=True`),
    averaging ceil(box / size) samples per output pixel, so a box of `size` pixels is copied exactly.
    """
    if len(rows) == 0:
        return images.new_zeros((0, images.shape[1], size, size))
    h, w = images.shape[-2:]
    margin = int(np.ceil(max(0.0, -boxes[:, 0].min(), -boxes[:, 1].min(), boxes[:, 2].max() - h,
                              boxes[:, 3].max() - w)))
    if margin:
        images = F.pad(images, (margin, margin, margin, margin), value=fill)
    rois = torch.tensor(np.column_stack([rows, boxes[:, 1] + margin, boxes[:, 0] + margin,
                                         boxes[:, 3] + margin, boxes[:, 2] + margin]), dtype=images.dtype)
    return roi_align(images, rois, output_size=size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)


def to_uint8_hwc(x: torch.Tensor) -> np.ndarray:
    """float [M, 3, H, W] in 0..255 -> uint8 [M, H, W, 3]."""
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu().numpy()


@one_thread()
def extract_patches(images: np.ndarray, rows: np.ndarray, yx: np.ndarray, boxes: np.ndarray,
                    size: int) -> np.ndarray:
    """uint8 patches [M, size, size, 3] of units at positions yx [M, 2] in images[rows] (uint8 [N, H, W, 3]).

    What `crop_boxes` gives, bit for bit, computed cheaply: for whole-pixel boxes of side
    r x `size` (every box `square_boxes` makes for a field of at least `size`), roi_align's
    r x r samples per patch pixel fall on pixel centres, so a patch is an r x r mean of
    pixels, summed in integers (r = 1: a copy). Other boxes (fields smaller than the patch,
    upsampled) go through `crop_boxes`, once per distinct (image, box).
    """
    box = boxes[yx[:, 0], yx[:, 1]]
    if len(box) == 0:
        return np.zeros((0, size, size, 3), np.uint8)
    side = box[:, 2:] - box[:, :2]
    if np.array_equal(box, np.round(box)) and (side == side[0, 0]).all() and side[0, 0] % size == 0:
        return _pooled_boxes(images, rows, box.astype(np.int64), size, int(side[0, 0]) // size)
    distinct, inverse = np.unique(np.column_stack([rows, box]), axis=0, return_inverse=True)
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    return to_uint8_hwc(crop_boxes(x, distinct[:, 0].astype(np.int64), distinct[:, 1:], size))[inverse.ravel()]


def _pooled_boxes(images: np.ndarray, rows: np.ndarray, box: np.ndarray, size: int, r: int) -> np.ndarray:
    """Whole-pixel boxes [M, 4] of side r x `size` from images[rows] as r x r pixel means,
    PAD_GREY outside the image (r = 1: copies)."""
    h, w = images.shape[1:3]
    margin = int(max(0, -box[:, :2].min(), (box[:, 2] - h).max(), (box[:, 3] - w).max()))
    used, which = np.unique(rows, return_inverse=True)
    padded = np.full((len(used), h + 2 * margin, w + 2 * margin, 3), int(PAD_GREY), np.uint8)
    padded[:, margin:margin + h, margin:margin + w] = images[used]
    side = r * size
    windows = np.stack([padded[k, y:y + side, x:x + side] for k, y, x in zip(which.ravel(), *(box[:, :2] + margin).T)])
    if r == 1:
        return windows
    x = torch.from_numpy(windows).view(len(rows), size, r, size, r, 3)
    wide = torch.int16 if r * r * 255 < 2 ** 15 else torch.int32
    rows_sum = x[:, :, 0].to(wide)
    for dy in range(1, r):
        rows_sum += x[:, :, dy]
    total = rows_sum[:, :, :, 0].clone()
    for dx in range(1, r):
        total += rows_sum[:, :, :, dx]
    # roi_align's mean of r x r integers, rounded as to_uint8_hwc rounds it (half to even)
    return torch.round(total.float() / (r * r)).to(torch.uint8).numpy()


def projection_windows(rf: RF, yx: np.ndarray, height: int, width: int) -> np.ndarray:
    """int [M, 4] (y0, x0, y1, x1): the part of the input a unit's projection is computed on.

    A unit's value and its input gradient depend only on the pixels of its receptive field,
    so the forward and backward pass can run on a window around it instead of the image,
    with the same numbers, if the window (a) contains the field, (b) starts at a multiple of
    the layer's stride (every layer's sampling grid then falls on the same pixels) and (c)
    starts at 0 / ends at the image's edge where the field is clipped there (so the network's
    zero padding is where it was). The windows of a layer have two sizes per axis, the
    field's size plus its start's offset on the stride grid (also used at the top/left
    border) and a slightly larger one at the bottom/right border, so they batch well. A
    field as large as the image (or global) gives the whole image.
    """
    return np.column_stack([*_window_1d(rf, 0, yx[:, 0], height), *_window_1d(rf, 1, yx[:, 1], width)])[
        :, [0, 2, 1, 3]]


def _window_1d(rf: RF, axis: int, pos: np.ndarray, extent: int) -> tuple[np.ndarray, np.ndarray]:
    """[lo, hi) per position along one axis; see `projection_windows`."""
    pos = np.asarray(pos, np.int64)
    if rf.is_global:
        return np.zeros_like(pos), np.full_like(pos, extent)
    size, stride, start = rf.size[axis], rf.stride[axis], rf.start[axis]
    side = size + start % stride
    if side >= extent:
        return np.zeros_like(pos), np.full_like(pos, extent)
    first = start + pos * stride
    at_end = first + size > extent
    lo = np.where(at_end, stride * ((extent - side) // stride), np.maximum(first, 0) // stride * stride)
    hi = np.where(at_end, extent, lo + side)
    return lo, hi


def project_units(model: LoadedModel, layer: str, images: np.ndarray, channels: np.ndarray, yx: np.ndarray,
                  boxes: np.ndarray, size: int, rule: str = "guided", rf: RF | None = None,
                  expected: np.ndarray | None = None, pixels: int = 32 * 224 * 224) -> np.ndarray:
    """Guided-backprop (or deconvnet) projection of unit (channel, y, x) of each image, cropped to its RF box.

    Row b of `images` (uint8 [B, H, W, 3]) is projected for channels[b] at yx[b]: the gradient
    of that one activation w.r.t. the input with the rule's ReLU backward, shown as grey (0)
    with the signed gradient scaled by its 99th percentile magnitude in the box. uint8 [B, size, size, 3].

    The pass runs on the fast form cut after the layer (engine/truncate.py), and with `rf`
    on each unit's `projection_windows` only, batched by window shape, about `pixels` input
    pixels per backward. `expected` (the unit's activation on the whole image, from the
    catalogue) checks each window: a unit whose value differs is projected on the whole image.
    """
    n, height, width = len(images), images.shape[1], images.shape[2]
    out = np.zeros((n, size, size, 3), np.uint8)
    if n == 0:
        return out
    name = model.resolve(layer)
    um = upto_module(model, (name,), for_grad=True)
    stride = np.array([1, 1]) if rf is None or rf.is_global else np.array(rf.stride)

    def project_on(rows: np.ndarray, windows: np.ndarray) -> np.ndarray:
        """Fill out[rows] from each row's window; the units' values on their windows."""
        values = np.zeros(len(rows), np.float32)
        shapes = windows[:, 2:] - windows[:, :2]
        for shape in np.unique(shapes, axis=0):
            same = np.flatnonzero((shapes == shape).all(1))
            chunk = max(1, pixels // int(shape[0] * shape[1]))
            for part in (same[s:s + chunk] for s in range(0, len(same), chunk)):
                r, offset = rows[part], windows[part, :2]
                crops = np.stack([images[i, a:a + shape[0], b:b + shape[1]] for i, (a, b) in zip(r, offset)])
                out[r], values[part] = _project(model, um, name, crops, channels[r], yx[r] - offset // stride,
                                                boxes[yx[r, 0], yx[r, 1]] - np.tile(offset, 2), size, rule)
        return values

    whole = np.tile([0, 0, height, width], (n, 1))
    values = project_on(np.arange(n), whole if rf is None else projection_windows(rf, yx, height, width))
    if rf is not None and expected is not None:  # a window that misses the catalogue's value: the whole image
        redo = np.flatnonzero(~np.isclose(values, expected, rtol=1e-3, atol=1e-3))
        if len(redo):
            project_on(redo, whole[redo])
    return out


def _project(model: LoadedModel, um, name: str, crops: np.ndarray, channels: np.ndarray, pos: np.ndarray,
             boxes: np.ndarray, size: int, rule: str) -> tuple[np.ndarray, np.ndarray]:
    """Projections of one batch of same-shaped inputs, and each unit's activation value."""
    x = model.preprocessing.normalize(torch.from_numpy(crops)).to(model.device)
    x.requires_grad_(True)
    with model.lock, torch.enable_grad(), relu_backward_rule(um.module, rule):
        out = um(x)[name]
        if out.dim() == 2:  # a [B, C] layer (the logits): one position, as the catalogue counts it
            out = out[:, :, None, None]
        rows = torch.arange(len(crops))
        value = out[rows, torch.as_tensor(channels), torch.as_tensor(pos[:, 0]), torch.as_tensor(pos[:, 1])]
        grad, = torch.autograd.grad(value.sum(), x)
    crops = crop_boxes(grad.detach().float().cpu(), np.arange(len(crops)), boxes, size, fill=0.0)
    scale = torch.quantile(crops.abs().flatten(1), 0.99, dim=1).clamp(min=1e-12).view(-1, 1, 1, 1)
    return to_uint8_hwc((0.5 + 0.5 * (crops / scale).clamp(-1, 1)) * 255), value.detach().float().cpu().numpy()


@one_thread()
def overlays(images: np.ndarray, rows: np.ndarray, maps: np.ndarray, size: int, alpha: float = 0.55) -> np.ndarray:
    """images[rows] (uint8 [N, H, W, 3]) with activation maps [M, h, w] as heat maps: uint8 [M, size, size, 3].

    Each map shows its positive part divided by its own maximum (a map never above 0 shows
    nothing), upsampled bilinearly and coloured with `inferno`.
    """
    if len(rows) == 0:
        return np.zeros((0, size, size, 3), np.uint8)
    heat = torch.from_numpy(np.asarray(maps, np.float32))[:, None]
    heat = F.interpolate(heat, size=(size, size), mode="bilinear", align_corners=False)[:, 0].clamp(min=0)
    peak = heat.flatten(1).max(dim=1).values.view(-1, 1, 1)
    level = torch.where(peak > 0, heat / peak.clamp(min=1e-12), torch.zeros_like(heat))
    colour = torch.from_numpy(inferno_lut())[(level * 255).round().long()]  # [M, size, size, 3]
    img = torch.from_numpy(np.ascontiguousarray(images[rows])).permute(0, 3, 1, 2).float()
    img = F.interpolate(img, size=(size, size), mode="area").permute(0, 2, 3, 1)
    return ((1 - alpha) * img + alpha * colour).round().clamp(0, 255).to(torch.uint8).numpy()


def class_selectivity(class_means: np.ndarray) -> np.ndarray:
    """Morcos et al. (2018) class selectivity index per unit, [C] in [0, 1].

    (mu_max - mu_rest) / (mu_max + mu_rest) over the classes that have images, where mu_max
    is the largest class-conditional mean activity and mu_rest the mean of the others. An
    image's activity is the spatial mean of the unit's rectified map (ChannelStats.class_means;
    Morcos et al. average the map of a post-ReLU unit): the index assumes it non-negative. A
    unit that is never positive gets 0, and fewer than two classes give NaN.
    """
    present = ~np.isnan(class_means).all(axis=0)
    means = np.clip(class_means[:, present], 0, None)
    if means.shape[1] < 2:
        return np.full(class_means.shape[0], np.nan)
    top = means.max(axis=1)
    rest = (means.sum(axis=1) - top) / (means.shape[1] - 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(top + rest > 0, (top - rest) / (top + rest), 0.0)


def dead_units(max_score: np.ndarray, rate: np.ndarray) -> np.ndarray:
    """Units that never fire on the dataset: score never above 0 (their feature visualisation is blank)."""
    return (max_score <= 0) | (rate == 0)


def catalog_arrays(state: ChannelStats) -> dict[str, tuple[np.ndarray, dict]]:
    """The store arrays of one layer's reduced state, {path under catalog/<layer>/: (array, attrs)}."""
    std, rate = state.std, state.rate
    selectivity = class_selectivity(state.class_means())
    return {
        "top_value": (state.top_value, {"what": "score (spatial max), best first; -inf: fewer images than K"}),
        "top_index": (state.top_index, {"what": "image index (manifest row); -1: empty slot"}),
        "top_yx": (state.top_yx, {"what": "argmax position (y, x) in the layer's output"}),
        "bottom_value": (state.bottom_value, {"what": "score, lowest first; +inf: empty slot"}),
        "bottom_index": (state.bottom_index, {"what": "image index; -1: empty slot"}),
        "bottom_yx": (state.bottom_yx, {"what": "argmax position (y, x)"}),
        "top1_map": (state.top1_map.astype(np.float16), {"what": "activation map of each unit's top-1 image"}),
        "stats/mean": (state.mean.astype(np.float32), {"what": "mean score"}),
        "stats/std": (std.astype(np.float32), {"what": "standard deviation of the score (population)"}),
        "stats/min": (state.min, {"what": "lowest score"}),
        "stats/max": (state.max, {"what": "highest score = highest activation"}),
        "stats/rate": (rate.astype(np.float32), {
            "what": "firing rate: fraction of the activations (every position of every image) above 0"}),
        "stats/dead": (dead_units(state.max, rate), {"what": "never fires on this dataset (max <= 0)"}),
        "stats/quantiles": (state.quantiles().astype(np.float32),
                            {"levels": list(QUANTILE_LEVELS), "what": "score quantiles from the histogram"}),
        "stats/hist": (state.hist, {"edges": EDGES.tolist(), "what": "score histogram; bin b: edges[b-1] <= v < edges[b]"}),
        "stats/class_mean": (state.class_means().astype(np.float32), {"what": "mean activity per class: spatial mean of the rectified map (NaN: no image)"}),
        "stats/selectivity": (selectivity.astype(np.float32), {"what": "class selectivity index (Morcos et al. 2018)"}),
    }


def stats_summary(state: ChannelStats) -> dict:
    """Attrs of `catalog/<layer>/stats`: counts, quantiles and class selectivity per unit."""
    q = state.quantiles()
    selectivity = class_selectivity(state.class_means())
    return {"images": int(state.count), "score": "spatial max of the layer output per image",
            "quantile_levels": list(QUANTILE_LEVELS),
            "quantiles": [[_finite(v) for v in row] for row in np.round(q, 6)],
            "class_selectivity": [_finite(v) for v in np.round(selectivity, 6)],
            "class_selectivity_definition": "Morcos et al. 2018, (mu_max - mu_rest) / (mu_max + mu_rest) "
                                            "on class means of the activity, the spatial mean of the rectified map",
            "dead_units": int(dead_units(state.max, state.rate).sum())}


def _finite(v: float) -> float | None:
    return float(v) if np.isfinite(v) else None
