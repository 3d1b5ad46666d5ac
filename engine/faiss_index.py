"""FAISS indices over embedding vectors: exact, IVF (flat or PQ) and HNSW; kNN graphs; recall.

Metrics: `l2` (Euclidean on the raw vectors) and `cosine` (inner product on L2-normalised
vectors, i.e. the lecture notes' Euclidean retrieval on unit vectors; the embed job's
default). Every distance this module returns is a Euclidean distance in the indexed space,
so openTSNE, the report and the CLI read one kind of number (for `cosine` it is
sqrt(2 - 2 cos), monotone in the cosine distance).

Rows of an index are positions 0..n-1 of the vectors it was built from; callers keep the
map from positions to dataset image indices.
"""

from __future__ import annotations

import math

import faiss
import numpy as np

KINDS = ("flat", "ivf", "ivfpq", "hnsw")
METRICS = ("l2", "cosine")
AUTO_FLAT_MAX = 50_000  # below this an exact search over everything is seconds, so exact wins
AUTO_IVF_MAX = 2_000_000  # above this, raw float32 vectors no longer fit comfortably: compress (PQ)
HNSW_M = 32
MIN_TRAIN_PER_CENTROID = 39  # FAISS warns below this many training points per k-means centroid


def choose_kind(n: int, kind: str = "auto") -> str:
    """The index kind for `n` vectors: as asked, or by size when `auto`."""
    if kind != "auto":
        if kind not in KINDS:
            raise ValueError(f"unknown index kind {kind!r}; one of auto, {', '.join(KINDS)}")
        if kind in ("ivf", "ivfpq") and n < 2:  # no points to train a quantiser on, and nothing to approximate
            return "flat"
        return kind
    if n <= AUTO_FLAT_MAX:
        return "flat"
    return "ivf" if n <= AUTO_IVF_MAX else "ivfpq"


def gpu_count() -> int:
    """GPUs FAISS can use (0 with faiss-cpu)."""
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def cosine_centre(vectors: np.ndarray, metric: str) -> np.ndarray | None:
    """The dataset mean that `cosine` vectors are centred on before normalising (None for l2,
    where a shift changes no distance).

    Pooled ReLU features all lie in the positive orthant and share a large mean component,
    so raw cosine similarity mostly measures closeness to that mean: a few "hub" images
    turn up in everyone's neighbour list. Centring on the dataset mean is the standard
    remedy (Suzuki et al. 2013, "Centering similarity measures to reduce hubs"): on the
    250 shared images' fc7 the skewness of 10-NN occurrence drops from 3.0 to 0.3 (the
    biggest hub from 85 neighbour lists to 21) and the t-SNE map's trustworthiness@10,
    measured in that same space, rises from 0.74 to 0.81. O(N D), so it scales with the
    index; queries use the same stored mean.
    """
    if metric != "cosine" or len(vectors) == 0:
        return None
    return np.asarray(vectors, dtype=np.float32).mean(axis=0, dtype=np.float64).astype(np.float32)


