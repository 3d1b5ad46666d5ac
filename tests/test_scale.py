"""Scale-out: a Dask worker killed mid-catalogue costs one shard; runners agree; memory is flat."""

import os
import signal
import threading
import time

import numpy as np
import psutil
import pytest
import zarr

from flows.catalog import catalog_flow
from flows.common import RunOptions
from flows.runners import task_runner

CATALOG = dict(layers=("_blocks.5",), top_k=4, bottom_k=2, projections=0)


def catalog_arrays(store_path) -> dict[str, np.ndarray]:
    group = zarr.open_group(str(store_path), mode="r")["catalog"]
    return {name: arr[...] for name, arr in group.members(max_depth=None) if isinstance(arr, zarr.Array)}


def run_catalog(shared_images, store, runner, workers=None, limit=48):
    opts = RunOptions(data=str(shared_images), store=str(store), limit=limit, shard_size=8, batch_size=8,
                      runner=runner, workers=workers)
    return catalog_flow.with_options(task_runner=task_runner(runner, workers))(opts, **CATALOG)


def dask_worker_processes() -> list[psutil.Process]:
    return [p for p in psutil.Process().children(recursive=True)
            if "spawn_main" in " ".join(p.cmdline()) and "resource_tracker" not in " ".join(p.cmdline())]


def test_killed_worker_costs_only_its_shard(prefect_api, shared_images, tmp_path):
    reference = run_catalog(shared_images, tmp_path / "ref.zarr", "dask", workers=2)
    store = tmp_path / "killed.zarr"
    markers = store / "_shards" / "catalog"
    killed: list[int] = []
    before_kill: dict[str, int] = {}

    def kill_one_worker():
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            done = list(markers.glob("*.json")) if markers.is_dir() else []
            workers = dask_worker_processes()
            if len(done) >= 2 and len(workers) == 2:
                before_kill.update({p.name: p.stat().st_mtime_ns for p in done})
                os.kill(workers[0].pid, signal.SIGKILL)
                killed.append(workers[0].pid)
                return
            time.sleep(0.02)

    killer = threading.Thread(target=kill_one_worker, daemon=True)
    killer.start()
    result = run_catalog(shared_images, store, "dask", workers=2)
    killer.join(timeout=5)
    assert killed, "no worker was killed (the run finished first)"
    assert result["layers"] == reference["layers"]
    # shards finished before the kill were not computed again
    for name, mtime in before_kill.items():
        assert (markers / name).stat().st_mtime_ns == mtime, name
    a, b = catalog_arrays(reference["store"]), catalog_arrays(store)
    assert a.keys() == b.keys() and a
    for name in a:
        assert np.array_equal(a[name], b[name], equal_nan=a[name].dtype.kind == "f"), name


def test_threads_and_local_clusters_agree(prefect_api, shared_images, tmp_path):
    """Same top-K images and positions everywhere; values equal up to torch's thread count."""
    runs = {"threads": run_catalog(shared_images, tmp_path / "t.zarr", "threads", limit=24),
            "dask": run_catalog(shared_images, tmp_path / "d.zarr", "dask", workers=1, limit=24),
            "dask2": run_catalog(shared_images, tmp_path / "d2.zarr", "dask", workers=2, limit=24)}
    arrays = {k: catalog_arrays(r["store"]) for k, r in runs.items()}
    for name, ref in arrays["threads"].items():
        # one worker has every core, like the threads runner: bit-identical
        assert np.array_equal(ref, arrays["dask"][name], equal_nan=ref.dtype.kind == "f"), name
        other = arrays["dask2"][name]
        if name.endswith(("_index", "_yx", "_patch")):
            assert np.array_equal(ref, other), name  # same images, same positions, same crops
        elif name.endswith("hist"):  # a score on a bin edge may land in the next bin
            assert np.array_equal(ref.sum(axis=-1), other.sum(axis=-1)), name
            assert np.abs(ref.astype(int) - other.astype(int)).sum() <= 0.01 * ref.sum() + 2, name
        elif name.endswith("quantiles"):  # read off that histogram: within one log bin
            np.testing.assert_allclose(other, ref, rtol=10 ** (1 / 32) - 1, atol=1e-3, err_msg=name, equal_nan=True)
        elif ref.dtype == np.uint8:  # drawn from activations through a colour map: rounding only
            diff = np.abs(ref.astype(int) - other.astype(int))
            assert diff.max() <= 8 and diff.mean() < 0.05, name
        else:
            np.testing.assert_allclose(other, ref, rtol=1e-3, atol=1e-3, err_msg=name, equal_nan=True)


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="known: peak RSS 1.59 GB at 250 images vs 2.26 GB at 2,000 "
                   "(measured 2026-11-23); the growth is not yet located (issue 11)")
def test_catalog_memory_is_flat_in_n(prefect_api, shared_images, tmp_path):
    """Peak RSS of a catalogue run over 2,000 images is within 15% of one over 250."""
    big = tmp_path / "big"
    for copy in range(8):  # 8 x 250 = 2,000 distinct files (hard links: no extra disk)
        for src in shared_images.glob("*/*"):
            dst = big / src.parent.name / f"{copy}_{src.name}"
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.link(src, dst)

    def peak_rss(data, store) -> int:
        me = psutil.Process()
        peak, stop = [me.memory_info().rss], threading.Event()

        def sample():
            while not stop.is_set():
                peak.append(sum(p.memory_info().rss for p in [me] + me.children(recursive=True)
                                if "uvicorn" not in " ".join(p.cmdline())))
                time.sleep(0.05)

        t = threading.Thread(target=sample, daemon=True)
        t.start()
        # shards of 125: both runs have two shard tasks in flight, so only N differs
        opts = RunOptions(data=str(data), store=str(store), shard_size=125, batch_size=32)
        catalog_flow.with_options(task_runner=task_runner("threads"))(opts, **CATALOG)
        stop.set()
        t.join()
        return max(peak)

    small = peak_rss(shared_images, tmp_path / "small.zarr")
    large = peak_rss(big, tmp_path / "large.zarr")
    assert large < small * 1.15, (small / 2**20, large / 2**20)


def test_deployment_entrypoint_runs_a_job_on_the_named_runner(prefect_api, shared_images, tmp_path):
    from flows.job import job_flow

    opts = RunOptions(data=str(shared_images), store=str(tmp_path / "j.zarr"), limit=8, runner="dask", workers=1)
    result = job_flow("predict", opts)
    assert result["images"] == 8
    with pytest.raises(ValueError, match="unknown job"):
        job_flow("dance", opts)
