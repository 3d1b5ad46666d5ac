"""The run store: one zarr v3 group per run, plus the files that make reruns safe.

Layout on disk (`runs/<run-id>.zarr/`):
  zarr.json, features/, catalog/, embed/, ...   zarr arrays (DESIGN.md, "The store")
  manifest.parquet                              path, sha256, label, status, reason
  _shards/<job>/<shard>.json                    shard-done markers (written last, atomically)
  _shards/<job>/<shard>.npz                     small per-shard state (no pickle)
  .lock                                         held (flock) by the run writing the store

A shard task owns its rows of every array alone (arrays are chunked by shard), so no two
writers ever touch one chunk; a shard is done when its marker exists with the fingerprint
of its inputs, so a killed run resumes where it stopped and a changed input reruns.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd
import zarr

zarr.config.set({"async.concurrency": 8})
# the manifest, markers and lock live inside the store folder on purpose (one folder per run)
warnings.filterwarnings("ignore", message=r"Object at .* is not recognized as a component of a Zarr hierarchy")

MANIFEST_COLUMNS = ["path", "sha256", "label", "split", "status", "reason"]


class StoreLockedError(RuntimeError):
    """Another run is writing this store."""


_held: dict[Path, int] = {}  # store path -> nesting depth of `Store.lock` in this process


def fingerprint(*parts: Any) -> str:
    """A stable hash of JSON-serialisable inputs (shard rows, model hash, params, code version)."""
    blob = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def _flock_or_refuse(fd: int, store: str | os.PathLike) -> None:
    """Take the store's lock file `fd` without waiting, or StoreLockedError naming its holder."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
            raise StoreLockedError(f"store {store} is in use by another run ({holder or 'unknown process'})") from None
        raise


def check_free(store: str | os.PathLike) -> None:
    """StoreLockedError if another run holds the store now: a command checks before its flow
    starts, so the refusal is one line (Store.lock inside the flow stays the real guard)."""
    path = Path(store) / ".lock"
    if _held.get(Path(store).resolve()) or not path.exists():
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        _flock_or_refuse(fd, store)
    finally:
        os.close(fd)  # closing drops the lock taken just now


def file_list_digest(manifest: pd.DataFrame) -> str:
    """What a job's row-indexed results were made on: rows mean these files in this order."""
    return fingerprint([str(p) for p in manifest["path"]])


def natural_key(name: str) -> list:
    """Sort key comparing runs of digits as numbers: layer3 < layer10, features.2 < features.10.

    A run compares by its length without leading zeros, then its digits: numeric order without
    int(), which refuses runs of over 4,300 digits (a hostile name must still sort)."""
    return [(0, len(part.lstrip("0")), part.lstrip("0"), part) if part.isdigit() else (1, 0, part, "")
            for part in re.split(r"(\d+)", name) if part]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file beside `path`, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    return value


