"""Scale-out on this machine: catalogue throughput with 1 vs 2 Dask workers, and per-task overhead.

In one run: (1) `catalog` of one layer (K=16) on a LocalCluster of 1 worker and of 2
workers, 1 Dask thread and 1 torch thread each: images/s of the statistics pass (the
per-shard forward pass, the part that fans out) and end to end, and the speed-ups; (2) the
cost of one Prefect task on the Dask runner (no-op tasks) against a raw `client.submit`.
The default, all 250 shared images in 16 shards, makes the statistics pass most of the run;
at 64 images fixed costs (cluster and model start, the one patch task, the report) hid it.
Usage: python bench/scale.py [--data DIR] [--limit N]
"""

from __future__ import annotations

import argparse
import tempfile
import time

from common import SHARED_DATA  # also puts the repository on sys.path

from neurocat.prefect_env import prefect_defaults  # noqa: E402

prefect_defaults("ERROR")

from prefect import flow, task  # noqa: E402


@task
def noop(i: int) -> int:
    return i


@flow
def many_noops(n: int) -> float:
    t0 = time.perf_counter()
    futures = [noop.submit(i) for i in range(n)]
    [f.result() for f in futures]
    return (time.perf_counter() - t0) / n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(SHARED_DATA))
    ap.add_argument("--limit", type=int, default=250)
    ap.add_argument("--tasks", type=int, default=60)
    args = ap.parse_args()

    from distributed import Client, LocalCluster
    from prefect.testing.utilities import prefect_test_harness
    from prefect_dask import DaskTaskRunner

    from flows.catalog import catalog_flow
    from flows.common import RunOptions
    from flows.runners import local_cluster_kwargs
    from storage.store import Store

    results, statistics = {}, {}
    with prefect_test_harness(server_startup_timeout=180), tempfile.TemporaryDirectory() as tmp:
        for workers in (1, 2):
            runner = DaskTaskRunner(cluster_class="distributed.LocalCluster",
                                    cluster_kwargs=local_cluster_kwargs(workers, torch_threads=1))
            opts = RunOptions(data=args.data, store=f"{tmp}/w{workers}.zarr", limit=args.limit, shard_size=16,
                              batch_size=16, runner="dask", workers=workers)
            t0 = time.perf_counter()
            catalog_flow.with_options(task_runner=runner)(opts, layers=("_blocks.10",), top_k=16, bottom_k=0,
                                                          projections=0)
            results[workers] = args.limit / (time.perf_counter() - t0)
            statistics[workers] = args.limit / Store(opts.store).attrs()["timings"]["catalog"]["statistics"]
        runner = DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs=local_cluster_kwargs(1))
        prefect_per_task = many_noops.with_options(task_runner=runner)(args.tasks)
    with LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=None) as cluster, Client(cluster) as c:
        c.submit(int, 0).result()
        t0 = time.perf_counter()
        c.gather([c.submit(int, i, pure=False) for i in range(args.tasks)])
        dask_per_task = (time.perf_counter() - t0) / args.tasks

    print(f"images={args.limit} layer=_blocks.10 K=16 shard=16, 1 Dask thread + 1 torch thread per worker")
    print(f"statistics pass, 1 worker   {statistics[1]:6.2f} images/s")
    print(f"statistics pass, 2 workers  {statistics[2]:6.2f} images/s   speed-up {statistics[2] / statistics[1]:5.2f}x")
    print(f"end to end, 1 worker        {results[1]:6.2f} images/s (cluster start, patch pass and report included)")
    print(f"end to end, 2 workers       {results[2]:6.2f} images/s   speed-up {results[2] / results[1]:5.2f}x")
    print(f"per-task overhead: Prefect task on Dask {prefect_per_task * 1e3:7.1f} ms, raw dask submit "
          f"{dask_per_task * 1e3:6.2f} ms, ratio {prefect_per_task / dask_per_task:6.1f}x")


if __name__ == "__main__":
    main()
