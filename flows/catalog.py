"""`neurocat catalog`: top-K / bottom-K patches, statistics and feature visualisations of every unit.

The plan: scan; pass 1 fans out one task per shard of images, each saving the per-channel
state of its images (engine/topk.py); the states are merged up a tree of reduce tasks and
written to `/catalog/<layer>/...`; pass 2 fans out one task per block of channels, each
decoding only the images on its channels' top/bottom lists to crop patches, overlays and
projections; then feature visualisations of the first N live units. Every pass resumes
from its markers.
"""

from __future__ import annotations

import hashlib
from collections.abc import Container
from math import ceil
from pathlib import Path

import numpy as np
from prefect import flow, task
from prefect.artifacts import create_link_artifact, create_table_artifact

from engine.catalog import activation_shapes, model_receptive_fields, patch_size
from engine.errors import InputError
from engine.files import dataset_file
from engine.images import label_index, list_images
from engine.models import cached_model
from engine.topk import STATE_FORMAT, ChannelStats
from flows.common import (RunOptions, Shard, map_shards, plan_shards, record_failures, record_job, report_outputs,
                          resolve_paths, scan_dataset, shard_fingerprint, shard_items, stage)
from flows.report import _artifact_key, publish_report
from flows.runners import threads_runner
from storage.store import Store, fingerprint
from tasks.catalog import (catalog_featvis, catalog_patches, catalog_shard, merge_catalog_states,
                           save_activation_maps, save_catalog, save_filter_grid)

JOB = "catalog"
PATCH_JOB = "catalog-patches"
FEATVIS_JOB = "catalog-featvis"
DEFAULT_LAYERS = ("_blocks.5", "_blocks.10")
BLOCK_BYTES = 256 << 20  # outputs of one pass-2 task (patches, overlays, projections): bounds its memory
UNIT_CHUNK = 16  # units per chunk of the per-unit image arrays (patches, overlays, projections)
OVERLAY_SIZE = 112
FEATVIS_SIZE = 128
FEATVIS_STEPS = 128
FEATVIS_BATCH = 8  # units optimised together in one task
ACTIVATION_IMAGES = 4  # images whose activation maps (every unit) are stored and shown


def reduce_tree(store_path: str, job: str, shard_ids: list[int], fan_in: int = 2):
    """Merge the shard states pairwise up a tree of tasks; returns the future of the root.

    The tree's shape depends only on the number of shards, so every runner merges in the
    same order and gets the same bytes.
    """
    level = [merge_catalog_states.with_options(task_run_name=f"{job}-merge-0-{i}").submit(
        store_path, job, shard_ids[i:i + fan_in]) for i in range(0, len(shard_ids), fan_in)]
    depth = 0
    while len(level) > 1:
        depth += 1
        groups = [level[i:i + fan_in] for i in range(0, len(level), fan_in)]
        level = [g[0] if len(g) == 1 else merge_catalog_states.with_options(
            task_run_name=f"{job}-merge-{depth}-{i}").submit(store_path, job, g) for i, g in enumerate(groups)]
    return level[0]


def channel_blocks(channels: dict[str, int], unit_bytes: dict[str, int]) -> list[dict[str, tuple[int, int]]]:
    """Split every layer's channels into the same number of blocks whose outputs take at most
    about BLOCK_BYTES (`unit_bytes`: one unit's outputs in a layer).

    As few blocks as fit: a block decodes each image on its channels' lists once, and most
    images are on lists of several layers (4,000 files, the default layers: 2,176 images
    decoded by one block against 2,688 by two). Block sizes are multiples of UNIT_CHUNK, the
    chunking of the per-unit image arrays, so no two blocks ever write to one chunk.
    """
    n = max(1, ceil(sum(c * unit_bytes[layer] for layer, c in channels.items()) / BLOCK_BYTES))
    size = {layer: UNIT_CHUNK * ceil(c / n / UNIT_CHUNK) for layer, c in channels.items()}
    blocks = [{layer: (min(j * size[layer], c), min((j + 1) * size[layer], c)) for layer, c in channels.items()}
              for j in range(n)]
    return [b for b in blocks if any(c1 > c0 for c0, c1 in b.values())]


