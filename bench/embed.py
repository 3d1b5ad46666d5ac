"""Feature-space speed, in one run on synthetic 1280-d vectors (a Gaussian mixture, like fc7 of
a dataset with classes), on the same number of threads for every library:

1. exact kNN graph of N points (k=10, self excluded) in the embed job's default metric, cosine:
   the job's graph (engine/faiss_index.knn_graph over a flat index: the symmetric self-join,
   FAISS heaps) against scikit-learn `NearestNeighbors(algorithm="brute", metric="cosine")`,
   and against scikit-learn's fastest route to the same neighbours (brute `euclidean` on the
   unit vectors; the job first centres cosine vectors on their mean, O(N D), left out here so
   both get the same vectors); a plain FAISS `IndexFlatIP` search of every row, and raw l2
   too. Every graph must agree with scikit-learn's. Target >= 2x. Approximate indices (IVF,
   HNSW) are timed too, with their recall@10.
2. exact search at a larger N (`--large`): a sample of queries against all N points.
3. t-SNE of N points (cosine): the project's map (FAISS kNN graph -> openTSNE, PCA init;
   engine/maps: FFT gradients with 2 interpolation points per box; the job's default uniform
   affinities on the 15-NN graph, and Gaussian ones of perplexity 30) against scikit-learn
   `TSNE` (Barnes-Hut, PCA init) on the same unit vectors, both 1000 iterations (250 of early
   exaggeration; the counts are printed). Target >= 2.5x faster with trustworthiness@10
   within 0.02, both measured on the same random subsample of points (trustworthiness is
   O(N^2) in time and memory). Our time is split into the kNN graph + PCA and the rest
   (affinities and optimisation).

Usage: python bench/embed.py [--n 20000] [--large 100000] [--tsne-n 20000] [--trust-sample 5000]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

import common  # noqa: F401 - puts the repository on sys.path

from engine import faiss_index as fx  # noqa: E402
from engine.maps import (TSNE_ITERATIONS, describe_affinities, pca_2d, trustworthiness, tsne_map,  # noqa: E402
                         tsne_neighbours)

D = 1280
CLASSES = 50
K = 10
EARLY_EXAGGERATION_ITERATIONS = 250  # openTSNE's, before engine.maps.TSNE_ITERATIONS
SKLEARN_TSNE_ITERATIONS = 1000  # scikit-learn's default max_iter, early exaggeration included
THREADS = len(os.sched_getaffinity(0))  # set from --threads


def mixture(n: int, d: int = D, classes: int = CLASSES, seed: int = 0) -> np.ndarray:
    """float32 [n, d]: class centres plus isotropic noise, non-negative like pooled ReLU features."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((classes, d), dtype=np.float32)
    labels = rng.integers(0, classes, n)
    x = centres[labels] + rng.standard_normal((n, d), dtype=np.float32)
    return np.maximum(x, 0, out=x)


class Took(float):
    """Wall seconds, with the process's CPU seconds (all threads) beside them: on a loaded
    machine the wall time mostly measures waiting, the CPU time still the work."""

    cpu: float

    def __format__(self, spec: str) -> str:
        return f"{float(self):{spec}} s (cpu {self.cpu:{spec}})"


def timed(fn, *args, **kwargs) -> tuple[Took, object]:
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn(*args, **kwargs)
    took = Took(time.perf_counter() - t0)
    took.cpu = time.process_time() - c0
    return took, out


def ratio(baseline: Took, ours: Took) -> str:
    return f"**{baseline / ours:.2f}x** (cpu {baseline.cpu / ours.cpu:.2f}x)"


def faiss_graph(x: np.ndarray, metric: str, kind: str = "flat") -> np.ndarray:
    """The kNN graph as the embed job builds it (vectors prepared for `metric`, indexed, then
    `knn_graph`: the symmetric self-join for an exact index, a search otherwise)."""
    x = fx.prepare(x, metric)
    return fx.knn_graph(fx.build_index(x, kind, metric), x, K, metric)[0]


