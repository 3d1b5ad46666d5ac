"""Tasks of `neurocat catalog`: the per-shard statistics pass, the tree reduce, the patch pass.

Pass 1 (`catalog_shard`): forward every image of a shard once, fold each layer's output into
its `ChannelStats`, save the state beside the shard marker (npz, no pickle), marker last.
Reduce (`merge_catalog_states`): merge shard states pairwise, up a tree of tasks.
Pass 2 (`catalog_patches`): for one block of channels of every layer, read only the
images on those channels' top/bottom lists (from pass 1's bounded in-process cache of
decoded images where it still holds them, else decoded again), crop patches, overlays,
and project the top-1 activations.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from collections import OrderedDict, defaultdict
from itertools import chain

import numpy as np
from prefect import task

from engine.atlas import filter_grid
from engine.catalog import catalog_arrays, extract_patches, overlays, project_units, square_boxes, stats_summary
from engine.files import dataset_file, file_version
from engine.images import DecodedBatches
from engine.inference import run_layers
from engine.models import cached_model
from engine.optvis import visualize_unit
from engine.receptive_field import RF
from engine.topk import ChannelStats, LayerStates, merge_states, states_from_arrays, states_to_arrays
from storage.store import Store
from tasks.sharding import skip_if_done


def _timed_batches(batches, seconds: dict):
    """Iterate `batches`, adding the time spent waiting for each one to seconds["decode"]."""
    it = iter(batches)
    while True:
        t0 = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            return
        seconds["decode"] += time.perf_counter() - t0
        yield batch


class DecodedImages:
    """Preprocessed images pass 1 decoded, kept in this process (at most `capacity`) for pass 2.

    The patch pass reads the images on some top/bottom list again: on a dataset of at most
    `capacity` images that is nearly all of them, and decoding them a second time costs about
    a third of the forward pass up to a mid layer; beyond that it reads at most C * (K + bottom-K)
    images whatever N, and finds here the most recent ones. Keyed by path, file size and
    modification time and preprocessing, so a changed file is decoded again. Oldest out first.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._images: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def _key(path: str, prep) -> tuple | None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        return path, *file_version(st), repr(prep)

    def put(self, paths: list[str], images: np.ndarray, prep) -> None:
        with self._lock:
            for path, image in zip(paths, images):
                key = self._key(path, prep)
                if key is not None:
                    self._images[key] = image
                    self._images.move_to_end(key)
            while len(self._images) > self.capacity:
                self._images.popitem(last=False)

    def batches(self, items: list[tuple[int, str]], prep, batch_size: int):
        """Batches (indices, images) of the items found here, and the items that were not."""
        found, missing = [], []
        with self._lock:
            for i, path in items:
                image = self._images.get(self._key(path, prep))
                if image is None:
                    missing.append((i, path))
                else:
                    found.append((i, image))
        chunks = [found[s:s + batch_size] for s in range(0, len(found), batch_size)]
        return [(np.array([i for i, _ in c], np.int64), np.stack([a for _, a in c])) for c in chunks], missing


@functools.cache
def decoded_images() -> DecodedImages:
    """The process's cache: 256 images of 224 px, 38 MB (a constant, so memory stays flat in N).

    Made on first use, not at import: Dask pickles the shard tasks by value with the module
    globals they name, and a cache instance (its lock) cannot be pickled."""
    return DecodedImages(capacity=256)


@task(name="catalog-shard", retries=2, retry_delay_seconds=1)
@skip_if_done
def catalog_shard(store_path: str, job: str, shard: int, items: list[tuple[int, str]], labels: list[int],
                  model: str, weights: str | None, device: str, batch_size: int,
                  shapes: dict[str, tuple[int, int, int]], top_k: int, bottom_k: int, fp: str) -> dict:
    """Statistics of one shard's images for every layer, saved as the shard's state."""
    m = cached_model(model, weights, device)
    states = {layer: ChannelStats.empty(c, (h, w), top_k, bottom_k, len(m.classes))
              for layer, (c, h, w) in shapes.items()}
    label_of = dict(zip((i for i, _ in items), labels))
    path_of = dict(items)
    seconds = defaultdict(float)
    decoded = DecodedBatches(items, m.preprocessing, batch_size)
    for batch in _timed_batches(decoded, seconds):
        decoded_images().put([path_of[int(i)] for i in batch.indices], batch.images.numpy(), m.preprocessing)
        t0 = time.perf_counter()
        acts = run_layers(m, batch.normalized(m.preprocessing, m.device), list(states))
        t1 = time.perf_counter()
        batch_labels = np.array([label_of[int(i)] for i in batch.indices], np.int64)
        for layer, state in states.items():
            state.add(acts[layer], batch.indices, batch_labels)
        seconds["forward"] += t1 - t0
        seconds["update"] += time.perf_counter() - t1
    store = Store(store_path)
    store.save_shard_arrays(job, shard, states_to_arrays(states))
    result = {"failed": decoded.failed, "images": len(items) - len(decoded.failed),
              "seconds": {k: round(v, 4) for k, v in seconds.items()}}
    store.mark_shard_done(job, shard, fp, result)
    return result


