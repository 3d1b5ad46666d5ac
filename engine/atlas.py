"""Numpy pictures and summaries of a catalogue, shared by the catalogue job and the neuron atlas
(the report), which must not need torch: grids of activation maps and of first-layer
filters, the inferno colour map, the classes of a unit's top images."""

from __future__ import annotations

import functools

import numpy as np


@functools.cache
def inferno_lut() -> np.ndarray:
    """float32 [256, 3] in 0..255: matplotlib's `inferno` colour map as a lookup table."""
    from matplotlib import colormaps

    return (colormaps["inferno"](np.arange(256))[:, :3] * 255.0).astype(np.float32)


ACTIVATION_TILE = 28  # pixels per map in `activation_grid` (at least; a whole multiple of the map's size)
ACTIVATION_WIDTH = 480  # pixels a grid of maps may span (fewer columns for larger maps)
ACTIVATION_GAP = 2


def activation_layout(c: int, h: int, w: int) -> tuple[int, int]:
    """(pixels per map cell, tiles per row) of the `activation_grid` of `c` maps of h x w."""
    scale = max(1, ACTIVATION_TILE // max(h, w))
    return scale, max(1, min(c, max(4, ACTIVATION_WIDTH // (w * scale + ACTIVATION_GAP))))


NEGATIVE_BLUE = np.array([70.0, 150.0, 255.0], np.float32)  # the colour of a map's lowest level below zero


def activation_grid(maps: np.ndarray, peak: np.ndarray) -> np.ndarray:
    """Every unit's activation map [C, h, w] on one image as a uint8 RGB grid (`activation_layout`, unit order).

    Each map is divided by `peak[c]` (the unit's highest score on the dataset, so a dark tile is
    a unit this image barely drives): the part above zero in `inferno`, black to yellow; the part
    below zero, which linear-bottleneck outputs (EfficientNet's blocks) hold as much of as above
    it, from black to blue, clipped at -peak. A unit never above 0 on the dataset has its own
    map's largest |value| as the scale. Each map cell is a block of pixels (no smoothing: the
    layer's resolution)."""
    c, h, w = maps.shape
    scale, cols = activation_layout(c, h, w)
    maps = np.asarray(maps, np.float32)
    peak = np.asarray(peak, np.float32)
    own = np.abs(maps).reshape(c, -1).max(1)
    level = maps / np.maximum(np.where(peak > 0, peak, own), 1e-12)[:, None, None]
    colour = inferno_lut()[np.round(np.clip(level, 0, 1) * 255).astype(np.int64)]  # [C, h, w, 3]
    below = np.clip(-level, 0, 1)[..., None]
    colour = np.where(below > 0, below * NEGATIVE_BLUE, colour)
    tiles = np.repeat(np.repeat(colour, scale, 1), scale, 2)
    return tile_grid(tiles, cols, ACTIVATION_GAP, fill=255.0).round().astype(np.uint8)


def tile_grid(tiles: np.ndarray, cols: int, gap: int, fill: float) -> np.ndarray:
    """Tiles [N, th, tw, 3] laid out row by row, `cols` per row, `gap` pixels of `fill` around each."""
    n, th, tw = tiles.shape[:3]
    rows = int(np.ceil(n / cols))
    grid = np.full((rows * (th + gap) + gap, cols * (tw + gap) + gap, 3), fill, np.float32)
    for i, (x0, y0, x1, y1) in enumerate(tile_boxes(n, th, tw, cols, gap)):
        grid[y0:y1, x0:x1] = tiles[i]
    return grid


def tile_boxes(n: int, th: int, tw: int, cols: int, gap: int) -> list[tuple[int, int, int, int]]:
    """(x0, y0, x1, y1) of each tile of `tile_grid` (for image maps linking tiles to pages)."""
    return [(gap + q * (tw + gap), gap + r * (th + gap), gap + q * (tw + gap) + tw, gap + r * (th + gap) + th)
            for r, q in (divmod(i, cols) for i in range(n))]


def filter_grid(weight: np.ndarray, cell: int = 28, gap: int = 2) -> np.ndarray:
    """First-layer filters [O, I, kh, kw] as a uint8 RGB grid, each filter min-max normalised on its own.

    Three input channels are shown as colour, any other number as their mean in grey.
    """
    w = np.asarray(weight, np.float32)
    o, i, kh, kw = w.shape
    w = w if i == 3 else np.repeat(w.mean(1, keepdims=True), 3, 1)
    lo = w.reshape(o, -1).min(1)[:, None, None, None]
    hi = w.reshape(o, -1).max(1)[:, None, None, None]
    w = (w - lo) / np.maximum(hi - lo, 1e-12)
    scale = max(1, cell // max(kh, kw))
    tiles = np.repeat(np.repeat(w.transpose(0, 2, 3, 1), scale, 1), scale, 2)  # [O, kh*s, kw*s, 3]
    return (tile_grid(tiles, int(np.ceil(np.sqrt(o))), gap, fill=1.0) * 255).round().astype(np.uint8)


def top_classes(top_index: np.ndarray, labels: np.ndarray, n: int = 3) -> list[list[tuple[str, int]]]:
    """Per unit, the `n` most frequent labels among its top-K images, with counts (ties by name)."""
    out = []
    for row in top_index:
        found = labels[row[row >= 0]]
        found = found[np.array([x is not None for x in found], bool)] if len(found) else found
        names, counts = np.unique(found.astype(str), return_counts=True) if len(found) else ([], [])
        order = sorted(zip(names, counts), key=lambda t: (-t[1], t[0]))[:n]
        out.append([(str(a), int(b)) for a, b in order])
    return out