def faiss_search_graph(x: np.ndarray, metric: str) -> np.ndarray:
    """The same graph by a plain search of the flat index (every row against all rows)."""
    x = fx.prepare(x, metric)
    return fx.drop_self(*fx.search(fx.build_index(x, "flat", metric), x, K + 1, metric), K)[0]


def sklearn_knn(x: np.ndarray, queries: np.ndarray | None, metric: str, k: int) -> np.ndarray:
    from sklearn.neighbors import NearestNeighbors

    nn = NearestNeighbors(n_neighbors=k, algorithm="brute", metric=metric, n_jobs=THREADS).fit(x)
    return nn.kneighbors(queries, return_distance=False) if queries is not None else nn.kneighbors(
        n_neighbors=k, return_distance=False)  # without queries: the graph, self excluded


def bench_knn(n: int) -> list[str]:
    x = mixture(n)
    unit = fx.prepare(x, "cosine")
    warm = x[:512]  # first calls start thread pools and load kernels: not part of either time
    faiss_graph(warm, "cosine"), sklearn_knn(warm, None, "cosine", K), sklearn_knn(warm, None, "euclidean", K)
    t_ours, ours = timed(faiss_graph, x, "cosine")
    t_search, searched = timed(faiss_search_graph, x, "cosine")
    t_cos, g_cos = timed(sklearn_knn, x, None, "cosine", K)
    t_unit, g_unit = timed(sklearn_knn, unit, None, "euclidean", K)
    t_l2, ours_l2 = timed(faiss_graph, x, "l2")
    t_sk_l2, g_l2 = timed(sklearn_knn, x, None, "euclidean", K)
    baseline = min(t_cos, t_unit)  # scikit-learn's faster route to these neighbours
    lines = [
        f"| exact kNN graph, cosine, N={n:,}, k={K} | ours (FAISS heaps, symmetric GEMM) {t_ours:.1f} | sklearn "
        f"brute cosine {t_cos:.1f} | {ratio(t_cos, t_ours)} | graphs agree {fx.recall_at_k(ours, g_cos):.4f} |",
        f"| same, baseline on unit vectors | ours {t_ours:.1f} | sklearn brute euclidean {t_unit:.1f} "
        f"| {ratio(t_unit, t_ours)} | graphs agree {fx.recall_at_k(ours, g_unit):.4f} |",
        f"| same by a plain FAISS `IndexFlatIP` search | {t_search:.1f} | sklearn best {baseline:.1f} | "
        f"{ratio(baseline, t_search)} | graphs agree {fx.recall_at_k(searched, g_cos):.4f} |",
        f"| exact kNN graph, l2, N={n:,}, k={K} | ours {t_l2:.1f} | sklearn brute euclidean "
        f"{t_sk_l2:.1f} | {ratio(t_sk_l2, t_l2)} | graphs agree {fx.recall_at_k(ours_l2, g_l2):.4f} |"]
    for kind in ("ivf", "hnsw"):
        t, graph = timed(faiss_graph, x, "cosine", kind)
        lines.append(f"| approximate kNN graph, cosine, N={n:,}, {kind} (build + search) | {t:.1f} | "
                     f"sklearn best {baseline:.1f} | {ratio(baseline, t)} | recall@10 {fx.recall_at_k(graph, g_cos):.4f} |")
    return lines


def bench_large(n: int, queries: int = 2000) -> list[str]:
    x = fx.prepare(mixture(n, seed=1), "cosine")
    q = x[np.random.default_rng(0).choice(n, queries, replace=False)]

    def ours():
        return fx.search(fx.build_index(x, "flat", "cosine"), q, K, "cosine")[0]

    t_ours, a = timed(ours)
    t_sk, b = timed(sklearn_knn, x, q, "euclidean", K)
    return [f"| exact search, cosine, N={n:,}, {queries:,} queries, k={K} | FAISS flat IP {t_ours:.1f} | "
            f"sklearn brute euclidean on unit vectors {t_sk:.1f} | {ratio(t_sk, t_ours)} | "
            f"results agree {fx.recall_at_k(a, b):.4f} |"]


