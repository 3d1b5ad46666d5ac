"""Deployment entrypoint that honours `opts.runner`: a job's flow as a subflow on that runner.

A flow's task runner is fixed by its decorator, so a deployment of `catalog_flow` would
ignore `runner: dask-cuda` in its parameters; this flow picks the runner first (as the CLI
does) and then runs the job. Used by the GPU deployments in prefect.yaml.
"""

from __future__ import annotations

import importlib

from prefect import flow

from flows.common import RunOptions
from flows.runners import task_runner

JOBS = {
    "predict": "flows.predict:predict_flow",
    "catalog": "flows.catalog:catalog_flow",
    "embed": "flows.embed:embed_flow",
    "audit": "flows.audit:audit_flow",
    "explain": "flows.explain:explain_flow",
    "demo": "flows.demo:demo_flow",
}


@flow(name="neurocat-job")
def job_flow(job: str, opts: RunOptions, params: dict | None = None) -> dict:
    if job not in JOBS:
        raise ValueError(f"unknown job {job!r}; known: {', '.join(JOBS)}")
    module, name = JOBS[job].split(":")
    job_fn = getattr(importlib.import_module(module), name)
    return job_fn.with_options(task_runner=task_runner(opts.runner, opts.workers))(opts, **(params or {}))
