"""Task of the embed job: one vector space of the dataset (a layer's features, or pixels)
indexed, graphed and mapped, written to `/embed/<space>/` and `<store>/faiss/<space>.index`.

A space is one global computation (not sharded): the flow submits it as a single "shard"
so the store's done-marker still decides whether a rerun can skip it.
"""

from __future__ import annotations

import os

import numpy as np
from prefect import task

from engine.embedding import PIXEL_SIDE, Space, feature_space, pixel_vectors
from engine.faiss_index import gpu_count, serialize
from engine.maps import describe_affinities
from storage.indexes import write_index
from storage.store import Store, file_list_digest
from tasks.sharding import skip_if_done

PIXELS = "pixels"  # the space of downscaled thumbnails


def space_vectors(store: Store, source: str, rows: np.ndarray, block: int = 4096) -> np.ndarray:
    """float32 vectors of the given manifest rows: `features/<layer>` as stored, or pixel vectors
    of `/thumbs` (converted block by block, so 100k thumbnails never sit in memory as floats)."""
    arr = store.array(source)
    if source != "thumbs":
        return np.asarray(arr[...][rows], dtype=np.float32)
    blocks = [pixel_vectors(arr.get_orthogonal_selection((rows[i:i + block],))) for i in range(0, len(rows), block)]
    return np.concatenate(blocks) if blocks else np.zeros((0, 3 * PIXEL_SIDE ** 2), np.float32)


def to_rows(values: np.ndarray, rows: np.ndarray, n: int, fill) -> np.ndarray:
    """Per-position values -> an array with one row per manifest entry (skipped rows = fill)."""
    out = np.full((n,) + values.shape[1:], fill, dtype=values.dtype)
    out[rows] = values
    return out


def write_space(store: Store, name: str, space: Space, rows: np.ndarray, n: int, attrs: dict) -> None:
    """Arrays of one space, indexed by manifest row; neighbour positions mapped to image indices."""
    base = f"embed/{name}"
    knn = np.where(space.knn_index >= 0, rows[np.clip(space.knn_index, 0, None)], -1) if len(rows) else space.knn_index
    store.write_array(f"{base}/ids", rows.astype(np.int64), attrs={"what": "dataset image index of each FAISS index row"})
    store.write_array(f"{base}/knn_index", to_rows(knn.astype(np.int64), rows, n, -1), attrs={
        "what": "dataset indices of the k nearest other images, nearest first; -1 for skipped images"})
    store.write_array(f"{base}/knn_dist", to_rows(space.knn_dist.astype(np.float32), rows, n, np.nan), attrs={
        "what": "Euclidean distance in the indexed space (cosine: between centred unit vectors)"})
    if space.centre is not None:
        store.write_array(f"{base}/centre", space.centre, attrs={
            "what": "mean the cosine space is centred on; queries are centred on it too"})
    else:
        store.delete(f"{base}/centre")
    for key in ("pca", "tsne"):
        value = getattr(space, key)
        if value is not None:
            store.write_array(f"{base}/{key}", to_rows(value, rows, n, np.nan), attrs={"what": f"{key} map, NaN for skipped"})
        else:
            store.delete(f"{base}/{key}")
    if space.grid is not None:
        grid = np.where(space.grid >= 0, rows[np.clip(space.grid, 0, None)], -1)
        store.write_array(f"{base}/grid", grid, attrs={"what": "t-SNE map snapped to a grid: dataset indices, -1 empty"})
    else:
        store.delete(f"{base}/grid")
    store.update_attrs(base, **attrs)


@task(name="embed-space")
@skip_if_done(shard_id=0)
def embed_space(store_path: str, job: str, name: str, source: str, kind: str, metric: str, k: int,
                with_maps: bool, perplexity: float | None, seed: int, provenance: dict, fp: str) -> dict:
    store = Store(store_path)
    manifest = store.read_manifest()
    rows = np.flatnonzero(manifest["status"].values == "ok")
    n_jobs = len(os.sched_getaffinity(0))
    space = feature_space(space_vectors(store, source, rows), kind, metric, k, with_maps, perplexity, seed, n_jobs)
    index_file = write_index(store, name, serialize(space.index))
    facts = {"space": name, "source": source, "images": int(len(rows)), "kind": space.kind, "metric": metric,
             "k": int(space.knn_index.shape[1]), "recall@10": space.recall, "trust_pca": space.trust_pca,
             "trust_tsne": space.trust_tsne, "pca_explained": space.pca_explained,
             "affinities": describe_affinities(len(rows), perplexity) if space.tsne is not None else None,
             "gpu": gpu_count() > 0, "timings": space.timings}
    write_space(store, name, space, rows, len(manifest), {**provenance, **facts, "index_file": index_file.name,
                                                          "file_list": file_list_digest(manifest)})
    store.mark_shard_done(job, 0, fp, facts)
    return facts