def our_tsne(x: np.ndarray, perplexity: float | None) -> tuple[np.ndarray, Took]:
    """The embed job's map: FAISS graph, PCA init, openTSNE (`perplexity` None: the job's
    default uniform affinities on the 15-NN graph); and the time of the graph + PCA part."""
    def graph_and_init():
        index = fx.build_index(x, "flat", "cosine")
        return index, fx.knn_graph(index, x, tsne_neighbours(len(x), perplexity), "cosine"), pca_2d(x)[0]

    t_prep, (index, graph, init) = timed(graph_and_init)
    return tsne_map(index, graph, "cosine", init, perplexity, seed=0, n_jobs=THREADS), t_prep


def sklearn_tsne(x: np.ndarray) -> np.ndarray:
    """scikit-learn's defaults (Barnes-Hut, 1000 iterations) with PCA init, on the unit vectors:
    its fast exact kNN path finds the cosine neighbours there, and the affinities are the same."""
    from sklearn.manifold import TSNE

    return TSNE(n_components=2, perplexity=30.0, init="pca", max_iter=SKLEARN_TSNE_ITERATIONS, random_state=0,
                n_jobs=THREADS).fit_transform(x)


def bench_tsne(n: int, trust_sample: int) -> list[str]:
    """scikit-learn once; ours with the job's default affinities and with Gaussian ones of the
    same perplexity as scikit-learn's (like for like)."""
    x = fx.prepare(mixture(n, seed=2), "cosine")
    t_sk, theirs = timed(sklearn_tsne, x)
    tr_sk = trustworthiness(x, theirs, K, sample=trust_sample, seed=0)  # same seed: same subsample
    sample = f"on {min(n, trust_sample):,} points" if n > trust_sample else "on all points"
    iterations = f"{EARLY_EXAGGERATION_ITERATIONS + TSNE_ITERATIONS} vs {SKLEARN_TSNE_ITERATIONS} iterations"
    lines = []
    for perplexity in (None, 30.0):
        t_ours, (ours, t_prep) = timed(our_tsne, x, perplexity)
        tr_ours = trustworthiness(x, ours, K, sample=trust_sample, seed=0)
        lines.append(f"| t-SNE, cosine, N={n:,}, {iterations} | FAISS graph + openTSNE, affinities "
                     f"{describe_affinities(n, perplexity)}: {t_ours:.1f} (graph + PCA {t_prep:.1f}), trust {tr_ours:.4f} "
                     f"| sklearn TSNE (perplexity 30) {t_sk:.1f}, trust {tr_sk:.4f} | {ratio(t_sk, t_ours)} "
                     f"| trust. diff {tr_ours - tr_sk:+.4f} ({sample}) |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20_000, help="points in the exact kNN graph comparison")
    ap.add_argument("--large", type=int, default=100_000, help="exact search against this many points (0: skip)")
    ap.add_argument("--tsne-n", type=int, default=20_000, help="points in the t-SNE comparison (0: skip)")
    ap.add_argument("--trust-sample", type=int, default=5_000, help="points trustworthiness is measured on")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                    help="threads for every library (BLAS, OpenMP, FAISS, openTSNE, scikit-learn)")
    args = ap.parse_args()
    import faiss
    from threadpoolctl import threadpool_limits

    global THREADS
    THREADS = args.threads
    threadpool_limits(THREADS)
    faiss.omp_set_num_threads(THREADS)
    print(f"threads {THREADS} of {len(os.sched_getaffinity(0))} cores, FAISS GPUs {fx.gpu_count()}, d={D}, "
          f"{CLASSES} classes, load average {os.getloadavg()[0]:.1f}")
    print("| what | ours | baseline | ratio | check |\n|---|---|---|---|---|")
    for line in bench_knn(args.n):
        print(line, flush=True)
    if args.large:
        for line in bench_large(args.large):
            print(line, flush=True)
    if args.tsne_n:
        for line in bench_tsne(args.tsne_n, args.trust_sample):
            print(line, flush=True)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
