"""Task runners by name, from a laptop to a multi-GPU Dask cluster.

`--runner` takes:
  threads          one process; decoding overlaps the model (tests, small runs)
  dask             a `distributed.LocalCluster` the flow starts and stops (CPU workers)
  dask-cuda        `dask_cuda.LocalCUDACluster`: one worker per GPU, each with resource GPU=1
  tcp://host:port  an existing scheduler
  profile.yaml     a cluster profile file (same as `--cluster profile.yaml`), e.g.
                     address: tcp://10.0.0.5:8786          # or:
                     cluster_class: dask_cuda.LocalCUDACluster
                     cluster_kwargs: {CUDA_VISIBLE_DEVICES: "0,1"}
                     adapt_kwargs: {minimum: 1, maximum: 4}
                     resources: {GPU: 1}                    # annotate model tasks

Workers pre-import torch and set their thread count (`engine.worker` preload), and load
each model once per process (`engine.models.cached_model`). Shard tasks that run a model
are annotated with the profile's `resources`, so a GPU worker runs one at a time.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

import yaml

from engine.errors import InputError

_active_resources: dict | None = None  # resources of the runner the current flow uses
THREAD_WORKERS = 2  # tasks at a time on the threads runner: one decodes while another runs the model


def _dask_runner(**kwargs):
    import dask
    from prefect_dask import DaskTaskRunner

    from engine.memory import MALLOC_ENV

    # worker processes a LocalCluster spawns start with the malloc arena cap (engine/memory.py)
    dask.config.set({f"distributed.nanny.pre-spawn-environ.{k}": v for k, v in MALLOC_ENV.items()})
    return DaskTaskRunner(**kwargs)


def local_cluster_kwargs(workers: int | None = None, torch_threads: int | None = None) -> dict:
    """A CPU LocalCluster of `workers` processes, one Dask thread each, torch threads split."""
    cpus = os.cpu_count() or 1
    n = workers or 1
    threads = str(torch_threads or max(1, cpus // n))
    return {"n_workers": n, "threads_per_worker": 1, "processes": True, "dashboard_address": None,
            "preload": ["engine.worker"],
            "env": {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "NEUROCAT_TORCH_THREADS": threads}}


def load_profile(path: str | os.PathLike) -> dict:
    p = Path(path)
    if not p.is_file():
        raise InputError(f"cluster profile not found: {p}")
    try:
        profile = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise InputError(f"cluster profile {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(profile, dict) or not ({"address", "cluster_class"} & set(profile)):
        raise InputError(f"cluster profile {p} needs `address:` or `cluster_class:`")
    unknown = set(profile) - {"address", "cluster_class", "cluster_kwargs", "adapt_kwargs", "resources"}
    if unknown:
        raise InputError(f"cluster profile {p}: unknown keys {sorted(unknown)}")
    return profile


def _answering(address: str, timeout: float = 3.0) -> str:
    """`address` if something accepts connections there; else a one-line error now, not
    distributed's 30 s connect timeout and a traceback after the flow started."""
    import socket
    import urllib.parse

    parts = urllib.parse.urlsplit(address)
    try:
        with socket.create_connection((parts.hostname, parts.port or 8786), timeout=timeout):
            return address
    except (OSError, ValueError) as e:
        raise InputError(f"no Dask scheduler answers at {address}: {e}") from None


def task_runner(spec: str = "threads", workers: int | None = None):
    """The Prefect task runner for `--runner` (see the module docstring)."""
    global _active_resources
    _active_resources = None
    if spec == "threads":
        return threads_runner(workers)
    if spec == "dask":
        return _dask_runner(cluster_class="distributed.LocalCluster", cluster_kwargs=local_cluster_kwargs(workers))
    if spec == "dask-cuda":
        try:
            import dask_cuda  # noqa: F401
        except ImportError:
            raise InputError("--runner dask-cuda needs the gpu extra: pip install 'neurocat[gpu]'") from None
        _active_resources = {"GPU": 1}
        return _dask_runner(cluster_class="dask_cuda.LocalCUDACluster",
                            cluster_kwargs={"threads_per_worker": 1, "resources": {"GPU": 1},
                                            "preload": ["engine.worker"], "dashboard_address": None})
    if spec.startswith(("tcp://", "tls://", "ws://", "wss://")):
        return _dask_runner(address=_answering(spec))
    if spec.endswith((".yaml", ".yml")):
        profile = load_profile(spec)
        _active_resources = profile.get("resources")
        if "address" in profile:
            return _dask_runner(address=_answering(profile["address"]))
        return _dask_runner(cluster_class=profile["cluster_class"], cluster_kwargs=profile.get("cluster_kwargs", {}),
                            adapt_kwargs=profile.get("adapt_kwargs"))
    raise InputError(f"unknown runner {spec!r}: use threads, dask, dask-cuda, tcp://host:port or a profile .yaml")


def threads_runner(workers: int | None = None):
    """`--runner threads`, and the job flows' own runner: a flow called from Python (a test,
    a notebook, a deployment of the flow itself) would otherwise get Prefect's default
    thread pool, which has no bound and starts every shard task at once (10,000 files: 40
    shards decoding together, each task waiting for the model's lock)."""
    from prefect.task_runners import ThreadPoolTaskRunner

    return ThreadPoolTaskRunner(max_workers=workers or THREAD_WORKERS)


@contextlib.contextmanager
def model_task_annotations() -> Iterator[None]:
    """Annotate tasks submitted inside with the active runner's resources (e.g. GPU=1)."""
    if not _active_resources:
        yield
        return
    import dask

    with dask.annotate(resources=_active_resources):
        yield
