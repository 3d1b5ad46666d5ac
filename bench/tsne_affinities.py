"""Map quality of the embed job's t-SNE with Gaussian affinities (perplexity 30) against uniform
ones on the 10- and 15-NN graph, on real spaces: the shared images' fc7, three pooled blocks and
32x32 pixels, scikit-learn's digits, and bench/embed.py's mixture. Prints trustworthiness@10 /
continuity@10 (continuity: trustworthiness with the two spaces swapped), both in the space the
job indexes (cosine spaces centred on their mean). No baseline timing: this is about quality;
bench/embed.py times the maps against scikit-learn.

Usage: python bench/tsne_affinities.py   (~3 min on 2 cores)
"""

from __future__ import annotations

import numpy as np

from common import SHARED_DATA

from engine import faiss_index as fx  # noqa: E402
from engine.embedding import layer_vectors, pixel_vectors  # noqa: E402
from engine.maps import UNIFORM_NEIGHBOURS, pca_2d, trustworthiness, tsne_map  # noqa: E402

VARIANTS = {"perplexity 30": (30.0, None), "uniform 10-NN": (None, 10), "uniform 15-NN": (None, 15)}


def scores(vectors: np.ndarray, metric: str) -> list[str]:
    """'T / C' of each variant's map, on up to 4,000 points."""
    x = fx.prepare(vectors, metric, fx.cosine_centre(vectors, metric))
    index = fx.build_index(x, "flat", metric)
    graph = fx.knn_graph(index, x, min(len(x) - 1, 90), metric)
    init = pca_2d(x)[0]
    cells = []
    for perplexity, k in VARIANTS.values():
        xy = tsne_map(index, graph, metric, init, perplexity, n_jobs=2, uniform_k=k or UNIFORM_NEIGHBOURS)
        cells.append(f"{trustworthiness(x, xy, 10, sample=4000):.3f} / {trustworthiness(xy, x, 10, sample=4000):.3f}")
    return cells


def main() -> None:
    import torch
    from sklearn.datasets import load_digits

    from embed import mixture
    from engine.images import list_images, load_preprocessed
    from engine.models import cached_model

    model = cached_model("efficientnet_lite0")
    images = np.stack([load_preprocessed(SHARED_DATA / e.path, model.preprocessing) for e in list_images(SHARED_DATA)])

    def pooled(layer):
        with torch.no_grad():
            return np.concatenate([layer_vectors(model, torch.from_numpy(images[i:i + 50]), layer)
                                   for i in range(0, len(images), 50)])

    spaces = [(f"shared images, {layer}, cosine ({len(images)})", lambda layer=layer: pooled(layer), "cosine")
              for layer in ("fc7", "_blocks.5", "_blocks.10", "_blocks.15")]
    spaces += [("shared images, 32x32 pixels, cosine", lambda: pixel_vectors(images), "cosine"),
               ("shared images, 32x32 pixels, l2", lambda: pixel_vectors(images), "l2"),
               ("scikit-learn digits, cosine (1,797)", lambda: load_digits().data.astype(np.float32), "cosine"),
               ("bench/embed.py mixture, cosine (5,000)", lambda: mixture(5000), "cosine")]
    print("| space | " + " | ".join(VARIANTS) + " |\n|---|" + "---|" * len(VARIANTS))
    for name, vectors, metric in spaces:
        print(f"| {name} | " + " | ".join(scores(vectors(), metric)) + " |", flush=True)


if __name__ == "__main__":
    main()
