"""The dataset manifest: one row per file found, with its hash and whether it is usable."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
from PIL import Image

from engine.files import dataset_file, file_version
from engine.images import Entry, list_images, sha256_file, size_refusal
from storage.store import MANIFEST_COLUMNS


VERSION_COLUMNS = ["size", "mtime_ns", "ctime_ns", "inode"]  # engine.files.file_version, beside the hash


def _probe(root: Path, entry: Entry, known: dict[tuple, str]) -> dict:
    """Hash the file and read its header (not its pixels): cheap checks before any shard runs."""
    full = Path(dataset_file(root, entry.path))
    row = {"path": entry.path, "label": entry.label, "split": entry.split,
           "sha256": None, "status": "ok", "reason": None}
    if entry.reason:  # a folder that could not be listed
        row.update(status="skipped", reason=entry.reason)
        return row
    try:
        st = full.stat()
        version = dict(zip(VERSION_COLUMNS, file_version(st)))
        row["sha256"] = known.get((entry.path, *version.values())) or sha256_file(full)
        row.update(version)
        if st.st_size == 0:
            row.update(status="skipped", reason="empty file")
            return row
        with Image.open(full) as img:
            refusal = size_refusal(*img.size)
        if refusal:
            row.update(status="skipped", reason=refusal)
    except Image.DecompressionBombError as e:
        row.update(status="skipped", reason=f"decompression bomb guard: {e}")
    except Image.UnidentifiedImageError:
        row.update(status="skipped", reason="not an image (unrecognised format)")
    except OSError as e:
        row.update(status="skipped", reason=f"unreadable: {e.strerror or e}")
    except (ValueError, SyntaxError) as e:  # Pillow's word for a corrupt header (PNG IHDR, PPM, TIFF sizes)
        row.update(status="skipped", reason=f"cannot decode: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    return row


def build_manifest(root: str | os.PathLike, previous: pd.DataFrame | None = None, limit: int | None = None,
                   threads: int = 4, exclude: tuple = ()) -> pd.DataFrame:
    """List, hash and header-check every file under `root` but the `exclude` folders; reuse
    hashes of unchanged files."""
    root = Path(root)
    entries = list_images(root, exclude, limit)
    known = {}
    if previous is not None and len(previous) and set(VERSION_COLUMNS) <= set(previous):
        known = {(p, *version): h for p, h, *version in
                 zip(previous["path"], previous["sha256"], *(previous[c] for c in VERSION_COLUMNS)) if h}
    with ThreadPoolExecutor(max_workers=threads) as pool:
        rows = list(pool.map(lambda e: _probe(root, e, known), entries))
    df = pd.DataFrame(rows, columns=MANIFEST_COLUMNS + VERSION_COLUMNS)
    for c in VERSION_COLUMNS:
        df[c] = df[c].astype("Int64")
    return df


def mark_failed(df: pd.DataFrame, failures: list[tuple[int, str]]) -> pd.DataFrame:
    """Record decode failures found by the shards (index, reason)."""
    df = df.copy()
    for index, reason in failures:
        df.loc[int(index), ["status", "reason"]] = ["skipped", reason]
    return df
