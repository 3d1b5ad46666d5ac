"""`neurocat explain`: attribution maps of every image, how faithful each method is, and masks.

Store layout written here:
  /explain/<method>                    float16 [N, H, W], per image scaled to max |value| 1;
                                       attrs: mean faithfulness scores, parameters, provenance
  /explain_info/target                 int32 [N]: the class explained (-1: not explained)
  /explain_info/prob                   float32 [N]: p(target)
  /explain_info/image                  uint8 [N, 112, 112, 3]: the crop, for overlays
  /explain_info/mask                   uint8 [N, H, W]: GrabCut foreground seeded by a map
  /explain_info/scores/<method>        float32 [N, 5]: deletion, insertion, road_morf, road_lerf, road
  /explain_info/scores/random          the same for a random ordering (the reference)
  /explain_info/integrated_gradients_completeness_error   float32 [N]
  /explain_info/integrated_gradients_steps                int32 [N]: steps after refinement
"""

from __future__ import annotations

import math

import numpy as np
from prefect import flow

from engine import attribution
from engine.errors import InputError
from engine.explanations import IMAGE_SIDE, REFERENCE
from engine.faithfulness import BETTER, SCORES
from engine.models import cached_model
from flows.common import (RunOptions, map_shards, model_provenance, plan_shards, record_failures, record_job,
                          resolve_paths, scan_dataset, shard_fingerprint, shard_items, stage)
from flows.report import publish_report
from flows.runners import threads_runner
from storage.store import Store, fingerprint
from tasks.explain import INFO, explain_shard

JOB = "explain"
MAP_CHUNK_ROWS = 16  # rows per zarr chunk of a map array (a divisor of the shard size)


def check_methods(opts: RunOptions, methods: list[str], segment_with: str | None) -> None:
    """Fail before any work when a method cannot run on this model, or masks would be seeded
    by a method not run (`auto` always names one). The CLI calls it before the flow starts."""
    model = cached_model(opts.model, opts.weights, opts.device)
    if "cam" in methods and not attribution.is_gap_net(model):
        raise InputError(f"cam needs a net that ends in global average pooling + one linear layer; "
                         f"{opts.model} does not (use gradcam)")
    if segment_with not in (None, "auto") and segment_with not in methods:
        raise InputError(f"--segment-with {segment_with} is not one of the methods run ({', '.join(methods)})")


def create_arrays(store: Store, n: int, shard_size: int, side: int, methods: list[str], steps: int, segment: bool,
                  attrs: dict) -> None:
    """Every array of the job, before fanning out. A store explained with other settings is
    cleared first (its maps, scores and shard markers), so no array mixes two runs."""
    key = attrs["run_key"]
    if store.has(JOB) and store.attrs(JOB).get("run_key") != key:
        store.delete(JOB)
        store.delete(INFO)
        store.clear_job(JOB)
    chunk, rows = math.gcd(shard_size, MAP_CHUNK_ROWS), shard_size
    store.create_array(f"{INFO}/target", (n,), "int32", chunks=(rows,), fill_value=-1, attrs=attrs)
    store.create_array(f"{INFO}/prob", (n,), "float32", chunks=(rows,), attrs=attrs)
    store.create_array(f"{INFO}/image", (n, IMAGE_SIDE, IMAGE_SIDE, 3), "uint8", chunks=(chunk, IMAGE_SIDE, IMAGE_SIDE, 3),
                       attrs=attrs)
    if segment:
        store.create_array(f"{INFO}/mask", (n, side, side), "uint8", chunks=(chunk, side, side), attrs=attrs)
    if "integrated_gradients" in methods:
        store.create_array(f"{INFO}/integrated_gradients_completeness_error", (n,), "float32", chunks=(rows,),
                           attrs=attrs)
        store.create_array(f"{INFO}/integrated_gradients_steps", (n,), "int32", chunks=(rows,), attrs=attrs)
    for method in methods:
        store.create_array(f"{JOB}/{method}", (n, side, side), "float16", chunks=(chunk, side, side),
                           attrs={**attrs, "method": method})
    if steps:
        for name in [*methods, REFERENCE]:
            store.create_array(f"{INFO}/scores/{name}", (n, len(SCORES)), "float32", chunks=(rows, len(SCORES)),
                               attrs={**attrs, "columns": list(SCORES)})
    store.update_attrs(JOB, **attrs)


