"""malloc settings (engine/memory.py): a shard task's thread reuses its activations' memory."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

import pytest

from conftest import ROOT

# In a fresh process: a task-runner thread runs the catalogue's pass-1 forward (batch 32, up to
# _blocks.10) eight times and counts the process's page faults for each batch.
PROBE = """
import json, resource, sys, threading
if sys.argv[1] == "flows":
    import flows.common  # what a job flow imports
import torch
from engine.inference import run_layers
from engine.models import cached_model

model = cached_model("efficientnet_lite0")
x = torch.randn(32, 3, 224, 224, generator=torch.Generator().manual_seed(0))
faults = []
def batches():
    for _ in range(8):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        run_layers(model, x, ["_blocks.10"])
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
thread = threading.Thread(target=batches)
thread.start()
thread.join()
print(json.dumps(faults))
"""


def page_faults(mode: str) -> list[int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_a_task_thread_reuses_activation_memory_once_flows_are_imported():
    """With glibc's defaults a thread's batch-sized activations (154 MB at 112x112) are mapped
    afresh every batch and fault in every page (measured 120-150 k faults per batch, 0.5-0.6 GB);
    with the settings `flows` puts in place on import, what one batch frees the next reuses
    (measured 0 after two batches; 38-114 k when the cap came after pandas' import had made a
    second arena). Compared after two warm-up batches."""
    plain, tuned = page_faults("plain"), page_faults("flows")
    assert statistics.median(tuned[2:]) < 0.5 * statistics.median(plain[2:]), (plain, tuned)


def test_a_shard_on_a_gpu_hands_cached_blocks_back(tmp_path, monkeypatch):
    """DESIGN's dask-cuda pitfall: CUDA memory is freed between shards. No GPU here, so the
    CUDA runtime's two calls stand in; the shard wrapper itself is the real one."""
    import torch

    from storage.store import Store
    from tasks.sharding import skip_if_done

    emptied = []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(1))

    @skip_if_done
    def shard_task(store_path, job, fp, shard):
        return {"shard": shard}

    Store(str(tmp_path / "s.zarr"))
    assert shard_task(store_path=str(tmp_path / "s.zarr"), job="j", fp="f", shard=0) == {"shard": 0}
    assert emptied == [1]