def unit_output_bytes(patch: int, slots: int, crop: int, projected: bool) -> int:
    """Bytes a pass-2 task holds per unit: its patches and overlay, and for a projected unit
    its top-1 image and projection (uint8 RGB)."""
    return 3 * (slots * patch ** 2 + OVERLAY_SIZE ** 2 + (crop ** 2 + patch ** 2 if projected else 0))


def _digest(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def run_catalog(opts: RunOptions, store: Store, layers=DEFAULT_LAYERS, top_k: int = 16, bottom_k: int = 8,
                featvis_n: int = 0, projections: int | None = None, projection_rule: str = "guided",
                activation_images: int | list[str] = ACTIVATION_IMAGES) -> dict:
    """The catalogue of `layers` into `store`; returns per-layer facts. Used by the demo too.

    `projections` limits guided-backprop projections to the first N units of each layer
    (None: all); `featvis_n` renders the first N live units of each layer;
    `activation_images` (the first N usable images, or paths as in the manifest) get every
    unit's activation map stored.
    """
    model = cached_model(opts.model, opts.weights, opts.device)
    layers = list(dict.fromkeys(model.resolve(layer) for layer in layers))
    prov = model.describe()
    with stage(store, JOB, "scan"):
        scan_dataset(opts.store, opts.data, opts.limit, opts.report)
    manifest = store.read_manifest()
    # more than the dataset's images pads with -1 and sizes patch arrays by K (10^5: 30 GiB)
    top_k, bottom_k = min(top_k, len(manifest)), min(bottom_k, len(manifest))
    activation_map_rows(manifest, activation_images)  # unknown paths fail before any work
    shapes = activation_shapes(model, layers)
    classes = [label_index(lbl, model.classes.index_of) for lbl in manifest["label"]]
    shards = plan_shards(len(manifest), opts.shard_size)
    fps = [shard_fingerprint(JOB, manifest, s, prov, layers, top_k, bottom_k, STATE_FORMAT) for s in shards]

    def shard_kwargs(s: Shard) -> dict:
        items = shard_items(manifest, opts.data, s)
        return dict(store_path=opts.store, job=JOB, shard=s.id, items=items, labels=[classes[i] for i, _ in items],
                    model=opts.model, weights=opts.weights, device=opts.device, batch_size=opts.batch_size,
                    shapes=shapes, top_k=top_k, bottom_k=bottom_k)

    with stage(store, JOB, "statistics"):
        results = map_shards(catalog_shard, store, JOB, shards, fps, shard_kwargs, opts.progress)
    manifest = record_failures(store, results)
    with stage(store, JOB, "reduce"):
        states = reduce_tree(opts.store, JOB, [s.id for s in shards]) if shards else {
            layer: ChannelStats.empty(c, (h, w), top_k, bottom_k, len(model.classes))
            for layer, (c, h, w) in shapes.items()}
        attrs = {**prov, "top_k": top_k, "bottom_k": bottom_k}
        facts = save_catalog.submit(opts.store, states, attrs).result()
    # beside the patch pass (their arrays are their own): the first-layer filters, the activation maps
    filters = save_filter_grid.submit(opts.store, opts.model, opts.weights, opts.device, prov)
    map_rows = [i for i in activation_map_rows(manifest, activation_images) if manifest["status"].iloc[i] == "ok"]
    maps = save_activation_maps.submit(opts.store, [(i, dataset_file(opts.data, manifest["path"].iloc[i]))
                                                    for i in map_rows], layers, opts.model, opts.weights,
                                       opts.device, prov)

    rfs = model_receptive_fields(model)
    n_project = {layer: shapes[layer][0] if projections is None else min(projections, shapes[layer][0])
                 for layer in layers}
    crop = model.preprocessing.crop
    sizes = {layer: patch_size(rfs[layer], crop) for layer in layers}
    blocks = channel_blocks({layer: shapes[layer][0] for layer in layers}, {
        layer: unit_output_bytes(sizes[layer], top_k + bottom_k, crop, n_project[layer] > 0) for layer in layers})
    for layer in layers:
        c, p = shapes[layer][0], sizes[layer]
        cb = UNIT_CHUNK
        base, a = f"catalog/{layer}", {**attrs, "layer": layer}
        for which, k in (("top", top_k), ("bottom", bottom_k)):
            store.create_array(f"{base}/{which}_patch", (c, k, p, p, 3), "uint8", chunks=(cb, k, p, p, 3),
                               attrs={**a, "what": f"RF box of the argmax of each {which}-K image, squared, {p} px"})
        store.create_array(f"{base}/overlay", (c, OVERLAY_SIZE, OVERLAY_SIZE, 3), "uint8",
                           chunks=(cb, OVERLAY_SIZE, OVERLAY_SIZE, 3),
                           attrs={**a, "what": "top-1 image with the unit's activation map"})
        if n_project[layer]:
            store.create_array(f"{base}/projection", (n_project[layer], p, p, 3), "uint8", chunks=(cb, p, p, 3),
                               attrs={**a, "rule": projection_rule,
                                      "what": f"{projection_rule} projection of the top-1 activation, RF box"})
    patch_fps = [fingerprint(PATCH_JOB, prov, fingerprint(*fps), block, projections, projection_rule, _digest(*(
        store.array(f"catalog/{layer}/{name}")[c0:c1] for layer, (c0, c1) in block.items()
        for name in ("top_index", "top_yx", "bottom_index", "bottom_yx")))) for block in blocks]
    with stage(store, JOB, "patches"):
        patch_results = map_shards(catalog_patches, store, PATCH_JOB, [Shard(j, j, j + 1) for j in range(len(blocks))],
                                   patch_fps, lambda s: dict(
                                       store_path=opts.store, job=PATCH_JOB, block=s.id, data=opts.data,
                                       channel_ranges=blocks[s.id], rfs={layer: rfs[layer] for layer in layers},
                                       model=opts.model, weights=opts.weights,
                                       device=opts.device, batch_size=opts.batch_size,
                                       projections=max(n_project.values()), rule=projection_rule), opts.progress)
    filters.result(), maps.result()
    with stage(store, JOB, "featvis"):
        featvis = run_featvis(opts, store, layers, featvis_n, attrs)
    seconds = {}
    for r in results + patch_results:
        for k, v in r.get("seconds", {}).items():
            seconds[k] = round(seconds.get(k, 0.0) + v, 3)
    record_job(store, JOB, opts, layers=layers, top_k=top_k, bottom_k=bottom_k, units=facts,
               featvis=featvis, seconds=seconds)
    return {"layers": facts, "featvis": featvis, "seconds": seconds}


def activation_map_rows(manifest, chosen: int | list[str]) -> list[int]:
    """Manifest rows of the images whose activation maps are kept: the first N usable ones, or the given paths."""
    usable = manifest.index[manifest["status"] == "ok"]
    if isinstance(chosen, int):
        return [int(i) for i in usable[:max(0, chosen)]]
    row_of = {str(p): i for i, p in zip(manifest.index, manifest["path"])}
    check_in_dataset(chosen, row_of)
    return [int(row_of[p]) for p in dict.fromkeys(chosen)]


def check_in_dataset(chosen: list[str], dataset: Container[str]) -> None:
    """Every `--activation-images` path is one of the dataset's (as the manifest names them)."""
    unknown = [p for p in chosen if p not in dataset]
    if unknown:
        raise InputError(f"--activation-images: not in the dataset: {', '.join(unknown[:3])}"
                         f"{' ...' if len(unknown) > 3 else ''} (give paths relative to --data)")


def check_activation_images(opts: RunOptions, chosen: int | list[str]) -> None:
    """Before the flow: every path given is in the dataset, told from a listing of the data
    folder (the files the scan will list) without hashing them all first."""
    if isinstance(chosen, int):
        return
    opts = resolve_paths(opts, JOB)  # the scan leaves out the store and report
    check_in_dataset(chosen, {e.path for e in list_images(opts.data, (opts.store, opts.report), opts.limit)})


def run_featvis(opts: RunOptions, store: Store, layers: list[str], n: int, attrs: dict) -> dict:
    """Feature visualisations of the first `n` units of each layer, skipping dead units; a
    batch of units is a shard with its marker, so a rerun or a resume renders only the missing."""
    if n <= 0:
        return {}
    done, batches = {}, []
    for layer in layers:
        dead = store.read(f"catalog/{layer}/stats/dead")
        units = min(n, len(dead))
        store.create_array(f"catalog/{layer}/featvis", (units, FEATVIS_SIZE, FEATVIS_SIZE, 3), "uint8",
                           chunks=(1, FEATVIS_SIZE, FEATVIS_SIZE, 3),
                           attrs={**attrs, "layer": layer, "size": FEATVIS_SIZE, "steps": FEATVIS_STEPS, "seed": 0,
                                  "dead_units": np.flatnonzero(dead[:units]).tolist(),
                                  "what": "feature visualisation (engine.optvis.visualize_unit); dead units left black"})
        live = [int(c) for c in np.flatnonzero(~dead[:units])]
        done[layer] = {"units": units, "rendered": len(live), "dead": units - len(live)}
        # the array's shape is in the fingerprint: one of another shape is made anew, empty
        batches += [(layer, live[i:i + FEATVIS_BATCH], units) for i in range(0, len(live), FEATVIS_BATCH)]
    fps = [fingerprint(FEATVIS_JOB, attrs, layer, channels, units, FEATVIS_SIZE, FEATVIS_STEPS, 0)
           for layer, channels, units in batches]
    map_shards(catalog_featvis, store, FEATVIS_JOB, [Shard(j, j, j + 1) for j in range(len(batches))], fps,
               lambda s: dict(store_path=opts.store, job=FEATVIS_JOB, shard=s.id, layer=batches[s.id][0],
                              channels=batches[s.id][1], model=opts.model, weights=opts.weights, device=opts.device,
                              size=FEATVIS_SIZE, steps=FEATVIS_STEPS, seed=0), opts.progress)
    return done


@task(name="catalog-artifacts")
def publish_catalog_artifacts(store_path: str, report_dir: str) -> None:
    """A table of the catalogued layers and a link to the atlas, as Prefect artifacts."""
    store = Store(store_path, mode="r")
    rows = []
    for layer in store.groups("catalog"):
        s = store.attrs(f"catalog/{layer}/stats")
        rate = store.read(f"catalog/{layer}/stats/rate")
        sel = store.read(f"catalog/{layer}/stats/selectivity")
        rows.append({"layer": layer, "units": len(rate), "images": s.get("images"), "dead units": s.get("dead_units"),
                     "mean firing rate": round(float(np.nanmean(rate)), 4) if len(rate) else None,
                     "most selective unit": int(np.nanargmax(sel)) if np.isfinite(sel).any() else None,
                     "max selectivity": round(float(np.nanmax(sel)), 4) if np.isfinite(sel).any() else None})
    key = _artifact_key(store_path)
    create_table_artifact(rows, key=key + "-catalog", description="neurocat catalogue: layers")
    atlas = Path(report_dir) / "catalog" / "index.html"
    create_link_artifact(atlas.resolve().as_uri(), link_text="neuron atlas", key=key + "-atlas")


@flow(name="catalog", log_prints=True, task_runner=threads_runner())
def catalog_flow(opts: RunOptions, layers=DEFAULT_LAYERS, top_k: int = 16, bottom_k: int = 8, featvis_n: int = 0,
                 projections: int | None = None, projection_rule: str = "guided",
                 activation_images: int | list[str] = ACTIVATION_IMAGES) -> dict:
    opts = resolve_paths(opts, JOB)
    store = Store(opts.store)
    with store.lock():
        result = run_catalog(opts, store, layers, top_k, bottom_k, featvis_n, projections, projection_rule,
                             activation_images)
        report = publish_report(opts.store, opts.report)
        publish_catalog_artifacts(opts.store, opts.report)
    return {"store": opts.store, "report": str(report), **report_outputs(opts.report, atlas="catalog/index.html"),
            **result}
