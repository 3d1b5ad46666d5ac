"""Dask worker preload (`preload: ["engine.worker"]`): import torch once, set its threads.

Importing torch at worker start moves its multi-second import out of the first task, and
the thread count splits the machine's cores between the workers of a LocalCluster.
"""

from __future__ import annotations

import os


def dask_setup(worker=None) -> None:
    import torch

    from engine.memory import tune_malloc

    tune_malloc()  # before the worker's task threads exist (engine/memory.py)

    threads = os.environ.get("NEUROCAT_TORCH_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
