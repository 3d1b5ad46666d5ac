"""2-D maps of a feature space: PCA, t-SNE (openTSNE on a FAISS kNN graph), placing new points
on a map, trustworthiness, and snapping a map to an image grid (Karpathy's t-SNE grids).

openTSNE builds its affinities from a kNN index; `FaissKNN` hands it the graph FAISS already
computed, and answers queries for new points from the same FAISS index, so the map scales
with the index (exact, IVF or HNSW) rather than with openTSNE's own neighbour search.
"""

from __future__ import annotations

import numpy as np
from scipy import sparse
from openTSNE import TSNE, TSNEEmbedding, affinity, initialization
from openTSNE.nearest_neighbors import KNNIndex

from engine.faiss_index import search

MIN_MAP_POINTS = 5  # t-SNE and trustworthiness need a few points to mean anything
# t-SNE iterations after the 250 early-exaggeration ones: 1000 in all, the reference schedule
# (van der Maaten's bhtsne, scikit-learn's max_iter); openTSNE's own default stops at 750
TSNE_ITERATIONS = 750
# Interpolation points per box of openTSNE's FFT gradients (used from 10,000 points up):
# 2 instead of its default 3 halves the repulsive-force cost (11 vs 23 ms of CPU per
# iteration at N=20,000), which with the attractive forces is the whole optimisation.
# The repulsion is less exact (8.9% vs 2.4% relative error against the exact sum on a
# converged 20,000-point map) but the maps are as good: trustworthiness@10 0.9934 vs 0.9935
# on bench/embed.py's mixture and 0.9369 vs 0.9336 on a harder one (bench notes in RESULTS.md)
FFT_INTERPOLATION_POINTS = 2


class FaissKNN(KNNIndex):
    """openTSNE's kNN-index interface over a FAISS index (and its precomputed graph)."""

    VALID_METRICS = ["euclidean"]

    def __init__(self, index, metric: str, graph: tuple[np.ndarray, np.ndarray] | None = None):
        # KNNIndex.__init__ wants the raw data; FAISS already holds it
        self.index = index
        self.faiss_metric = metric
        self.graph = graph
        self.n_samples = int(index.ntotal)
        self.k = int(graph[0].shape[1]) if graph is not None else 0
        self.metric = "euclidean"
        self.n_jobs = 1
        self.verbose = False

    def build(self):
        if self.graph is None:
            raise RuntimeError("FaissKNN was made for queries only (no graph)")
        return self.graph

    def query(self, query, k):
        return search(self.index, np.asarray(query, dtype=np.float32), k, self.faiss_metric)


class MapReference(affinity.PerplexityBasedNN):
    """Affinities of new points to an existing map, without recomputing the map's own P.

    `TSNEEmbedding.transform` only calls `to_new` (which queries the FAISS index), so a
    saved map plus its saved index are enough to place new images on it.
    """

    def __init__(self, knn: FaissKNN, perplexity: float = 30.0, n_jobs: int = 1):
        self.P = sparse.csr_matrix((knn.n_samples, knn.n_samples))  # empty: the map is already fit
        self.knn_index = knn
        self.perplexity = perplexity
        self.effective_perplexity_ = perplexity
        self.symmetrize = True
        self.n_jobs = n_jobs
        self.verbose = False
        self.knn_kwargs = None


def pca_2d(x: np.ndarray, seed: int = 0) -> tuple[np.ndarray, list[float]]:
    """First two principal components (deterministic signs) and their explained variance ratios."""
    from sklearn.decomposition import PCA

    pca = PCA(n_components=2, random_state=seed)
    xy = pca.fit_transform(np.asarray(x, dtype=np.float32))
    return xy.astype(np.float32), [float(v) for v in pca.explained_variance_ratio_]


# Neighbours per point of the default (uniform) t-SNE affinities: Böhm, Berens & Kobak (JMLR
# 2022) show t-SNE on a binary 15-NN graph gives maps like perplexity 30's at a sixth of the
# neighbours. On every cosine space of bench/tsne_affinities.py it keeps neighbourhoods as well
# or better: trustworthiness@10 of the shared images' fc7 in the embed job 0.839-0.847 vs
# perplexity 30's 0.80-0.81, of their pooled _blocks.5/10/15 0.936/0.944/0.876 vs
# 0.919/0.933/0.839, equal on scikit-learn's digits and bench/embed.py's mixture (RESULTS.md).
UNIFORM_NEIGHBOURS = 15


def tsne_perplexity(n: int, perplexity: float) -> float:
    """The perplexity asked for, capped at (n - 1) / 3 because Gaussian affinities use
    3 * perplexity neighbours."""
    return float(max(1.0, min(perplexity, (n - 1) / 3.0)))


