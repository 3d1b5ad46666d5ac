"""`neurocat neighbors`: the dataset images nearest to a query image, from a store's saved FAISS
index. Quick by design: no Prefect, one forward pass for the query, the index read from disk."""

from __future__ import annotations

import json
from pathlib import Path

HELP = "nearest dataset images to a query image (JSON), from the FAISS index of an embedded store"


def add_arguments(p) -> None:
    p.add_argument("--store", required=True, help="a store that `neurocat embed` has run on")
    p.add_argument("--query", required=True, help="query image file")
    p.add_argument("-k", "--k", type=int, default=10, help="how many neighbours")
    p.add_argument("--layer", default="fc7", help="embedded layer to search (default fc7)")
    p.add_argument("--weights", help="weights file, if not the one the store was embedded with")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--place", action="store_true", help="also place the query on the store's t-SNE map")


def open_space(store_path: str, layer: str):
    """(store, attrs of /embed/<layer>) or a one-line InputError."""
    from engine.errors import InputError
    from storage.store import Store

    try:
        store = Store(store_path, mode="r")
    except FileNotFoundError as e:
        raise InputError(str(e)) from None
    if not store.has(f"embed/{layer}/ids"):
        raise InputError(f"store {store_path} has no embedding of layer {layer!r}; run `neurocat embed` on it first")
    return store, store.attrs(f"embed/{layer}")


def query_vector(path: str, model, layer: str, metric: str, centre=None):
    """The query's layer vector, rounded through float16 like the stored features, prepared for
    the index (centred on the dataset's stored mean, as the indexed vectors were)."""
    import numpy as np
    import torch

    from engine.embedding import layer_vectors
    from engine.errors import InputError
    from engine.faiss_index import prepare
    from engine.images import ImageError, load_preprocessed

    try:
        image = load_preprocessed(path, model.preprocessing)
    except ImageError as e:
        raise InputError(f"cannot use query image {path}: {e}") from None
    vector = layer_vectors(model, torch.from_numpy(image)[None], layer)
    return prepare(vector.astype(np.float16), metric, centre)


def run(args) -> dict:
    from engine.errors import InputError
    from engine.faiss_index import deserialize, search
    from engine.models import cached_model
    from storage.indexes import read_index
    from storage.store import file_list_digest

    if args.k < 1:
        raise InputError("-k must be positive")
    store, attrs = open_space(args.store, args.layer)
    params = store.attrs().get("jobs", {}).get("embed", {}).get("params", {})
    weights = args.weights or (params.get("weights") if params.get("model") == attrs["model"] else None)
    model = cached_model(attrs["model"], weights, args.device)
    if model.weights_sha256 != attrs.get("weights_sha256"):
        raise InputError(f"the store was embedded with other weights ({attrs.get('weights')}); pass them with --weights")
    metric = attrs["metric"]
    centre = store.read(f"embed/{args.layer}/centre") if store.has(f"embed/{args.layer}/centre") else None
    x = query_vector(args.query, model, args.layer, metric, centre)
    try:
        index = deserialize(read_index(store, args.layer))
    except FileNotFoundError as e:
        raise InputError(str(e)) from None
    ids = store.read(f"embed/{args.layer}/ids")
    pos, dist = search(index, x, args.k, metric)
    manifest = store.read_manifest()
    if attrs.get("file_list") not in (None, file_list_digest(manifest)):
        raise InputError(f"the store's file list changed since `neurocat embed` made {args.layer}'s index "
                         "(its rows would name other files): run `neurocat embed` on this store again")
    found = [(int(p), float(d)) for p, d in zip(pos[0], dist[0]) if p >= 0]
    neighbours = [{"rank": r + 1, "index": int(ids[p]), "path": str(manifest["path"].iat[ids[p]]),
                   "label": _label(manifest["label"].iat[ids[p]]), "distance": round(d, 6)}
                  for r, (p, d) in enumerate(found)]
    result = {"query": str(Path(args.query)), "store": str(store.path), "layer": args.layer, "metric": metric,
              "index": attrs["kind"], "data": params.get("data"), "neighbors": neighbours}
    if args.place and store.has(f"embed/{args.layer}/tsne"):
        from engine.maps import place_on_map

        xy = store.read(f"embed/{args.layer}/tsne")[ids]
        result["tsne_xy"] = [round(float(v), 4) for v in place_on_map(xy, index, metric, x)[0]]
    if args.json:
        return result
    print(json.dumps(result, indent=2))  # JSON either way; --json prints it on one line
    return {}


def _label(value) -> str | None:
    """A folder label, or None (JSON null) for an image without one (NaN once through parquet)."""
    return value if isinstance(value, str) else None
