"""Render tasks: one render (or one slice of a folder for fast style) each, written to `/render/<kind>/<name>`.

A render is skipped when its array already carries the fingerprint of the same inputs,
parameters and model, so a rerun of a killed flow only does what is missing.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone

import numpy as np
from prefect import task

from engine.attacks import FoolingOptions, fooling_render
from engine.classvis import ClassVisOptions, InvertOptions, class_visualisation, invert_features
from engine.dream import DreamOptions, deep_dream
from engine.fast_style import Checkpoint, FastStyleOptions, apply_fast_style, train_fast_style
from engine.images import open_image
from engine.models import cached_model
from engine.optvis.featvis import feature_visualisation
from engine.optvis.param import image_to_tensor, tensor_to_image
from engine.style import StyleOptions, TextureOptions, fit_size, style_transfer, synthesize_texture
from storage.store import Store, fingerprint


def load_image(path: str, size: int | None = None) -> np.ndarray:
    """uint8 [H, W, 3] of a file, its shorter side resized to `size` when given."""
    img = np.asarray(open_image(path))
    return tensor_to_image(fit_size(image_to_tensor(img), size))[0] if size else img


def _tuples(p: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in p.items()}


def _without_record(options, p: dict):
    """The kind's options from its parameters; `record` (steps to snapshot) goes to the loop."""
    return options(**{k: v for k, v in p.items() if k != "record"})


RENDERERS = {
    "dream": lambda m, p, paths: deep_dream(m, load_image(paths[0], p.pop("size")), DreamOptions(**p)),
    "style": lambda m, p, paths: style_transfer(m, load_image(paths[0]), [load_image(s) for s in paths[1:]],
                                                StyleOptions(**_tuples(p))),
    "texture": lambda m, p, paths: synthesize_texture(m, load_image(paths[0]), TextureOptions(**_tuples(p))),
    "classvis": lambda m, p, paths: class_visualisation(m, p.pop("class_index"), _without_record(ClassVisOptions, p),
                                                        record=tuple(p.get("record", ()))),
    "invert": lambda m, p, paths: invert_features(m, load_image(paths[0]), _without_record(InvertOptions, p),
                                                  record=tuple(p.get("record", ()))),
    "featvis": lambda m, p, paths: feature_visualisation(m, **p),
    "fooling": lambda m, p, paths: fooling_render(m, p.pop("class_index"), load_image(paths[0], p["size"]) if paths
                                                  else None, FoolingOptions(**p)),
}


def _already(store: Store, key: str, fp: str) -> bool:
    return store.has(key) and store.attrs(key).get("fingerprint") == fp


def _curve(losses: np.ndarray, n: int = 200) -> list[float]:
    idx = np.unique(np.linspace(0, len(losses) - 1, min(n, len(losses))).round().astype(int)) if len(losses) else []
    return [float(losses[i]) for i in idx]


@task(name="render", retries=1, retry_delay_seconds=1)
def render_task(store_path: str, kind: str, name: str, params: dict, inputs: list[str], model: str,
                weights: str | None, device: str) -> dict:
    m = cached_model(model, weights, device)
    store = Store(store_path)
    key = f"render/{kind}/{name}"
    fp = fingerprint(kind, name, params, inputs, m.describe())
    if _already(store, key, fp):
        return {"name": name, "skipped": True}
    t0 = time.perf_counter()
    result = RENDERERS[kind](m, dict(params), inputs)
    attrs = {"kind": kind, "name": name, "params": params, "inputs": inputs, **m.describe(),
             "seconds": round(time.perf_counter() - t0, 3), "finished": datetime.now(timezone.utc).isoformat(),
             "loss_first": float(result.losses[0]), "loss_last": float(result.losses[-1]),
             "losses": _curve(result.losses), "settings": result.settings, "facts": result.facts, "fingerprint": fp}
    if result.snapshots:
        store.write_array(f"render/{kind}/_steps/{name}", np.stack([s[1][0] for s in result.snapshots]),
                          attrs={"steps": [s[0] for s in result.snapshots], "of": key})
    else:  # an earlier render of this name recorded steps: they are not this one's
        store.delete(f"render/{kind}/_steps/{name}")
    for b, image in enumerate(result.images):  # a batched featvis writes one array per unit
        store.write_array(key if len(result.images) == 1 else f"{key}-{b}", image, attrs)
    return {"name": name, "seconds": attrs["seconds"], "loss_first": attrs["loss_first"],
            "loss_last": attrs["loss_last"]}


@task(name="fast-style-train", retries=0)
def fast_style_train_task(store_path: str, name: str, styles: list[str], train_images: list[str], params: dict,
                          model: str, weights: str | None, device: str) -> dict:
    """Train (or reuse) the checkpoint `/render/fast-style/_checkpoints/<name>/<tensor>`."""
    m = cached_model(model, weights, device)
    store = Store(store_path)
    group = f"render/fast-style/_checkpoints/{name}"
    fp = fingerprint("fast-style", styles, train_images, params, m.describe())
    if store.has(group) and store.attrs(group).get("fingerprint") == fp:
        return {"checkpoint": group, "skipped": True}
    t0 = time.perf_counter()
    content = [np.asarray(open_image(p)) for p in train_images]
    ck, losses = train_fast_style(m, content, [load_image(s) for s in styles], FastStyleOptions(**params))
    for k, v in ck.arrays.items():
        store.write_array(f"{group}/{k}", v)
    store.root.require_group(group).attrs.update(
        {"config": ck.config, "styles": styles, "train_images": len(train_images), "fingerprint": fp,
         "seconds": round(time.perf_counter() - t0, 3), "losses": _curve(losses), **m.describe()})
    return {"checkpoint": group, "seconds": round(time.perf_counter() - t0, 3),
            "loss_first": float(losses[0]), "loss_last": float(losses[-1])}


def load_checkpoint(store: Store, group: str) -> Checkpoint:
    attrs = store.attrs(group)
    names = [k for k in store.root[group].array_keys()]
    return Checkpoint({k: store.read(f"{group}/{k}") for k in names}, attrs["config"])


@task(name="fast-style-apply", retries=1, retry_delay_seconds=1)
def fast_style_apply_task(store_path: str, checkpoint: str, items: list[tuple[str, str]], style: int | list[float],
                          size: int | None) -> dict:
    """Stylise `items` ((name, path)) with the stored checkpoint; one array per image."""
    store = Store(store_path)
    net = load_checkpoint(store, checkpoint).build()
    ck_fp = store.attrs(checkpoint)["fingerprint"]
    done = []
    for name, path in items:
        key = f"render/fast-style/{name}"
        fp = fingerprint(ck_fp, path, style, size)
        if _already(store, key, fp):
            continue
        t0 = time.perf_counter()
        out = apply_fast_style(net, load_image(path, size), style)
        store.write_array(key, out, {"kind": "fast-style", "name": name, "inputs": [path], "checkpoint": checkpoint,
                                     "params": {"style": style, "size": size}, "fingerprint": fp,
                                     "seconds": round(time.perf_counter() - t0, 3),
                                     "finished": datetime.now(timezone.utc).isoformat(),
                                     **{k: v for k, v in store.attrs(checkpoint).items() if k in
                                        ("model", "weights", "weights_sha256", "preprocessing", "code_version")}})
        done.append(name)
    return {"rendered": len(done)}
