"""`neurocat render <kind>`: renders into `/render/<kind>/<name>`, one task per render.

A render kind with many renders (a style over a folder, a grid of style weights, one
class per render) fans out as parallel tasks on the runner; fast style trains one
checkpoint, then stylises the folder in slices. Jobs are plain dicts
`{"name", "params", "inputs"}` planned by the command line (or the demo).
"""

from __future__ import annotations

from prefect import flow

from flows.common import RunOptions, record_job, resolve_paths, stage
from flows.report import publish_report
from flows.runners import threads_runner
from storage.store import Store
from tasks.render import fast_style_apply_task, fast_style_train_task, render_task


def run_renders(opts: RunOptions, store: Store, kind: str, jobs: list[dict]) -> list[dict]:
    """Submit every render of `kind` at once and wait; used by render_flow and the demo."""
    job = f"render-{kind}"
    with stage(store, job, "render"):
        futures = [render_task.with_options(task_run_name=f"{job}-{j['name']}").submit(
            store_path=opts.store, kind=kind, name=j["name"], params=j["params"], inputs=j.get("inputs", []),
            model=opts.model, weights=opts.weights, device=opts.device) for j in jobs]
        results = [f.result() for f in futures]
    record_job(store, job, opts, renders=len(results), names=[j["name"] for j in jobs])
    return results


def run_fast_style(opts: RunOptions, store: Store, name: str, styles: list[str], train_images: list[str],
                   params: dict, apply_items: list[tuple[str, str]], style: int | list[float] = 0,
                   size: int | None = None, per_task: int = 16) -> dict:
    """Train (or reuse) a checkpoint, then stylise `apply_items` in parallel slices."""
    job = "render-fast-style"
    with stage(store, job, "train"):
        trained = fast_style_train_task.submit(store_path=opts.store, name=name, styles=styles,
                                               train_images=train_images, params=params, model=opts.model,
                                               weights=opts.weights, device=opts.device).result()
    with stage(store, job, "apply"):
        slices = [apply_items[i:i + per_task] for i in range(0, len(apply_items), per_task)]
        futures = [fast_style_apply_task.submit(store_path=opts.store, checkpoint=trained["checkpoint"], items=s,
                                                style=style, size=size) for s in slices]
        rendered = sum(f.result()["rendered"] for f in futures)
    record_job(store, job, opts, checkpoint=trained["checkpoint"], images=len(apply_items))
    return {**trained, "images": len(apply_items), "rendered": rendered}


@flow(name="render", log_prints=True, task_runner=threads_runner())
def render_flow(opts: RunOptions, kind: str, jobs: list[dict] | None = None, fast_style: dict | None = None) -> dict:
    opts = resolve_paths(opts, f"render-{kind}")
    store = Store(opts.store)
    with store.lock():
        if kind == "fast-style":
            facts = run_fast_style(opts, store, **fast_style)
        else:
            results = run_renders(opts, store, kind, jobs or [])
            facts = {"renders": len(results), "skipped": sum(bool(r.get("skipped")) for r in results)}
        report = publish_report(opts.store, opts.report)
    return {"store": opts.store, "report": str(report), "kind": kind, **facts}


def run_demo_renders(opts: RunOptions, store: Store) -> list[dict]:
    """A few cheap renders of the demo images (small, few steps): the demo must stay quick.
    The shipped data's chow and zebra; on another --data, its first two usable images."""
    from pathlib import Path

    from engine.files import dataset_file

    data = Path(opts.data)
    chow, zebra = str(data / "n02112137" / "n02112137_chow.jpg"), str(data / "n02391049" / "n02391049_zebra.jpg")
    if not (Path(chow).is_file() and Path(zebra).is_file()):
        usable = store.read_manifest().query("status == 'ok'")["path"].tolist()
        if not usable:
            return []
        chow, zebra = (dataset_file(data, p) for p in (usable * 2)[:2])
    plans = {
        "dream": [{"name": "chow", "inputs": [chow], "params": {"size": 128, "octaves": 2, "steps": 6, "seed": 0}}],
        "style": [{"name": "chow-zebra", "inputs": [chow, zebra], "params": {"size": 96, "steps": 25, "seed": 0}}],
        "texture": [{"name": "zebra", "inputs": [zebra], "params": {"size": 96, "steps": 25, "seed": 0}}],
        "classvis": [{"name": "340-zebra", "params": {"class_index": 340, "size": 96, "steps": 30, "seed": 0}}],
    }
    return [r for kind, jobs in plans.items() for r in run_renders(opts, store, kind, jobs)]
