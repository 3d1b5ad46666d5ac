"""`neurocat report`: (re)build the HTML report of a store and publish it as Prefect artifacts.

Every run ends with three artifacts beside the report folder: a markdown summary (images,
jobs, sections and why any failed or was skipped), a table of sections and timings, and a
link to the report's index page. A section that fails is logged as a warning, never fatal.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from flows.runners import threads_runner
from reports.compare import build_comparison
from reports.site import Report, build_report
from storage.store import Store


def _artifact_key(*names: str) -> str:
    """A key per store (or pair of stores): readable stem plus a hash of the absolute paths,
    so two runs called `p.zarr` in different folders keep separate artifact histories.
    Prefect artifact keys allow lowercase letters, digits and dashes only."""
    stem = "-".join(Path(n).stem.lower() for n in names)
    stem = "".join(c if c.isalnum() else "-" for c in stem).strip("-")[:70].strip("-")
    digest = hashlib.sha256("\0".join(str(Path(n).resolve()) for n in names).encode()).hexdigest()[:8]
    return f"report-{stem}-{digest}"


def _md(text) -> str:
    """Markdown-inert text: file names and error messages must not become links or markup."""
    return "".join("\\" + c if c in "\\`*_{}[]<>()#+-.!|" else c for c in str(text)).replace("\n", " ")


def _status_rows(report: Report) -> list[dict]:
    return [{"section": st.key, "status": st.state,
             "details": st.section.summary if st.section else st.reason} for st in report.statuses]


def _timing_rows(timings: dict, run: str = "") -> list[dict]:
    return [{"run": run, "job": job, "stage": stage, "seconds": secs} if run else
            {"job": job, "stage": stage, "seconds": secs}
            for job, stages in timings.items() for stage, secs in stages.items()]


def summary_markdown(title: str, report: Report, facts: list[str]) -> str:
    lines = [f"# {_md(title)}", "", *[f"* {f}" for f in facts], f"* report: `{report.index.resolve()}`", "",
             "| section | status | details |", "|---|---|---|"]
    lines += [f"| {_md(r['section'])} | {r['status']} | {_md(r['details'])} |" for r in _status_rows(report)]
    return "\n".join(lines)


def _publish(report: Report, key: str, title: str, facts: list[str], timing_rows: list[dict]) -> None:
    logger = get_run_logger()
    for st in report.statuses:
        if st.state == "failed":
            logger.warning("report section %s failed: %s", st.key, st.reason)
    create_markdown_artifact(summary_markdown(title, report, facts), key=key, description="neurocat run summary")
    create_table_artifact(_status_rows(report), key=key + "-sections", description="report sections")
    if timing_rows:
        create_table_artifact(timing_rows, key=key + "-timings", description="seconds per job stage")
    create_link_artifact(report.index.resolve().as_uri(), link_text="HTML report", key=key + "-link")


@task(name="build-report")
def publish_report(store_path: str, out_dir: str) -> Path:
    """Build the site, then the summary, table and link artifacts; return index.html."""
    report = build_report(store_path, out_dir)
    d = report.dataset
    jobs = Store(store_path, mode="r").attrs().get("jobs", {})
    facts = [f"images usable: {d['ok']} of {d['files']} ({d['skipped']} skipped)", f"labels: {d['labels']}",
             f"jobs: {_md(', '.join(jobs) or 'none')}"]
    for name, job in jobs.items():
        extra = {k: v for k, v in job.items() if k not in ("params", "finished", "code_version")}
        if extra:
            facts.append(f"{_md(name)}: " + ", ".join(f"{_md(k)}={_md(v)}" for k, v in extra.items()))
    _publish(report, _artifact_key(store_path), f"neurocat report: {Path(store_path).name}", facts,
             _timing_rows(report.timings))
    return report.index


@task(name="build-comparison")
def publish_comparison(store_a: str, store_b: str, out_dir: str) -> Path:
    """Build the comparison site of two runs and publish its artifacts; return index.html."""
    report = build_comparison(store_a, store_b, out_dir)
    da, db = report.dataset["a"], report.dataset["b"]
    facts = [f"A: {_md(store_a)}: {da['ok']} of {da['files']} images usable",
             f"B: {_md(store_b)}: {db['ok']} of {db['files']} images usable"]
    timings = _timing_rows(report.timings["a"], "A") + _timing_rows(report.timings["b"], "B")
    _publish(report, _artifact_key(store_a, "vs", store_b),
             f"neurocat comparison: {Path(store_a).name} vs {Path(store_b).name}", facts, timings)
    return report.index


@flow(name="report", task_runner=threads_runner())
def report_flow(store: str, out: str, compare: str | None = None) -> dict:
    if compare:
        index = publish_comparison(store, compare, out)
        return {"store": store, "compare": compare, "report": str(index)}
    index = publish_report(store, out)
    return {"store": store, "report": str(index)}
