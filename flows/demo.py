"""`neurocat demo`: every job on the small dataset the repo ships, into one store and one report."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from flows.adversarial import run_adversarial
from flows.audit import run_audit
from flows.catalog import run_catalog
from flows.common import RunOptions, resolve_paths
from flows.embed import run_embed
from flows.explain import run_explain
from flows.predict import run_predict
from flows.render import run_demo_renders
from flows.report import publish_report
from flows.runners import threads_runner
from storage.store import Store


def demo_data_path() -> Path:
    """The shipped demo images (inside the installed package, or the source tree)."""
    import neurocat

    return Path(neurocat.__file__).with_name("demo_data")


@flow(name="demo", log_prints=True, task_runner=threads_runner())
def demo_flow(opts: RunOptions) -> dict:
    opts = resolve_paths(opts.model_copy(update={"data": opts.data or str(demo_data_path())}), "demo")
    store = Store(opts.store)
    with store.lock():
        table = run_predict(opts, store)
        run_embed(opts, store)
        run_catalog(opts, store, top_k=8, bottom_k=4, featvis_n=2, projections=16)
        run_audit(opts, store)  # the planted copy_of_*.jpg shows up as a near-duplicate
        run_adversarial(opts, store, "fgsm", ["2/255", "8/255"])  # cheap: one gradient per image and eps
        run_explain(opts, store, "saliency,gradcam,guided_gradcam,cam", "pred", steps=5, max_images=8)  # kept cheap
        run_demo_renders(opts, store)  # a few small renders
        report = publish_report(opts.store, opts.report)
    return {"store": opts.store, "report": str(report), "images": len(table)}
