"""Shard tasks whose completion lives in the store."""

from __future__ import annotations

import functools
import inspect

from engine.memory import release_cuda_cache, release_free_memory, tune_malloc
from storage.store import Store


def skip_if_done(fn=None, *, id_param: str = "shard", shard_id: int | str | None = None):
    """Return the shard's recorded result instead of recomputing it when its marker matches.

    `map_shards` only submits unfinished shards, but Dask may run a finished task again
    (a worker that held its result died, and the scheduler recomputes what it lost) and a
    Prefect retry may follow a write that did land; with this, such a rerun costs one
    marker read. The task takes `store_path`, `job`, `fp` and the shard id `id_param`
    (or, for a task that is its job's one shard, that id is `shard_id`).

    A shard's buffers are all freed when it ends and the next shard reuses them (malloc
    tuned: engine/memory.py), so its resident size does not creep up with every shard it
    runs; more than 1 GiB held free is handed back to the OS.
    """
    if fn is None:
        return functools.partial(skip_if_done, id_param=id_param, shard_id=shard_id)
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        bound = signature.bind(*args, **kwargs).arguments
        shard = bound[id_param] if shard_id is None else shard_id
        done = Store(bound["store_path"]).shard_done(bound["job"], shard, bound["fp"])
        if done is not None:
            return done
        tune_malloc()
        try:
            return fn(*args, **kwargs)
        finally:
            release_free_memory()
            release_cuda_cache()

    return wrapper
