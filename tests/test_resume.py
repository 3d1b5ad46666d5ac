"""Completion lives in the store: a SIGKILLed run resumes and ends bit-identical; runners agree."""

import os
import signal
import subprocess
import sys
import time

import numpy as np

from conftest import cli_env, neurocat_cmd
from flows.common import RunOptions
from flows.predict import predict_flow
from storage.store import Store, StoreLockedError

ARGS = ["--limit", "96", "--shard-size", "8", "--batch-size", "8"]


def test_killed_run_resumes_identically(prefect_api, shared_images, tmp_path):
    reference = predict_flow(RunOptions(data=str(shared_images), store=str(tmp_path / "ref.zarr"),
                                        limit=96, shard_size=8, batch_size=8))
    store = tmp_path / "killed.zarr"
    cmd = neurocat_cmd() + ["predict", "--data", str(shared_images), "--store", str(store)] + ARGS
    proc = subprocess.Popen(cmd, env=cli_env(prefect_api), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    markers = store / "_shards" / "features"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if markers.is_dir() and len(list(markers.glob("*.json"))) >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "run finished before it could be killed: " + proc.stderr.read().decode()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(list(markers.glob("*.json")))
    assert 3 <= done_before < 12
    out = subprocess.run(cmd, env=cli_env(prefect_api), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    a = Store(reference["store"]).read("predict/logits")
    b = Store(store).read("predict/logits")
    assert a.shape == b.shape == (96, 1000)
    assert np.array_equal(a, b)


def test_rerun_skips_finished_shards(prefect_api, shared_images, tmp_path):
    opts = RunOptions(data=str(shared_images), store=str(tmp_path / "r.zarr"), limit=16, shard_size=8)
    predict_flow(opts)
    marker = tmp_path / "r.zarr" / "_shards" / "features" / "0.json"
    stamp = marker.stat().st_mtime_ns
    forward = Store(opts.store).attrs()["timings"]["features"]["forward"]
    assert forward > 0.05  # two shards of 8 images through the model
    predict_flow(opts)
    assert marker.stat().st_mtime_ns == stamp
    # the report keeps the time of the run that did the work, not the rerun's ~0 s
    assert Store(opts.store).attrs()["timings"]["features"]["forward"] == forward


def test_a_dataset_of_another_size_on_the_same_store_is_computed_whole(prefect_api, shared_images, tmp_path):
    """Its arrays are made anew at the new length, so no shard is done any more (the first
    shards' files are the same, and their rows used to stay zero): equal to a fresh store."""
    grown = RunOptions(data=str(shared_images), store=str(tmp_path / "g.zarr"), limit=6, shard_size=2, batch_size=2)
    predict_flow(grown.model_copy(update={"limit": 4}))
    predict_flow(grown)
    fresh = grown.model_copy(update={"store": str(tmp_path / "f.zarr")})
    predict_flow(fresh)
    logits = Store(grown.store).read("predict/logits")
    assert np.abs(logits).max(1).min() > 1 and np.array_equal(logits, Store(fresh.store).read("predict/logits"))


def test_second_writer_is_refused(tmp_path):
    store = Store(tmp_path / "l.zarr")
    with store.lock():
        other = subprocess.run(
            [sys.executable, "-c", "import sys; from storage.store import Store\n"
             "try:\n  Store(sys.argv[1]).lock().__enter__()\nexcept Exception as e: print(type(e).__name__)",
             str(tmp_path / "l.zarr")], capture_output=True, text=True, timeout=60)
        assert "StoreLockedError" in other.stdout
    with store.lock():  # released on exit, reusable
        pass
    assert StoreLockedError


def test_a_command_on_a_store_in_use_is_refused_in_one_line(prefect_api, shared_images, tmp_path):
    """Refused before its flow starts: inside the flow Prefect logged the lock's traceback first."""
    store = Store(tmp_path / "busy.zarr")
    with store.lock():
        out = subprocess.run(neurocat_cmd() + ["predict", "--data", str(shared_images), "--limit", "2",
                                               "--store", str(tmp_path / "busy.zarr")],
                             capture_output=True, text=True, env=cli_env(prefect_api), timeout=300)
    assert out.returncode == 2 and "in use by another run" in out.stderr, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and out.stderr.strip().count("\n") == 0, out.stderr[-2000:]
    with store.lock():  # the check took and dropped nothing for good
        pass


def test_threads_and_dask_runners_agree(prefect_api, shared_images, tmp_path):
    from flows.runners import task_runner

    results = {}
    for runner in ("threads", "dask"):
        opts = RunOptions(data=str(shared_images), store=str(tmp_path / f"{runner}.zarr"), limit=24,
                          shard_size=8, batch_size=8, runner=runner)
        predict_flow.with_options(task_runner=task_runner(runner))(opts)
        results[runner] = Store(opts.store).read("predict/logits")
    assert np.array_equal(results["threads"], results["dask"])


def test_job_flows_called_from_python_run_as_many_tasks_at_once_as_the_cli():
    """Prefect's default thread pool has no bound: a job flow called directly (tests, notebooks,
    deployments of the flow itself) would start every shard task at once."""
    import importlib

    from prefect.task_runners import ThreadPoolTaskRunner

    from flows.job import JOBS
    from flows.runners import THREAD_WORKERS, task_runner

    assert task_runner("threads")._max_workers == THREAD_WORKERS
    others = ["flows.render:render_flow", "flows.adversarial:adversarial_flow", "flows.report:report_flow"]
    for entry in [*JOBS.values(), *others]:
        module, name = entry.split(":")
        runner = getattr(importlib.import_module(module), name).task_runner
        assert isinstance(runner, ThreadPoolTaskRunner) and runner._max_workers == THREAD_WORKERS, entry


def test_every_task_that_marks_its_shard_done_reads_its_marker_first(tmp_path):
    """Dask may run a finished task again (its worker died holding the result) and a retry may
    follow a write that landed: every task that writes a done-marker returns the recorded
    result instead of working again. Found by reading the tasks' source, so a new one is
    checked too; run with a model that does not exist, any work would fail."""
    import importlib
    import inspect
    import pkgutil

    import tasks

    store_path = str(tmp_path / "s.zarr")
    store = Store(store_path)
    checked = []
    for info in pkgutil.iter_modules(tasks.__path__):
        module = importlib.import_module(f"tasks.{info.name}")
        for name, obj in vars(module).items():
            fn = getattr(obj, "fn", None)
            if fn is None or obj.__module__ != module.__name__ or "mark_shard_done" not in inspect.getsource(fn):
                continue
            params = inspect.signature(fn).parameters
            kwargs = {p: None for p in params} | {"store_path": store_path, "job": name, "fp": "inputs"}
            kwargs |= {"model": "no-such-model"} if "model" in params else {}
            id_param = next((p for p in ("shard", "block") if p in params), None)
            if id_param:
                kwargs[id_param] = shard = 3
            else:  # a job's only task
                shard = "universal" if name == "fit_universal" else 0
            store.mark_shard_done(name, shard, "inputs", {"recorded": name})
            assert fn(**kwargs) == {"recorded": name}, name
            checked.append(name)
    assert {"features_shard", "catalog_shard", "catalog_patches", "catalog_featvis", "explain_shard",
            "context_shard", "attack_shard", "fit_universal", "embed_space"} <= set(checked), checked
