"""A dataset's feature space in one call: FAISS index, kNN graph, recall, PCA, t-SNE, image grid.

Also the vectors that go in: a layer's pooled activations for new images (the `neighbors`
query) and pixel-space vectors (downscaled thumbnails) for the classic pixel-vs-feature
comparison of the lecture notes (21.2.1).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from engine import faiss_index as fx
from engine import maps
from engine.inference import pooled, run_model
from engine.models import LoadedModel

PIXEL_SIDE = 32  # pixel-space vectors: 32 x 32 x 3 = 3072 values in [0, 1]


def layer_vectors(model: LoadedModel, images_uint8: torch.Tensor, layer: str = "fc7") -> np.ndarray:
    """float32 [B, D]: `layer`'s output for uint8 [B, H, W, 3] crops, globally average-pooled
    when spatial (the same definition as the shared forward pass's `/features/<layer>`)."""
    _, acts = run_model(model, model.preprocessing.normalize(images_uint8), [layer])
    return pooled(acts[layer]).float().cpu().numpy()


def pixel_vectors(thumbs: np.ndarray, side: int = PIXEL_SIDE) -> np.ndarray:
    """uint8 [N, h, w, 3] thumbnails -> float32 [N, side*side*3] in [0, 1] (area downscaling)."""
    x = torch.from_numpy(np.ascontiguousarray(thumbs)).permute(0, 3, 1, 2).float()
    if x.shape[-1] != side or x.shape[-2] != side:
        x = F.interpolate(x, size=(side, side), mode="area")
    return (x.permute(0, 2, 3, 1).reshape(len(x), -1) / 255.0).numpy().astype(np.float32)


@dataclass
class Space:
    """Everything computed about one set of vectors; positions index the input rows."""

    index: object  # the searchable FAISS index
    kind: str
    metric: str
    knn_index: np.ndarray  # int64 [n, k], positions of the k nearest other rows
    knn_dist: np.ndarray  # float32 [n, k], Euclidean in the indexed space
    centre: np.ndarray | None  # cosine: the mean the vectors were centred on (queries need it)
    recall: float | None  # recall@10 of the graph against exact search (1.0 for flat)
    pca: np.ndarray | None = None  # float32 [n, 2]
    pca_explained: list[float] = field(default_factory=list)
    tsne: np.ndarray | None = None  # float32 [n, 2]
    trust_pca: float | None = None
    trust_tsne: float | None = None
    grid: np.ndarray | None = None  # int64 [rows, cols] of positions, -1 empty
    timings: dict[str, float] = field(default_factory=dict)


@contextlib.contextmanager
def _timed(timings: dict[str, float], name: str) -> Iterator[None]:
    t0 = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = round(time.perf_counter() - t0, 3)


def feature_space(vectors: np.ndarray, kind: str = "auto", metric: str = "l2", k: int = 10,
                  with_maps: bool = True, perplexity: float | None = None, seed: int = 0, n_jobs: int = 1,
                  recall_k: int = 10, grid_cells: int = 1600) -> Space:
    """Index `vectors`, build their kNN graph (self excluded) and, with `with_maps`, PCA and t-SNE.

    One FAISS search serves both the stored graph (k) and the t-SNE affinities
    (`maps.tsne_neighbours`; `perplexity` None: uniform ones, see `maps.tsne_map`).
    Approximate indices are measured against exact search (recall@`recall_k`).
    Cosine spaces are centred on the dataset mean first (`faiss_index.cosine_centre`): the
    index, graph, maps and their trustworthiness all live in that one space.
    """
    centre = fx.cosine_centre(vectors, metric)
    x = fx.prepare(vectors, metric, centre)
    n = len(x)
    timings: dict[str, float] = {}
    kind = fx.choose_kind(n, kind)
    with _timed(timings, "index"):
        index = fx.build_index(x, kind, metric, seed)
    make_maps = with_maps and n >= maps.MIN_MAP_POINTS
    width = max(k, recall_k, maps.tsne_neighbours(n, perplexity) if make_maps else 0)
    with _timed(timings, "knn"):
        ids, dist = fx.knn_graph(index, x, width, metric) if n > 1 else (np.zeros((n, 0), np.int64),
                                                                          np.zeros((n, 0), np.float32))
    with _timed(timings, "recall"):
        recall = 1.0 if kind == "flat" or n < 2 else fx.measure_recall(ids, x, metric, recall_k, seed=seed)
    k = min(k, ids.shape[1])
    space = Space(index, kind, metric, ids[:, :k].copy(), dist[:, :k].copy(), centre, recall, timings=timings)
    if not make_maps:
        return space
    with _timed(timings, "pca"):
        space.pca, space.pca_explained = maps.pca_2d(x, seed)
    with _timed(timings, "tsne"):
        space.tsne = maps.tsne_map(index, (ids, dist), metric, space.pca, perplexity, seed, n_jobs)
    with _timed(timings, "trustworthiness"):
        space.trust_pca = maps.trustworthiness(x, space.pca, 10, seed=seed)
        space.trust_tsne = maps.trustworthiness(x, space.tsne, 10, seed=seed)
    with _timed(timings, "grid"):
        space.grid = maps.grid_assignment(space.tsne, grid_cells, seed)
    return space