def tsne_neighbours(n: int, perplexity: float | None = None, uniform_k: int = UNIFORM_NEIGHBOURS) -> int:
    """How many neighbours per point the t-SNE affinities use: `uniform_k` for uniform
    affinities (`perplexity` None, the default), 3 * perplexity for Gaussian ones. Uniform
    ones take at most half the other points: on all of them every pair weighs the same, and
    t-SNE's best map is every point on one spot."""
    if perplexity is None:
        return int(max(1, min(uniform_k, (n - 1) // 2)))
    return int(min(n - 1, int(3 * tsne_perplexity(n, perplexity))))


def describe_affinities(n: int, perplexity: float | None, uniform_k: int = UNIFORM_NEIGHBOURS) -> str:
    """What the affinities of a map of `n` points were (after the caps for small n), for the
    store and the report."""
    if perplexity is None:
        return f"uniform on the {tsne_neighbours(n, None, uniform_k)}-NN graph"
    return f"Gaussian, perplexity {tsne_perplexity(n, perplexity):g}"


def tsne_map(index, graph: tuple[np.ndarray, np.ndarray], metric: str, init_xy: np.ndarray,
             perplexity: float | None = None, seed: int = 0, n_jobs: int = 1, n_iter: int = TSNE_ITERATIONS,
             uniform_k: int = UNIFORM_NEIGHBOURS) -> np.ndarray:
    """openTSNE on the given kNN graph (at least `tsne_neighbours` per point), PCA-initialised.

    Affinities: uniform over each point's `uniform_k` nearest (symmetrised by max)
    unless a `perplexity` asks for Gaussian ones (van der Maaten's t-SNE; 30 is the usual value).
    Gradients by Barnes-Hut below 10,000 points and by FFT interpolation above (openTSNE's
    choice, O(N) per iteration; `FFT_INTERPOLATION_POINTS`); learning rate N / exaggeration
    (openTSNE's "auto", Belkina et al. 2019).
    """
    n = len(init_xy)
    k = tsne_neighbours(n, perplexity, uniform_k)
    ids, dist = graph
    knn = FaissKNN(index, metric, (np.ascontiguousarray(ids[:, :k]), np.ascontiguousarray(dist[:, :k], dtype=np.float64)))
    if perplexity is None:
        aff = affinity.Uniform(knn_index=knn, n_jobs=n_jobs, random_state=seed)
    else:
        aff = affinity.PerplexityBasedNN(knn_index=knn, perplexity=tsne_perplexity(n, perplexity), n_jobs=n_jobs,
                                         random_state=seed)
    init = initialization.rescale(np.asarray(init_xy, dtype=np.float64))
    emb = TSNE(n_iter=n_iter, n_interpolation_points=FFT_INTERPOLATION_POINTS, n_jobs=n_jobs,
               random_state=seed).fit(affinities=aff, initialization=init)
    return np.asarray(emb, dtype=np.float32)


def place_on_map(map_xy: np.ndarray, index, metric: str, new_vectors: np.ndarray,
                 perplexity: float = 5.0, seed: int = 0) -> np.ndarray:
    """Positions of new (prepared) vectors on an existing t-SNE map (openTSNE `transform`)."""
    map_xy = np.asarray(map_xy, dtype=np.float64)
    centre = (map_xy.max(axis=0) + map_xy.min(axis=0)) / 2  # transform re-centres the map in place
    reference = TSNEEmbedding(map_xy - centre, MapReference(FaissKNN(index, metric), perplexity),
                              random_state=seed)
    perp = float(min(perplexity, max(1.0, (len(map_xy) - 1) / 3.0)))
    placed = reference.transform(np.asarray(new_vectors, dtype=np.float32), perplexity=perp)
    return (np.asarray(placed) + centre).astype(np.float32)


def trustworthiness(x: np.ndarray, xy: np.ndarray, k: int = 10, sample: int = 5000, seed: int = 0) -> float | None:
    """How well a map keeps high-dimensional neighbourhoods (sklearn), on up to `sample` points."""
    from sklearn.manifold import trustworthiness as sk_trust

    n = len(x)
    if n < MIN_MAP_POINTS:
        return None
    rows = np.arange(n) if n <= sample else np.sort(np.random.default_rng(seed).choice(n, sample, replace=False))
    k = int(min(k, (len(rows) + 1) // 2 - 1))
    return float(sk_trust(np.asarray(x[rows], np.float32), np.asarray(xy[rows], np.float32), n_neighbors=k))


def grid_shape(m: int) -> tuple[int, int]:
    cols = int(np.ceil(np.sqrt(m)))
    return int(np.ceil(m / cols)), cols


def grid_assignment(xy: np.ndarray, max_cells: int = 1600, seed: int = 0) -> np.ndarray:
    """Snap map points to a grid: int [rows, cols] of point positions (-1 = empty cell).

    Up to `max_cells` points (a seeded sample beyond) go to a near-square grid by an optimal
    linear assignment of points to cells (squared distance, map normalised to the unit
    square); row 0 is the top of the map (largest y), as in the scatter plot.
    """
    from scipy.optimize import linear_sum_assignment

    n = len(xy)
    if n == 0:
        return np.full((0, 0), -1, np.int64)
    pts = np.arange(n) if n <= max_cells else np.sort(np.random.default_rng(seed).choice(n, max_cells, replace=False))
    p = np.asarray(xy, np.float64)[pts]
    lo, span = p.min(axis=0), np.ptp(p, axis=0)
    p = (p - lo) / np.where(span > 0, span, 1.0)
    rows, cols = grid_shape(len(pts))
    gy, gx = np.meshgrid((np.arange(rows) + 0.5) / rows, (np.arange(cols) + 0.5) / cols, indexing="ij")
    cells = np.stack([gx.ravel(), 1.0 - gy.ravel()], axis=1)
    cost = ((p[:, None, :] - cells[None, :, :]) ** 2).sum(axis=2)
    point, cell = linear_sum_assignment(cost)
    grid = np.full(rows * cols, -1, np.int64)
    grid[cell] = pts[point]
    return grid.reshape(rows, cols)