class Store:
    """A run's zarr group and its side files. Cheap to open; safe to open in every task."""

    def __init__(self, path: str | os.PathLike, mode: str = "a"):
        self.path = Path(path)
        if mode == "r" and not (self.path / "zarr.json").exists():
            raise FileNotFoundError(f"no neurocat store at {self.path}")
        self.root = zarr.open_group(str(self.path), mode=mode, zarr_format=3)

    # ---- arrays -------------------------------------------------------------------
    def has(self, name: str) -> bool:
        try:
            self.root[name]
            return True
        except KeyError:
            return False

    def array(self, name: str) -> zarr.Array:
        arr = self.root[name]
        if not isinstance(arr, zarr.Array):
            raise KeyError(f"{name} is a group, not an array")
        return arr

    def read(self, name: str) -> np.ndarray:
        return self.array(name)[...]

    def create_array(
        self,
        name: str,
        shape: tuple[int, ...],
        dtype: Any,
        chunks: tuple[int, ...] | None = None,
        attrs: dict | None = None,
        fill_value: Any = 0,
    ) -> zarr.Array:
        """Create `name`, or reuse it when it already has this shape, dtype and chunking.

        Called by the flow before fanning out, never by two writers at once. An existing
        array of another shape is replaced (its job's markers must be cleared too).
        """
        shape = tuple(int(s) for s in shape)
        chunks = tuple(int(max(1, min(c, s if s else 1))) for c, s in zip(chunks or shape, shape))
        dtype = np.dtype(dtype)
        if self.has(name):
            arr = self.array(name)
            if arr.shape == shape and arr.dtype == dtype and tuple(arr.chunks) == chunks:
                if attrs:
                    arr.attrs.update(_jsonable(attrs))
                return arr
            del self.root[name]
        arr = self.root.create_array(name, shape=shape, dtype=dtype, chunks=chunks, fill_value=fill_value)
        if attrs:
            arr.attrs.update(_jsonable(attrs))
        return arr

    def write_array(self, name: str, data: np.ndarray, attrs: dict | None = None,
                    chunks: tuple[int, ...] | None = None) -> zarr.Array:
        """Create-or-replace a whole (small) array in one go: reductions, maps, renders."""
        data = np.asarray(data)
        arr = self.create_array(name, data.shape, data.dtype, chunks or data.shape, attrs)
        arr[...] = data
        return arr

    def write_rows(self, name: str, start: int, data: np.ndarray) -> None:
        """Write rows [start, start + len(data)) of `name`: a shard's own chunk region."""
        if len(data):
            self.array(name)[start:start + len(data)] = data

    def attrs(self, name: str = "") -> dict:
        node = self.root if not name else self.root[name]
        return dict(node.attrs)

    def update_attrs(self, name: str = "", **values: Any) -> None:
        node = self.root if not name else self.root[name]
        node.attrs.update(_jsonable(values))

    def delete(self, name: str) -> None:
        if self.has(name):
            del self.root[name]

    def groups(self, name: str = "") -> list[str]:
        """Child groups in natural order: `_blocks.5` before `_blocks.10`, so layers come in network order."""
        node = self.root if not name else self.root[name]
        return sorted((k for k, v in node.members() if isinstance(v, zarr.Group)), key=natural_key)

    def arrays(self, name: str = "") -> list[str]:
        node = self.root if not name else self.root[name]
        return sorted((k for k, v in node.members() if isinstance(v, zarr.Array)), key=natural_key)

    # ---- manifest -----------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.path / "manifest.parquet"

    def write_manifest(self, df: pd.DataFrame) -> None:
        buf = io.BytesIO()
        df.reset_index(drop=True).to_parquet(buf, index=False)
        atomic_write_bytes(self.manifest_path, buf.getvalue())

    def read_manifest(self) -> pd.DataFrame:
        if not self.manifest_path.exists():
            return pd.DataFrame({c: pd.Series(dtype=object) for c in MANIFEST_COLUMNS})
        return pd.read_parquet(self.manifest_path)

    # ---- shard markers ------------------------------------------------------------
    def _marker(self, job: str, shard: int | str, suffix: str = ".json") -> Path:
        return self.path / "_shards" / job / f"{shard}{suffix}"

    def shard_done(self, job: str, shard: int | str, fp: str) -> dict | None:
        """The shard's recorded result if it finished with these inputs, else None."""
        path = self._marker(job, shard)
        try:
            marker = json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return marker.get("result", {}) if marker.get("fingerprint") == fp else None

    def mark_shard_done(self, job: str, shard: int | str, fp: str, result: dict | None = None) -> None:
        """Written last by a shard task, after all its array writes."""
        data = json.dumps({"fingerprint": fp, "result": _jsonable(result or {})}).encode()
        atomic_write_bytes(self._marker(job, shard), data)

    def save_shard_arrays(self, job: str, shard: int | str, arrays: dict[str, np.ndarray]) -> None:
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        atomic_write_bytes(self._marker(job, shard, ".npz"), buf.getvalue())

    def load_shard_arrays(self, job: str, shard: int | str) -> dict[str, np.ndarray]:
        with np.load(self._marker(job, shard, ".npz"), allow_pickle=False) as f:
            return {k: f[k] for k in f.files}

    def clear_job(self, job: str) -> None:
        shutil.rmtree(self.path / "_shards" / job, ignore_errors=True)

    def clear_jobs(self) -> None:
        """Every job's shard markers and states: for when the rows they index mean other images."""
        shutil.rmtree(self.path / "_shards", ignore_errors=True)

    # ---- locking ------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the store for one run; a second run on the same store is refused at once.

        An flock dies with its process, so a SIGKILLed run never leaves a stale lock.
        Re-entrant within a process (the demo flow runs several jobs on one store).
        """
        key = self.path.resolve()
        if _held.get(key):
            _held[key] += 1
            try:
                yield
            finally:
                _held[key] -= 1
            return
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            _flock_or_refuse(fd, self.path)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {os.uname().nodename}".encode(), 0)
            _held[key] = 1
            try:
                yield
            finally:
                _held.pop(key, None)
        finally:
            os.close(fd)
