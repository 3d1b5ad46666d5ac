"""Task runners by name: `threads`, `dask` (a LocalCluster the flow starts and stops), or an address."""

from __future__ import annotations

import os

from engine.errors import InputError


def task_runner(spec: str = "threads", workers: int | None = None):
    """The Prefect task runner for `--runner`.

    `threads` overlaps decoding with the model in one process; `dask` starts a
    `distributed.LocalCluster` of worker processes (torch threads split between them);
    `tcp://host:port` submits to an existing scheduler.
    """
    if spec == "threads":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=workers or 2)
    from prefect_dask import DaskTaskRunner

    if spec == "dask":
        cpus = os.cpu_count() or 1
        n = workers or 1
        threads = max(1, cpus // n)
        return DaskTaskRunner(
            cluster_class="distributed.LocalCluster",
            cluster_kwargs={"n_workers": n, "threads_per_worker": 1, "processes": True,
                            "dashboard_address": None,
                            "env": {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}},
        )
    if spec.startswith(("tcp://", "tls://", "ws://", "wss://")):
        return DaskTaskRunner(address=spec)
    raise InputError(f"unknown runner {spec!r}: use threads, dask, or a scheduler address tcp://host:port")
