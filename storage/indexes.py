"""FAISS index files beside a store: `<store>/faiss/<layer>.index` (written atomically).

The bytes come from `engine.faiss_index.serialize` (FAISS's own format, no pickle); which
dataset image each index row is lives in the store (`/embed/<layer>/ids`).
"""

from __future__ import annotations

from pathlib import Path

from storage.store import Store, atomic_write_bytes


def index_path(store: Store, space: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in space)
    return store.path / "faiss" / f"{safe}.index"


def write_index(store: Store, space: str, data: bytes) -> Path:
    path = index_path(store, space)
    atomic_write_bytes(path, data)
    return path


def read_index(store: Store, space: str) -> bytes:
    path = index_path(store, space)
    if not path.is_file():
        raise FileNotFoundError(f"no FAISS index for {space!r} in {store.path} (run `neurocat embed` first)")
    return path.read_bytes()