def summarize(store: Store, methods: list[str], steps: int) -> dict:
    """Mean of every faithfulness score per method (and the random reference) over the
    explained images; written into each map's attrs and returned."""
    explained = store.read(f"{INFO}/target") >= 0
    summary: dict[str, dict] = {}
    for name in [*methods, REFERENCE]:
        facts: dict = {"images": int(explained.sum())}
        if steps and explained.any():
            scores = store.read(f"{INFO}/scores/{name}")[explained]
            facts.update({k: float(np.mean(scores[:, i])) for i, k in enumerate(SCORES)})
        if name == "integrated_gradients" and explained.any():
            err = store.read(f"{INFO}/integrated_gradients_completeness_error")[explained]
            facts["completeness_error_median"] = float(np.median(err))
            facts["completeness_error_max"] = float(np.max(err))
            used = store.read(f"{INFO}/integrated_gradients_steps")[explained]
            facts["steps_median"], facts["steps_max"] = float(np.median(used)), int(np.max(used))
        summary[name] = facts
        if name != REFERENCE:
            store.update_attrs(f"{JOB}/{name}", faithfulness=facts)
    store.update_attrs(JOB, faithfulness=summary, better=BETTER)
    return summary


def run_explain(opts: RunOptions, store: Store, methods: str | list[str], target: str | int = "pred",
                params: dict[str, dict] | None = None, steps: int = 10, segment_with: str | None = "auto",
                max_images: int | None = None) -> dict:
    """Explain the first `max_images` usable-or-not rows (all by default) with `methods`.

    `target`: pred | label | class index. `params`: per-method keyword arguments of
    engine.attribution (e.g. {"integrated_gradients": {"steps": 64}}). `steps`: fractions of
    the deletion/insertion curves (0: no faithfulness scores). `segment_with`: the method
    whose map seeds GrabCut ("auto": saliency if run, else the first method; None: no masks).
    """
    methods = attribution.parse_methods(methods)
    target = attribution.parse_target(target)
    params = params or {}
    if "integrated_gradients" in methods:  # the refinement's settings in the attrs and the run key, defaults included
        params = {**params, "integrated_gradients": {"tolerance": attribution.IG_TOLERANCE,
                                                     "max_steps": attribution.IG_MAX_STEPS,
                                                     **params.get("integrated_gradients", {})}}
    if segment_with == "auto":
        segment_with = "saliency" if "saliency" in methods else methods[0]
    check_methods(opts, methods, segment_with)
    with stage(store, JOB, "scan"):
        scan_dataset(opts.store, opts.data, opts.limit, opts.report)
    manifest = store.read_manifest()
    n = len(manifest)
    rows = min(n, max_images) if max_images else n
    shards = plan_shards(rows, opts.shard_size)
    prov = model_provenance(opts)
    side = cached_model(opts.model, opts.weights, opts.device).preprocessing.crop
    settings = {"methods": methods, "target": target, "params": params, "faithfulness_steps": steps,
                "segment_with": segment_with}
    attrs = {**prov, **settings, "run_key": fingerprint(prov, settings, opts.shard_size, rows, n)}
    create_arrays(store, n, opts.shard_size, side, methods, steps, segment_with is not None, attrs)
    fps = [shard_fingerprint(JOB, manifest, s, prov, opts.batch_size, settings) for s in shards]

    def shard_kwargs(s) -> dict:
        items = shard_items(manifest, opts.data, s)
        return dict(store_path=opts.store, job=JOB, shard=s.id, start=s.start, stop=s.stop, items=items,
                    labels=[manifest.at[i, "label"] for i, _ in items], model=opts.model, weights=opts.weights,
                    device=opts.device, batch_size=opts.batch_size, methods=methods, target=target,
                    params=params, steps=steps, segment_with=segment_with)

    with stage(store, JOB, "explain"):
        results = map_shards(explain_shard, store, JOB, shards, fps, shard_kwargs, opts.progress)
    record_failures(store, results)
    summary = summarize(store, methods, steps)
    images = summary[methods[0]]["images"]
    record_job(store, JOB, opts, images=images, methods=methods, target=target, faithfulness=summary)
    return {"images": images, "methods": methods, "faithfulness": summary}


@flow(name="explain", log_prints=True, task_runner=threads_runner())
def explain_flow(opts: RunOptions, methods: str | list[str], target: str | int = "pred",
                 params: dict[str, dict] | None = None, steps: int = 10, segment_with: str | None = "auto",
                 max_images: int | None = None) -> dict:
    opts = resolve_paths(opts, JOB)
    store = Store(opts.store)
    with store.lock():
        result = run_explain(opts, store, methods, target, params, steps, segment_with, max_images)
        report = publish_report(opts.store, opts.report)
    return {"store": opts.store, "report": str(report), **result}