@task(name="catalog-merge")
def merge_catalog_states(store_path: str, job: str, parts: list) -> LayerStates:
    """Merge shard states (a shard id: its saved state) or already merged states into one."""
    store = Store(store_path)
    return merge_states([states_from_arrays(store.load_shard_arrays(job, p)) if isinstance(p, int) else p
                         for p in parts])


@task(name="catalog-save")
def save_catalog(store_path: str, states: LayerStates, attrs: dict) -> dict:
    """Write the reduced statistics of every layer; returns {layer: facts} for the job record."""
    store = Store(store_path)
    facts = {}
    for layer, state in states.items():
        for name, (array, extra) in catalog_arrays(state).items():
            store.write_array(f"catalog/{layer}/{name}", array, {**attrs, "layer": layer, **extra})
        summary = stats_summary(state)
        store.update_attrs(f"catalog/{layer}/stats", **attrs, layer=layer, **summary)
        facts[layer] = {"images": int(state.count), "units": state.channels, "dead_units": summary["dead_units"]}
    return facts


@task(name="catalog-filters")
def save_filter_grid(store_path: str, model: str, weights: str | None, device: str, attrs: dict) -> None:
    """The model's first-layer filters as one image, each filter normalised on its own."""
    m = cached_model(model, weights, device)
    layer = m.spec.first_conv
    grid = filter_grid(m.layer(layer).weight.detach().cpu().numpy())
    Store(store_path).write_array("catalog/first_layer_filters", grid, {**attrs, "layer": layer})


@task(name="catalog-activation-maps", retries=2, retry_delay_seconds=1)
def save_activation_maps(store_path: str, items: list[tuple[int, str]], layers: list[str], model: str,
                         weights: str | None, device: str, attrs: dict) -> list[int]:
    """Every unit's activation map on a few images, float16 [M, C, H, W] per layer; returns the images' indices.

    Batches through the model cut after the layers; images that fail to decode are left out.
    """
    m = cached_model(model, weights, device)
    done, inputs, maps = [], [], {layer: [] for layer in layers}
    for batch in DecodedBatches(items, m.preprocessing, max(1, min(len(items), 32))):
        acts = run_layers(m, batch.normalized(m.preprocessing, m.device), layers)
        done += [int(i) for i in batch.indices]
        inputs.append(batch.images.numpy())
        for layer in layers:
            a = acts[layer].float().cpu().numpy()
            maps[layer].append(a.reshape(*a.shape[:2], *a.shape[2:], *(1,) * (4 - a.ndim)).astype(np.float16))
    if not done:
        return done
    store = Store(store_path)
    manifest = store.read_manifest()
    where = {"image_index": done, "paths": [str(manifest["path"].iloc[i]) for i in done]}
    store.write_array("catalog/activation_inputs", np.concatenate(inputs), {
        **attrs, **where, "what": "the preprocessed images the activation maps were computed on, uint8 [image, y, x, 3]"})
    for layer in layers:
        array = np.concatenate(maps[layer])
        store.write_array(f"catalog/{layer}/activation_maps", array, {
            **attrs, **where, "layer": layer, "what": "every unit's activation map (the layer's output) on these images, float16 [image, unit, y, x]"},
            chunks=(1, *array.shape[1:]))
    return done


@task(name="catalog-patches", retries=2, retry_delay_seconds=1)
@skip_if_done(id_param="block")
def catalog_patches(store_path: str, job: str, block: int, data: str, channel_ranges: dict[str, tuple[int, int]],
                    rfs: dict[str, RF], model: str, weights: str | None, device: str, batch_size: int,
                    projections: int, rule: str, fp: str) -> dict:
    """Patches, top-1 overlays and projections of channels [c0, c1) of every layer.

    Reads only the images on those channels' top/bottom lists, in batches, so memory is
    bounded by the block's outputs plus a few decoded batches.
    """
    m = cached_model(model, weights, device)
    store = Store(store_path)
    crop = m.preprocessing.crop
    seconds = defaultdict(float)
    work = {layer: _BlockWork(store, layer, c0, c1, rfs[layer], crop, projections)
            for layer, (c0, c1) in channel_ranges.items() if c1 > c0}
    needed = np.unique(np.concatenate([w.image_indices() for w in work.values()] + [np.zeros(0, np.int64)]))
    manifest = store.read_manifest()
    items = [(int(i), dataset_file(data, manifest["path"].iloc[i])) for i in needed]
    kept, missing = decoded_images().batches(items, m.preprocessing, batch_size)
    decoded = ((b.indices, b.images.numpy()) for b in DecodedBatches(missing, m.preprocessing, batch_size))
    for indices, images in _timed_batches(chain(kept, decoded), seconds):
        for w in work.values():
            w.consume(indices, images, seconds)
    for w in work.values():
        w.project(m, rule, seconds)
        w.write(store)
    result = {"images": len(needed), "decoded_again": len(missing),
              "seconds": {k: round(v, 4) for k, v in seconds.items()}}
    store.mark_shard_done(job, block, fp, result)
    return result


