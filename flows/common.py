"""What every job flow shares: run options, the dataset scan, sharding and fan-out.

A flow reads like the plan of its job; the mechanics live here once: open (and lock) the
store, scan the dataset into the manifest, cut it into shards, submit only the shards
whose done-marker is missing or stale, show progress, and collect the small results.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import pandas as pd
from prefect import task
from prefect.futures import as_completed
from pydantic import BaseModel, Field

from engine.files import dataset_file
from engine.models import cached_model
from reports.folder import check_report_folder
from storage.manifest import build_manifest, mark_failed
from storage.store import Store, fingerprint


class RunOptions(BaseModel):
    """The options every job takes (DESIGN.md, "Command line")."""

    data: str | None = None
    model: str = "efficientnet_lite0"
    weights: str | None = None
    store: str | None = None
    report: str | None = None
    runner: str = "threads"
    workers: int | None = Field(None, ge=1)
    batch_size: int = Field(32, ge=1)
    limit: int | None = Field(None, ge=1)
    device: str = "cpu"
    shard_size: int = Field(256, ge=1)
    progress: bool = False

    def model_key(self) -> tuple[str, str | None, str]:
        return (self.model, self.weights, self.device)


def new_run_id(job: str) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{job}-{stamp}-{os.urandom(2).hex()}"


def default_report(store: str) -> str:
    return str(Path(store).with_suffix("")) + "-report"


def resolve_paths(opts: RunOptions, job: str) -> RunOptions:
    """Fill in the default store (`runs/<run-id>.zarr`) and report dir (`<store>-report`);
    refuse a report folder no report can own before the job runs, not after."""
    store = opts.store or str(Path("runs") / f"{new_run_id(job)}.zarr")
    report = opts.report or default_report(store)
    check_report_folder(report, store)
    return opts.model_copy(update={"store": store, "report": report})


def report_outputs(report: str, **files: str) -> dict[str, str]:
    """{name: path} of those `files` (paths in the report folder) that its report wrote: a
    result must not name a file that is not there (a skipped section writes none)."""
    return {name: str(Path(report) / rel) for name, rel in files.items() if (Path(report) / rel).is_file()}


@dataclass(frozen=True)
class Shard:
    id: int
    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start


def plan_shards(n: int, shard_size: int) -> list[Shard]:
    return [Shard(i, s, min(s + shard_size, n)) for i, s in enumerate(range(0, n, shard_size))]


@task(name="scan-dataset", retries=1)
def scan_dataset(store_path: str, data: str, limit: int | None, report: str | None = None) -> dict:
    """List and hash the dataset into the store's manifest (hashes of unchanged files reused).
    The store and the report are no part of it, should they lie inside the data folder
    (`neurocat predict --data .` puts `runs/` there)."""
    store = Store(store_path)
    if not Path(data).is_dir():
        raise FileNotFoundError(f"data folder not found: {data}")
    previous = store.read_manifest()
    df = build_manifest(data, previous if len(previous) else None, limit,
                        exclude=(store_path, report or default_report(store_path)))
    if len(previous) and list(previous["path"]) == list(df["path"]):
        # keep decode failures found by earlier shards of this same file list
        same = previous["sha256"].values == df["sha256"].values
        keep = same & (previous["status"].values == "skipped")
        df.loc[keep, ["status", "reason"]] = previous.loc[keep, ["status", "reason"]].values
    if len(previous) and len(previous) != len(df):
        # every row-indexed array is made anew at the new length (Store.create_array): no
        # shard of any job is done any more, though a shard's own files may be the same
        store.clear_jobs()
    store.write_manifest(df)
    return {"files": len(df), "ok": int((df["status"] == "ok").sum()),
            "skipped": int((df["status"] != "ok").sum())}


def shard_items(manifest: pd.DataFrame, data: str, shard: Shard) -> list[tuple[int, str]]:
    """(image index, absolute path) of the shard's usable rows."""
    rows = manifest.iloc[shard.start:shard.stop]
    ok = rows[rows["status"] == "ok"]
    return [(int(i), dataset_file(data, p)) for i, p in zip(ok.index, ok["path"])]


