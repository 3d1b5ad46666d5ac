"""Feature-space speed, in one run on synthetic 1280-d vectors (a Gaussian mixture, like fc7 of
a dataset with classes):

1. exact kNN graph of N points (k=10, self excluded): FAISS `IndexFlatL2` (engine/faiss_index)
   against scikit-learn `NearestNeighbors(algorithm="brute")`; the two graphs must agree.
   Target >= 2x. Approximate indices (IVF, HNSW) are timed too, with their recall@10.
2. t-SNE: the project's map (FAISS kNN graph -> openTSNE, PCA init; engine/maps) against
   scikit-learn `TSNE` (Barnes-Hut, PCA init), both on all cores and their default schedules.
   Target >= 2.5x faster with trustworthiness@10 within 0.02.

Usage: python bench/embed.py [--n 20000] [--large 100000] [--tsne-n 5000]
`--large` adds the exact search at that N, for a sample of queries (both libraries search the
same queries against all N points). scikit-learn's TSNE at N=20,000 takes many minutes on
two cores, so the t-SNE comparison runs at --tsne-n (default 5,000).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine import faiss_index as fx  # noqa: E402
from engine.maps import pca_2d, trustworthiness, tsne_map, tsne_neighbours  # noqa: E402

D = 1280
CLASSES = 50
N_JOBS = len(os.sched_getaffinity(0))  # set from --threads


def mixture(n: int, d: int = D, classes: int = CLASSES, seed: int = 0) -> np.ndarray:
    """float32 [n, d]: class centres plus isotropic noise, non-negative like pooled ReLU features."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1.0, (classes, d)).astype(np.float32)
    labels = rng.integers(0, classes, n)
    x = centres[labels] + rng.normal(0, 1.0, (n, d)).astype(np.float32)
    return np.maximum(x, 0, out=x)


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - t0, out


def faiss_graph(x: np.ndarray, k: int) -> np.ndarray:
    index = fx.build_index(x, "flat", "l2")
    return fx.knn_graph(index, x, k, "l2")[0]


def sklearn_graph(x: np.ndarray, k: int) -> np.ndarray:
    from sklearn.neighbors import NearestNeighbors

    nn = NearestNeighbors(n_neighbors=k + 1, algorithm="brute", n_jobs=N_JOBS).fit(x)
    ids = nn.kneighbors(x, return_distance=False)
    return fx.drop_self(ids, np.zeros(ids.shape, np.float32), k)[0]


def search_sample(x: np.ndarray, queries: np.ndarray, k: int, use_faiss: bool) -> np.ndarray:
    if use_faiss:
        index = fx.build_index(x, "flat", "l2")
        return fx.search(index, queries, k, "l2")[0]
    from sklearn.neighbors import NearestNeighbors

    return NearestNeighbors(n_neighbors=k, algorithm="brute", n_jobs=N_JOBS).fit(x).kneighbors(queries, return_distance=False)


def bench_knn(n: int, k: int = 10) -> list[str]:
    x = mixture(n)
    t_faiss, g_faiss = timed(faiss_graph, x, k)
    t_sk, g_sk = timed(sklearn_graph, x, k)
    agree = fx.recall_at_k(g_faiss, g_sk)
    lines = [f"| exact kNN graph, N={n:,}, k={k} | FAISS flat {t_faiss:.1f} s | scikit-learn brute {t_sk:.1f} s "
             f"| **{t_sk / t_faiss:.2f}x** | graphs agree {agree:.4f} |"]
    for kind in ("ivf", "hnsw"):
        t0 = time.perf_counter()
        index = fx.build_index(x, kind, "l2")
        graph = fx.knn_graph(index, x, k, "l2")[0]
        t = time.perf_counter() - t0
        lines.append(f"| approximate kNN graph, N={n:,}, {kind} (build + search) | {t:.1f} s | | "
                     f"{t_sk / t:.2f}x vs sklearn | recall@10 {fx.recall_at_k(graph, g_sk):.4f} |")
    return lines


def bench_large(n: int, queries: int = 2000, k: int = 10) -> list[str]:
    x = mixture(n, seed=1)
    q = x[np.random.default_rng(0).choice(n, queries, replace=False)]
    t_faiss, a = timed(search_sample, x, q, k, True)
    t_sk, b = timed(search_sample, x, q, k, False)
    return [f"| exact search, N={n:,}, {queries:,} queries, k={k} | FAISS flat {t_faiss:.1f} s | scikit-learn brute "
            f"{t_sk:.1f} s | **{t_sk / t_faiss:.2f}x** | results agree {fx.recall_at_k(a, b):.4f} |"]


def our_tsne(x: np.ndarray, n_jobs: int) -> np.ndarray:
    index = fx.build_index(x, "flat", "l2")
    graph = fx.knn_graph(index, x, tsne_neighbours(len(x), 30.0), "l2")
    init, _ = pca_2d(x)
    return tsne_map(index, graph, "l2", init, 30.0, seed=0, n_jobs=n_jobs)


def sklearn_tsne(x: np.ndarray, n_jobs: int) -> np.ndarray:
    from sklearn.manifold import TSNE

    return TSNE(n_components=2, perplexity=30.0, init="pca", random_state=0, n_jobs=n_jobs).fit_transform(x)


def bench_tsne(n: int) -> list[str]:
    x = mixture(n, seed=2)
    n_jobs = N_JOBS
    t_ours, ours = timed(our_tsne, x, n_jobs)
    t_sk, theirs = timed(sklearn_tsne, x, n_jobs)
    tr_ours = trustworthiness(x, ours, 10, sample=n)
    tr_sk = trustworthiness(x, theirs, 10, sample=n)
    return [f"| t-SNE, N={n:,} | ours (FAISS + openTSNE) {t_ours:.1f} s, trust {tr_ours:.4f} | scikit-learn TSNE "
            f"{t_sk:.1f} s, trust {tr_sk:.4f} | **{t_sk / t_ours:.2f}x** | trust. diff {tr_ours - tr_sk:+.4f} |"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--large", type=int, default=0, help="also exact search at this N (0: skip)")
    ap.add_argument("--tsne-n", type=int, default=5_000)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                    help="threads for every library (BLAS, OpenMP, FAISS, openTSNE, scikit-learn)")
    args = ap.parse_args()
    import faiss
    from threadpoolctl import threadpool_limits

    threadpool_limits(args.threads)
    faiss.omp_set_num_threads(args.threads)
    global N_JOBS
    N_JOBS = args.threads
    print(f"threads {args.threads} of {len(os.sched_getaffinity(0))} cores, FAISS GPUs {fx.gpu_count()}, "
          f"d={D}, {CLASSES} classes")
    print("| what | ours | baseline | ratio | check |\n|---|---|---|---|---|")
    for line in bench_knn(args.n):
        print(line, flush=True)
    if args.large:
        for line in bench_large(args.large):
            print(line, flush=True)
    for line in bench_tsne(args.tsne_n):
        print(line, flush=True)


if __name__ == "__main__":
    main()