class _BlockWork:
    """The outputs of one layer's channel block, filled batch by batch of decoded images."""

    def __init__(self, store: Store, layer: str, c0: int, c1: int, rf, crop: int, projections: int):
        base = f"catalog/{layer}"
        self.layer, self.base, self.c0, self.c1, self.rf = layer, base, c0, c1, rf
        self.lists = {which: (store.array(f"{base}/{which}_index")[c0:c1], store.array(f"{base}/{which}_yx")[c0:c1])
                      for which in ("top", "bottom")}
        self.maps = store.array(f"{base}/top1_map")[c0:c1].astype(np.float32)
        self.size = store.array(f"{base}/top_patch").shape[-2]
        self.overlay_size = store.array(f"{base}/overlay").shape[-2]
        self.boxes = square_boxes(rf, self.maps.shape[1:], crop, crop)
        self.patches = {which: np.zeros(idx.shape + (self.size, self.size, 3), np.uint8)
                        for which, (idx, _) in self.lists.items()}
        self.overlay = np.zeros((c1 - c0, self.overlay_size, self.overlay_size, 3), np.uint8)
        self.n_project = max(0, min(c1, projections) - c0)
        self.top1_value = store.array(f"{base}/top_value")[c0:c0 + self.n_project, 0]
        self.top1_image = np.zeros((self.n_project, crop, crop, 3), np.uint8)  # projected after the last batch
        self.projection = np.zeros((self.n_project, self.size, self.size, 3), np.uint8)

    def image_indices(self) -> np.ndarray:
        return np.concatenate([idx[idx >= 0] for idx, _ in self.lists.values()])

    def consume(self, indices: np.ndarray, images: np.ndarray, seconds: dict):
        """Crops and overlays of the units whose images are in this batch; keeps top-1 images to project."""
        t0 = time.perf_counter()
        for which, (idx, yx) in self.lists.items():
            hit = np.isin(idx, indices)
            if hit.any():
                rows = np.searchsorted(indices, idx[hit])
                self.patches[which][hit] = extract_patches(images, rows, yx[hit], self.boxes, self.size)
        top_idx = self.lists["top"][0][:, 0]
        units = np.flatnonzero(np.isin(top_idx, indices))
        rows = np.searchsorted(indices, top_idx[units])
        if len(units):
            self.overlay[units] = overlays(images, rows, self.maps[units], self.overlay_size)
        keep = units < self.n_project
        self.top1_image[units[keep]] = images[rows[keep]]
        seconds["patches"] += time.perf_counter() - t0

    def project(self, m, rule: str, seconds: dict) -> None:
        """Projections of the first units' top-1 activations, on receptive-field windows, batched."""
        t0 = time.perf_counter()
        units = np.flatnonzero(self.lists["top"][0][:self.n_project, 0] >= 0)
        self.projection[units] = project_units(
            m, self.layer, self.top1_image[units], units + self.c0, self.lists["top"][1][units, 0], self.boxes,
            self.size, rule, rf=self.rf, expected=self.top1_value[units])
        seconds["projection"] += time.perf_counter() - t0

    def write(self, store: Store) -> None:
        for which, patches in self.patches.items():
            store.write_rows(f"{self.base}/{which}_patch", self.c0, patches)
        store.write_rows(f"{self.base}/overlay", self.c0, self.overlay)
        if self.n_project:
            store.write_rows(f"{self.base}/projection", self.c0, self.projection)


@task(name="catalog-featvis", retries=1)
@skip_if_done
def catalog_featvis(store_path: str, job: str, shard: int, layer: str, channels: list[int], model: str,
                    weights: str | None, device: str, size: int, steps: int, seed: int, fp: str) -> dict:
    """Feature visualisations of some units, optimised as one batch (engine.optvis, shared with renders)."""
    m = cached_model(model, weights, device)
    images = visualize_unit(m, layer, channels, size=size, steps=steps, seed=seed)
    store = Store(store_path)
    for c, image in zip(channels, images):
        store.write_rows(f"catalog/{layer}/featvis", c, np.asarray(image, np.uint8)[None])
    result = {"units": len(channels)}
    store.mark_shard_done(job, shard, fp, result)
    return result