def shard_fingerprint(job: str, manifest: pd.DataFrame, shard: Shard, *params: Any) -> str:
    """Inputs of a shard: its files' paths and content hashes (a status is derived from the
    content, and decode failures found by a first run must not make the next run redo it)."""
    rows = manifest.iloc[shard.start:shard.stop]
    return fingerprint(job, list(zip(rows["path"], rows["sha256"])), *params)


def progress_bar(total: int, desc: str, enabled: bool):
    if not enabled or total == 0:
        return contextlib.nullcontext(None)
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="shard", file=sys.stderr, leave=False)


# how many shard tasks each map_shards call of the running `stage` submitted (0: all were done)
_STAGE_SUBMISSIONS: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar("stage_submissions",
                                                                                      default=None)


def map_shards(
    shard_task,
    store: Store,
    job: str,
    shards: list[Shard],
    fingerprints: list[str],
    kwargs_for: Callable[[Shard], dict],
    progress: bool = False,
) -> list[dict]:
    """Run `shard_task` for every shard not yet done with these inputs; results in shard order.

    Completion lives in the store (a marker per shard, written last by the task), not in
    Prefect's state or cache, so a rerun after a crash or a killed worker submits only
    the missing shards and a finished shard's result is read back from its marker.
    """
    from flows.runners import model_task_annotations

    results: dict[int, dict] = {}
    futures = {}
    with model_task_annotations():
        for shard, fp in zip(shards, fingerprints):
            done = store.shard_done(job, shard.id, fp)
            if done is not None:
                results[shard.id] = done
            else:
                futures[shard.id] = shard_task.with_options(task_run_name=f"{job}-shard-{shard.id}").submit(
                    **kwargs_for(shard), fp=fp)
    submitted = _STAGE_SUBMISSIONS.get()
    if submitted is not None:
        submitted.append(len(futures))
    with progress_bar(len(shards), job, progress) as bar:
        if bar is not None:
            bar.update(len(results))
        by_future = {f: sid for sid, f in futures.items()}
        for fut in as_completed(list(futures.values())):
            results[by_future[fut]] = fut.result()
            if bar is not None:
                bar.update(1)
    return [results[s.id] for s in shards]


def record_failures(store: Store, results: list[dict]) -> pd.DataFrame:
    """Merge decode failures reported by shards into the manifest; return it."""
    failures = [tuple(f) for r in results for f in r.get("failed", [])]
    manifest = store.read_manifest()
    if failures:
        manifest = mark_failed(manifest, failures)
        store.write_manifest(manifest)
    return manifest


@contextlib.contextmanager
def stage(store: Store, job: str, name: str) -> Iterator[None]:
    """Time a stage of a job into the store's root attrs (the report shows timings per stage).

    A stage whose shards were all done already (a rerun, or a job reusing another's forward
    pass, as the demo's embed reuses predict's) keeps the time of the run that computed them."""
    submitted: list[int] = []  # shard tasks submitted by each map_shards call in the stage
    token = _STAGE_SUBMISSIONS.set(submitted)
    t0 = time.perf_counter()
    try:
        yield
    finally:
        _STAGE_SUBMISSIONS.reset(token)
        timings = store.attrs().get("timings", {})
        reused = bool(submitted) and not any(submitted)
        if not (reused and name in timings.get(job, {})):
            timings.setdefault(job, {})[name] = round(time.perf_counter() - t0, 3)
            store.update_attrs(timings=timings)


def record_job(store: Store, job: str, opts: RunOptions, **extra: Any) -> None:
    """Remember which jobs ran on this store and with what parameters."""
    from neurocat import __version__

    jobs = store.attrs().get("jobs", {})
    jobs[job] = {"params": opts.model_dump(exclude={"progress"}), "finished": datetime.now(timezone.utc).isoformat(),
                 "code_version": __version__, **extra}
    store.update_attrs(jobs=jobs)


def model_provenance(opts: RunOptions) -> dict:
    """Model attrs (name, weights hash, preprocessing, code version) of the process's model."""
    return cached_model(opts.model, opts.weights, opts.device).describe()