def prepare(vectors: np.ndarray, metric: str, centre: np.ndarray | None = None) -> np.ndarray:
    """float32, C-contiguous, and for `cosine` centred on `centre` (if given) and unit-length
    (zero rows stay zero)."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; one of {', '.join(METRICS)}")
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    if metric == "cosine":
        if centre is not None:
            x = x - np.asarray(centre, dtype=np.float32)
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        x = np.ascontiguousarray(x / np.maximum(norms, 1e-12), dtype=np.float32)
    return x


def _faiss_metric(metric: str) -> int:
    return faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2


def ivf_lists(n: int) -> int:
    """Number of IVF cells: about 4 sqrt(n), with enough training points per cell."""
    return int(max(1, min(4 * math.sqrt(n), n // MIN_TRAIN_PER_CENTROID)))


def default_nprobe(nlist: int) -> int:
    """Cells visited per query: an eighth of them, at least 8 (recall ~0.9+ on fc7)."""
    return int(min(nlist, max(8, nlist // 8)))


def pq_shape(d: int, n: int) -> tuple[int, int]:
    """(sub-quantizers, bits): ~16 dims per sub-vector, bits limited by the training set."""
    m = next(m for m in range(max(1, d // 16), d + 1) if d % m == 0)
    bits = int(max(1, min(8, math.floor(math.log2(max(2, n // MIN_TRAIN_PER_CENTROID))))))
    return m, bits


def empty_index(kind: str, d: int, n: int, metric: str) -> faiss.Index:
    """An untrained CPU index of `kind` sized for `n` vectors of dimension `d`."""
    fm = _faiss_metric(metric)
    if kind == "flat":
        return faiss.IndexFlatIP(d) if metric == "cosine" else faiss.IndexFlatL2(d)
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, HNSW_M, fm)
        index.hnsw.efConstruction = 80
        index.hnsw.efSearch = 64
        return index
    nlist = ivf_lists(n)
    quantizer = faiss.IndexFlatIP(d) if metric == "cosine" else faiss.IndexFlatL2(d)
    if kind == "ivf":
        index = faiss.IndexIVFFlat(quantizer, d, nlist, fm)
    elif kind == "ivfpq":
        m, bits = pq_shape(d, n)
        index = faiss.IndexIVFPQ(quantizer, d, nlist, m, bits, fm)
    else:
        raise ValueError(f"unknown index kind {kind!r}")
    index.nprobe = default_nprobe(nlist)
    return index


def to_gpu(index: faiss.Index) -> faiss.Index:
    """The index on every GPU FAISS sees; unchanged on CPU-only builds and for HNSW."""
    if gpu_count() == 0 or isinstance(index, faiss.IndexHNSW):
        return index
    try:
        return faiss.index_cpu_to_all_gpus(index)
    except RuntimeError:  # a configuration the GPU code does not support (e.g. some PQ sizes)
        return index


def to_cpu(index: faiss.Index) -> faiss.Index:
    if gpu_count() and not isinstance(index, faiss.IndexHNSW):
        try:
            return faiss.index_gpu_to_cpu(index)
        except (RuntimeError, AttributeError, TypeError):
            return index
    return index


def build_index(vectors: np.ndarray, kind: str = "auto", metric: str = "l2", seed: int = 0) -> faiss.Index:
    """Train (IVF) and fill an index with `vectors` (already `prepare`d), on GPU when there is one."""
    n, d = vectors.shape
    kind = choose_kind(n, kind)
    index = to_gpu(empty_index(kind, d, n, metric))
    if not index.is_trained:
        rng = np.random.default_rng(seed)
        train = vectors if n <= 256 * ivf_lists(n) else vectors[np.sort(rng.choice(n, 256 * ivf_lists(n), replace=False))]
        index.train(train)
    index.add(vectors)
    return index


def index_kind(index: faiss.Index) -> str:
    cpu = to_cpu(index)
    if isinstance(cpu, faiss.IndexHNSW):
        return "hnsw"
    if isinstance(cpu, faiss.IndexIVFPQ):
        return "ivfpq"
    if isinstance(cpu, faiss.IndexIVF):
        return "ivf"
    return "flat"


def search(index: faiss.Index, queries: np.ndarray, k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """k nearest rows of `index` for each (prepared) query: (positions int64, Euclidean distances float32).

    Missing results (fewer than k rows reachable) are -1 with distance inf.
    """
    k = int(min(k, index.ntotal))
    if k <= 0 or len(queries) == 0:
        return np.zeros((len(queries), max(k, 0)), np.int64), np.zeros((len(queries), max(k, 0)), np.float32)
    if isinstance(index, faiss.IndexHNSW):
        index.hnsw.efSearch = max(index.hnsw.efSearch, 2 * k)
    scores, ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    return ids.astype(np.int64), euclidean(scores, ids, metric)


def euclidean(scores: np.ndarray, ids: np.ndarray, metric: str) -> np.ndarray:
    """FAISS scores (inner products for `cosine`, squared distances for `l2`) -> float32
    Euclidean distances, inf where no result (-1)."""
    if metric == "cosine":
        dist = np.sqrt(np.clip(2.0 - 2.0 * scores, 0.0, None))
    else:
        dist = np.sqrt(np.clip(scores, 0.0, None))
    return np.where(ids < 0, np.inf, dist).astype(np.float32)


def drop_self(ids: np.ndarray, dist: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """From k+1 results of searching row i, remove row i itself (or the last result when the
    search missed it, e.g. behind exact duplicates or in an approximate index); keep k."""
    n = len(ids)
    own = ids == np.arange(n)[:, None]
    missing = ~own.any(axis=1)
    own[missing, -1] = True
    keep = ~own
    return ids[keep].reshape(n, -1)[:, :k], dist[keep].reshape(n, -1)[:, :k]


def knn_graph(index: faiss.Index, vectors: np.ndarray, k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest other rows of every row of the index (self excluded): [n, k] positions, distances.

    `vectors` are the rows the index holds. An exact index on the CPU is answered by
    `exact_self_join` (the same neighbours for half the arithmetic); other indices are searched.
    """
    k = int(min(k, len(vectors) - 1))
    if k <= 0:
        return np.zeros((len(vectors), 0), np.int64), np.zeros((len(vectors), 0), np.float32)
    if isinstance(index, faiss.IndexFlat):
        ids, _ = exact_self_join(vectors, k, metric)
    else:
        ids, _ = drop_self(*search(index, vectors, k + 1, metric), k)
    return by_distance(vectors, ids)


