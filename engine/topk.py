"""Mergeable per-channel statistics of one layer: the state behind the neuron catalogue.

The score of image i for channel c is the maximum over spatial positions of the layer's
output (DESIGN.md, "Top-K semantics"). `ChannelStats` keeps, per channel:
  top-K / bottom-K scores with image index and argmax position (best first, ties to the
  lower image index), the activation map of the current top-1 image, count, mean and
  variance of the score (merged with Chan's parallel formula), min, max, how many of its
  activations (every position of every image) are above 0, a log-spaced histogram of the
  score (a quantile sketch that merges exactly: counts add) and per-class sums of the unit's
  activity, the spatial mean of its rectified map (Morcos et al. 2018 average a feature map;
  the class means behind class selectivity).
Everything is O(C·(K + bins + classes + H·W)), whatever the number of images, and merging
two states gives the state of the concatenated streams, in any order or tree: top-K, counts,
histogram and extremes exactly, means and variances up to float64 rounding.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch

# Histogram of scores: bins between ±10^LOG_RANGE[0] and ±10^LOG_RANGE[1], BINS_PER_DECADE
# per decade (relative bin width 7.5%), one bin around zero and two overflow bins.
LOG_RANGE = (-4, 3)
BINS_PER_DECADE = 32
QUANTILE_LEVELS = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
STATE_FORMAT = 3  # part of every catalogue shard's fingerprint: a state saved in an older format is computed again


def histogram_edges() -> np.ndarray:
    """Sorted bin edges, symmetric around 0; bin b holds edges[b-1] <= v < edges[b]."""
    lo, hi = LOG_RANGE
    pos = np.logspace(lo, hi, (hi - lo) * BINS_PER_DECADE + 1)
    return np.concatenate([-pos[::-1], pos])


EDGES = histogram_edges()
N_BINS = len(EDGES) + 1


def _select(values: np.ndarray, index: np.ndarray, yx: np.ndarray, k: int, descending: bool):
    """Per row, the k best (values, index, yx) ordered by value then by lower image index."""
    key = -values if descending else values
    order = np.lexsort((index, key), axis=1)[:, :k]
    return (np.take_along_axis(values, order, 1), np.take_along_axis(index, order, 1),
            np.take_along_axis(yx, order[..., None], 1), order)


@dataclass
class ChannelStats:
    """Statistics of the C channels of one layer; see the module docstring."""

    top_value: np.ndarray  # float32 [C, K]; -inf in unfilled slots
    top_index: np.ndarray  # int64 [C, K]; -1 in unfilled slots
    top_yx: np.ndarray  # int32 [C, K, 2]
    bottom_value: np.ndarray  # float32 [C, Kb]; +inf in unfilled slots
    bottom_index: np.ndarray  # int64 [C, Kb]
    bottom_yx: np.ndarray  # int32 [C, Kb, 2]
    top1_map: np.ndarray  # float32 [C, H, W]: the activation map of each channel's top-1 image
    count: np.ndarray  # int64 [] images seen
    mean: np.ndarray  # float64 [C] mean score
    m2: np.ndarray  # float64 [C] sum of squared deviations of the score
    min: np.ndarray  # float32 [C]
    max: np.ndarray  # float32 [C]
    positive: np.ndarray  # int64 [C] activations (positions x images) above 0
    hist: np.ndarray  # int64 [C, N_BINS]
    class_sum: np.ndarray  # float64 [n_classes, C] sum of the activity (mean of the rectified map) of each class's images
    class_count: np.ndarray  # int64 [n_classes]

    @classmethod
    def empty(cls, channels: int, spatial: tuple[int, int], top_k: int, bottom_k: int = 0,
              n_classes: int = 1000) -> "ChannelStats":
        c = channels
        return cls(
            top_value=np.full((c, top_k), -np.inf, np.float32), top_index=np.full((c, top_k), -1, np.int64),
            top_yx=np.full((c, top_k, 2), -1, np.int32),
            bottom_value=np.full((c, bottom_k), np.inf, np.float32),
            bottom_index=np.full((c, bottom_k), -1, np.int64), bottom_yx=np.full((c, bottom_k, 2), -1, np.int32),
            top1_map=np.zeros((c, *spatial), np.float32), count=np.zeros((), np.int64),
            mean=np.zeros(c, np.float64), m2=np.zeros(c, np.float64),
            min=np.full(c, np.inf, np.float32), max=np.full(c, -np.inf, np.float32),
            positive=np.zeros(c, np.int64), hist=np.zeros((c, N_BINS), np.int64),
            class_sum=np.zeros((n_classes, c), np.float64), class_count=np.zeros(n_classes, np.int64),
        )

    @property
    def channels(self) -> int:
        return self.top_value.shape[0]

    @property
    def spatial(self) -> tuple[int, int]:
        return tuple(self.top1_map.shape[1:])

    # ---- updating ---------------------------------------------------------------------
    def add(self, activations: torch.Tensor | np.ndarray, image_indices: np.ndarray,
            labels: np.ndarray | None = None) -> None:
        """Fold in one batch: activations [B, C, H, W] (or [B, C]) of images `image_indices`.

        `labels` are class indices (-1: no class) for the per-class means.
        """
        if isinstance(activations, torch.Tensor):
            activations = activations.detach().float().cpu().numpy()
        a = np.asarray(activations, np.float32)
        b, c = a.shape[:2]
        if c != self.channels:
            raise ValueError(f"activations have {c} channels, the state {self.channels}")
        if b == 0:
            return
        flat = a.reshape(b, c, -1)
        if flat.shape[2] != self.top1_map.shape[1] * self.top1_map.shape[2]:
            raise ValueError(f"activations are {a.shape[2:]}, the state expects {self.spatial}")
        pos = flat.argmax(axis=2)  # first maximum in row-major order
        score = np.take_along_axis(flat, pos[..., None], 2)[..., 0]  # [B, C]
        width = self.top1_map.shape[2]
        yx = np.stack([pos // width, pos % width], axis=-1).astype(np.int32).transpose(1, 0, 2)  # [C, B, 2]
        index = np.broadcast_to(np.asarray(image_indices, np.int64), (c, b))
        labels = np.full(b, -1, np.int64) if labels is None else np.asarray(labels, np.int64)
        batch = ChannelStats(
            top_value=score.T, top_index=index, top_yx=yx, bottom_value=score.T, bottom_index=index,
            bottom_yx=yx, top1_map=flat.transpose(1, 0, 2), count=np.array(b, np.int64),
            mean=score.mean(0, dtype=np.float64),
            m2=((score - score.mean(0, dtype=np.float64)) ** 2).sum(0), min=score.min(0), max=score.max(0),
            positive=np.count_nonzero(flat > 0, axis=(0, 2)).astype(np.int64), hist=_histogram(score),
            class_sum=_class_sums(np.maximum(flat, 0).mean(axis=2), labels, self.class_sum.shape[0]),
            class_count=np.bincount(labels[labels >= 0], minlength=self.class_count.shape[0]).astype(np.int64),
        )
        self._absorb(batch, maps_are_per_row=True)

    def merge(self, other: "ChannelStats") -> "ChannelStats":
        """Fold `other` (the state of a disjoint set of images) into this one; returns self."""
        if other.top_value.shape != self.top_value.shape or other.spatial != self.spatial:
            raise ValueError("cannot merge states of different layers or K")
        self._absorb(other, maps_are_per_row=False)
        return self

    def _absorb(self, o: "ChannelStats", maps_are_per_row: bool) -> None:
        k, kb = self.top_value.shape[1], self.bottom_value.shape[1]
        tv, ti, ty, order = _select(np.concatenate([self.top_value, o.top_value], 1),
                                    np.concatenate([self.top_index, o.top_index], 1),
                                    np.concatenate([self.top_yx, o.top_yx], 1), k, descending=True)
        # channels whose top-1 now comes from `o` take its activation map
        changed = np.flatnonzero(order[:, 0] >= k) if k else np.zeros(0, np.int64)
        if len(changed):
            if maps_are_per_row:  # o.top1_map is [C, B, H*W]: one map per batch image
                maps = o.top1_map[changed, order[changed, 0] - k]
            else:
                maps = o.top1_map[changed]
            self.top1_map[changed] = maps.reshape(len(changed), *self.spatial)
        self.top_value, self.top_index, self.top_yx = tv, ti, ty
        self.bottom_value, self.bottom_index, self.bottom_yx, _ = _select(
            np.concatenate([self.bottom_value, o.bottom_value], 1),
            np.concatenate([self.bottom_index, o.bottom_index], 1),
            np.concatenate([self.bottom_yx, o.bottom_yx], 1), kb, descending=False)
        na, nb = int(self.count), int(o.count)
        n = na + nb
        if nb:
            delta = o.mean - self.mean
            self.mean = self.mean + delta * (nb / n)
            self.m2 = self.m2 + o.m2 + delta ** 2 * (na * nb / n)
        self.count = np.array(n, np.int64)
        self.min = np.minimum(self.min, o.min)
        self.max = np.maximum(self.max, o.max)
        self.positive = self.positive + o.positive
        self.hist = self.hist + o.hist
        self.class_sum = self.class_sum + o.class_sum
        self.class_count = self.class_count + o.class_count

    # ---- derived statistics -----------------------------------------------------------
    @property
    def std(self) -> np.ndarray:
        """Population standard deviation of the score (NaN before any image)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.sqrt(self.m2 / self.count) if self.count else np.full(self.channels, np.nan)

    @property
    def rate(self) -> np.ndarray:
        """Firing rate: the fraction of the unit's activations, over every position of every
        image, above 0. (The fraction of images whose score is above 0 is ~1 for nearly every
        unit of a convolutional layer: some position of every image excites it.)"""
        positions = int(self.count) * int(np.prod(self.spatial))
        return self.positive / positions if positions else np.full(self.channels, np.nan)

    def class_means(self) -> np.ndarray:
        """[C, n_classes] mean activity (spatial mean of the rectified map) per class; NaN for
        classes with no image."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return (self.class_sum / self.class_count[:, None]).T

    def quantiles(self, levels=QUANTILE_LEVELS) -> np.ndarray:
        """[C, Q] quantiles of the score estimated from the histogram (within one bin width).

        Linear interpolation inside the bin holding the rank, clamped to the exact min/max.
        """
        levels = np.asarray(levels, np.float64)
        out = np.full((self.channels, len(levels)), np.nan)
        if not self.count:
            return out
        lo_edge = np.concatenate([[-np.inf], EDGES])
        hi_edge = np.concatenate([EDGES, [np.inf]])
        cum = np.cumsum(self.hist, axis=1)
        for q_i, q in enumerate(levels):
            rank = q * (int(self.count) - 1) + 0.5  # position of the quantile, in "images"
            b = (cum < rank).sum(axis=1)  # bin holding it
            before = np.where(b > 0, np.take_along_axis(cum, np.maximum(b - 1, 0)[:, None], 1)[:, 0], 0)
            inside = self.hist[np.arange(self.channels), b]
            lo = np.maximum(lo_edge[b], self.min)
            hi = np.minimum(hi_edge[b], self.max)
            frac = np.clip((rank - before) / np.maximum(inside, 1), 0, 1)
            out[:, q_i] = lo + frac * (hi - lo)
        return out

    # ---- persistence ------------------------------------------------------------------
    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain arrays (npz-able, no pickle) that `from_arrays` turns back into the state."""
        return {f.name: np.asarray(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> "ChannelStats":
        missing = [f.name for f in fields(cls) if f.name not in arrays]
        if missing:
            raise ValueError(f"state arrays lack {missing}")
        return cls(**{f.name: np.array(arrays[f.name]) for f in fields(cls)})

    def equals(self, other: "ChannelStats", rtol: float = 1e-9) -> bool:
        """Same state: exact for top-K, counts and extremes; float sums up to `rtol`."""
        approx = {"mean", "m2", "class_sum"}
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if a.shape != b.shape:
                return False
            same = np.allclose(a, b, rtol=rtol, atol=1e-9, equal_nan=True) if f.name in approx \
                else np.array_equal(a, b, equal_nan=np.issubdtype(a.dtype, np.floating))
            if not same:
                return False
        return True


def _histogram(score: np.ndarray) -> np.ndarray:
    """[C, N_BINS] counts of a batch's scores [B, C]."""
    b, c = score.shape
    bins = np.searchsorted(EDGES, score, side="right")  # [B, C] in 0..len(EDGES)
    flat = (np.arange(c)[None, :] * N_BINS + bins).ravel()
    return np.bincount(flat, minlength=c * N_BINS).reshape(c, N_BINS).astype(np.int64)


def _class_sums(activity: np.ndarray, labels: np.ndarray, n_classes: int) -> np.ndarray:
    sums = np.zeros((n_classes, activity.shape[1]), np.float64)
    known = labels >= 0
    np.add.at(sums, labels[known], activity[known].astype(np.float64))
    return sums


# ---- a state per layer -------------------------------------------------------------------
LayerStates = dict[str, ChannelStats]


def states_to_arrays(states: LayerStates) -> dict[str, np.ndarray]:
    """Flatten {layer: state} into npz-able arrays keyed `<layer>:<field>`."""
    return {f"{layer}:{k}": v for layer, s in states.items() for k, v in s.to_arrays().items()}


def states_from_arrays(arrays: dict[str, np.ndarray]) -> LayerStates:
    by_layer: dict[str, dict[str, np.ndarray]] = {}
    for key, value in arrays.items():
        layer, _, name = key.rpartition(":")
        by_layer.setdefault(layer, {})[name] = value
    return {layer: ChannelStats.from_arrays(a) for layer, a in by_layer.items()}


def merge_states(parts: list[LayerStates]) -> LayerStates:
    """Merge the states of disjoint image sets, layer by layer, into a new state: the parts
    stay as they were, so a merge task that runs again gets the same result."""
    out = {layer: ChannelStats.from_arrays(state.to_arrays()) for layer, state in parts[0].items()}
    for part in parts[1:]:
        for layer, state in part.items():
            out[layer].merge(state)
    return out
