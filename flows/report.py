"""`neurocat report`: (re)build the HTML report of a store and publish it as Prefect artifacts."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact

from reports.site import build_site
from storage.store import Store


def _artifact_key(store_path: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    stem = "".join(c if c.isalnum() else "-" for c in Path(store_path).stem.lower())
    return ("report-" + stem).strip("-")[:100]


@task(name="build-report")
def publish_report(store_path: str, out_dir: str) -> Path:
    """Build the site, then a markdown summary and a link artifact pointing at it."""
    index = build_site(store_path, out_dir)
    store = Store(store_path, mode="r")
    manifest = store.read_manifest()
    ok = int((manifest["status"] == "ok").sum()) if len(manifest) else 0
    jobs = store.attrs().get("jobs", {})
    lines = [f"# neurocat report: {Path(store_path).name}", "",
             f"* images usable: {ok} of {len(manifest)}",
             f"* jobs: {', '.join(jobs) or 'none'}",
             f"* report: `{index.resolve()}`"]
    for name, job in jobs.items():
        facts = {k: v for k, v in job.items() if k not in ("params", "finished", "code_version")}
        if facts:
            lines.append(f"* {name}: " + ", ".join(f"{k}={v}" for k, v in facts.items()))
    key = _artifact_key(store_path)
    create_markdown_artifact("\n".join(lines), key=key, description="neurocat run summary")
    create_link_artifact(index.resolve().as_uri(), link_text="HTML report", key=key + "-link")
    return index


@flow(name="report")
def report_flow(store: str, out: str) -> dict:
    index = publish_report(store, out)
    return {"store": store, "report": str(index)}
