"""`neurocat embed`: the dataset in feature space and in pixel space.

Plan: the shared forward pass (`/features/<layer>`, `/thumbs`), then two spaces, each a
FAISS index + kNN graph: the layer's features (with PCA, t-SNE and a t-SNE image grid)
and downscaled pixels (for the report's pixel-vs-feature neighbour galleries).

Features are compared by cosine by default: the lecture notes' l2 distance, between
L2-normalised vectors. Raw l2 on pooled EfficientNet features is ruled by vector length: on
the 250 shared images the shortest vector is among the 10 nearest neighbours of 225 of them
and 86 images are nobody's neighbour, so every gallery would show the same few images.
"""

from __future__ import annotations

from prefect import flow

from flows.common import (RunOptions, Shard, map_shards, model_provenance, record_job, resolve_paths,
                          shard_fingerprint, stage)
from flows.features import run_features
from flows.report import publish_report
from flows.runners import threads_runner
from storage.store import Store
from tasks.embed import PIXELS, embed_space

JOB = "embed"


def run_embed(opts: RunOptions, store: Store, layer: str = "fc7", index: str = "auto", k: int = 10,
              metric: str = "cosine", perplexity: float | None = None, seed: int = 0) -> dict:
    """Features, then the layer's space and the pixel space; returns the layer space's facts."""
    run_features(opts, store, (layer,))
    manifest = store.read_manifest()
    whole = Shard(0, 0, len(manifest))
    prov = model_provenance(opts)
    facts = {}
    for name, source, space_metric, with_maps in ((layer, f"features/{layer}", metric, True),
                                                  (PIXELS, "thumbs", "l2", False)):
        job = f"{JOB}-{name}"
        params = dict(kind=index, metric=space_metric, k=k, with_maps=with_maps, perplexity=perplexity, seed=seed)
        fp = shard_fingerprint(job, manifest, whole, prov, source, params)
        with stage(store, JOB, name):
            [facts[name]] = map_shards(embed_space, store, job, [whole], [fp], lambda _s: dict(
                store_path=opts.store, job=job, name=name, source=source, provenance=prov, **params), opts.progress)
    main = facts[layer]
    record_job(store, JOB, opts, layer=layer, images=main["images"], index=main["kind"], metric=metric,
               k=main["k"], recall=main["recall@10"], trust_tsne=main["trust_tsne"],
               pixel_recall=facts[PIXELS]["recall@10"])
    return main


@flow(name="embed", log_prints=True, task_runner=threads_runner())
def embed_flow(opts: RunOptions, layer: str = "fc7", index: str = "auto", k: int = 10, metric: str = "cosine",
               perplexity: float | None = None) -> dict:
    opts = resolve_paths(opts, JOB)
    store = Store(opts.store)
    with store.lock():
        facts = run_embed(opts, store, layer, index, k, metric, perplexity)
        report = publish_report(opts.store, opts.report)
    return {"store": opts.store, "report": str(report), "layer": layer, "images": facts["images"],
            "index": facts["kind"], "metric": metric, "k": facts["k"], "recall@10": facts["recall@10"],
            "trustworthiness_tsne": facts["trust_tsne"], "trustworthiness_pca": facts["trust_pca"]}