def by_distance(x: np.ndarray, ids: np.ndarray, block: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Each row's neighbours `ids` with their Euclidean distances recomputed from the (prepared)
    vectors' differences (numpy's own loops, no BLAS), and sorted by (distance, position).

    The GEMM form the search ranks by (|a|^2 - 2ab + |b|^2) rounds with the BLAS's blocking, which
    follows its thread count: a Dask worker (one thread) and the threads runner gave distances
    1e-5 apart and swapped near-ties. These are the same bytes on every runner, and exact where
    the GEMM form cancels (near-duplicates); 5% of an exact kNN's time at 20,000 x 1280."""
    dist = np.empty(ids.shape, np.float32)
    for i0 in range(0, len(ids), block):
        rows = ids[i0:i0 + block]
        diff = x[i0:i0 + block, None, :] - x[np.clip(rows, 0, None)]
        dist[i0:i0 + block] = np.where(rows < 0, np.inf, np.sqrt(np.einsum("ijk,ijk->ij", diff, diff)))
    order = np.lexsort((np.where(ids < 0, np.iinfo(np.int64).max, ids), dist))
    return np.take_along_axis(ids, order, 1), np.take_along_axis(dist, order, 1)


def exact_self_join(x: np.ndarray, k: int, metric: str, block: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest other rows of every row of `x` (prepared): [n, k] positions, distances.

    A flat index's search computes all n^2 scores; the Gram matrix is symmetric, so this
    computes only its upper-triangular blocks (one float32 GEMM each, as FAISS does) and feeds
    every block to FAISS's top-k heaps twice, as rows and transposed as columns.
    """
    n = len(x)
    x = np.ascontiguousarray(x, dtype=np.float32)
    scores, ids = np.empty((n, k), np.float32), np.empty((n, k), np.int64)
    heaps = faiss.float_minheap_array_t() if metric == "cosine" else faiss.float_maxheap_array_t()
    heaps.nh, heaps.k, heaps.val, heaps.ids = n, k, faiss.swig_ptr(scores), faiss.swig_ptr(ids)
    heaps.heapify()
    excluded = -np.inf if metric == "cosine" else np.inf  # never enters a heap: self is no neighbour
    sq = np.einsum("ij,ij->i", x, x) if metric == "l2" else None
    for i0 in range(0, n, block):
        xi = x[i0:i0 + block]
        for j0 in range(i0, n, block):
            s = xi @ x[j0:j0 + block].T
            if sq is not None:  # squared distances, as FAISS computes them
                s *= -2.0
                s += sq[i0:i0 + block, None]
                s += sq[None, j0:j0 + block]
            if j0 == i0:
                np.fill_diagonal(s, excluded)
            heaps.addn(s.shape[1], faiss.swig_ptr(s), j0, i0, s.shape[0])
            if j0 != i0:
                t = np.ascontiguousarray(s.T)
                heaps.addn(t.shape[1], faiss.swig_ptr(t), i0, j0, t.shape[0])
    heaps.reorder()
    return ids, euclidean(scores, ids, metric)


def exact_neighbours(vectors: np.ndarray, rows: np.ndarray, k: int, metric: str) -> np.ndarray:
    """Exact k nearest other rows (self excluded) of the given rows, by a flat index."""
    flat = empty_index("flat", vectors.shape[1], len(vectors), metric)
    flat.add(vectors)
    ids, dist = search(flat, vectors[rows], min(k, len(vectors) - 1) + 1, metric)
    n = len(rows)
    own = ids == np.asarray(rows)[:, None]
    own[~own.any(axis=1), -1] = True
    return ids[~own].reshape(n, -1)[:, :k]


def recall_at_k(approx: np.ndarray, exact: np.ndarray) -> float:
    """Mean fraction of each row's exact k neighbours that the approximate row also found."""
    if approx.size == 0:
        return 1.0
    k = exact.shape[1]
    hits = (approx[:, :k, None] == exact[:, None, :]).any(axis=2).sum(axis=1)
    return float(hits.mean() / k)


def measure_recall(graph: np.ndarray, vectors: np.ndarray, metric: str, k: int = 10,
                   sample: int = 1000, seed: int = 0) -> float:
    """recall@k of a kNN graph against exact search, on up to `sample` random rows."""
    n = len(vectors)
    k = min(k, graph.shape[1])
    rows = np.arange(n) if n <= sample else np.sort(np.random.default_rng(seed).choice(n, sample, replace=False))
    return recall_at_k(graph[rows, :k], exact_neighbours(vectors, rows, k, metric))


def serialize(index: faiss.Index) -> bytes:
    """The index as bytes (from the GPU if it lives there) for storage/ to write."""
    return faiss.serialize_index(to_cpu(index)).tobytes()


def deserialize(data: bytes) -> faiss.Index:
    return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
