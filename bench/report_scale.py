"""How big and how slow is the report of a large run? Builds the report of a synthetic store of
N images (real thumbnails of the shared images, varied per copy; random logits) and prints its
size, file and page counts, build time, and the same extrapolated to 100,000 images.

Baseline measured in the same run: writing the thumbnails alone (the part no report can skip);
the ratio says how much the pages, CSV and plots add on top.

    python bench/report_scale.py [N]     (default 5000; the machine is shared, 100k takes long)
"""

from __future__ import annotations

import hashlib
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from common import SHARED_DATA  # also puts the repository on sys.path

from reports.site import Site, build_report  # noqa: E402
from storage.store import Store  # noqa: E402



def synthetic_store(path: Path, n: int, rng: np.random.Generator) -> Store:
    files = sorted(SHARED_DATA.rglob("*.JPEG"))
    base = np.stack([np.asarray(Image.open(f).convert("RGB").resize((64, 64))) for f in files])
    store = Store(path)
    labels = [f.parent.name for f in files]
    rows = [{"path": f"{labels[i % len(files)]}/img_{i:06d}.jpg", "sha256": hashlib.sha256(str(i).encode()).hexdigest(),
             "label": labels[i % len(files)], "split": None, "status": "ok", "reason": None} for i in range(n)]
    for i in range(0, n, 97):  # about 1% unusable files
        rows[i].update(status="skipped", reason="truncated or corrupt image: synthetic")
    store.write_manifest(pd.DataFrame(rows))
    chunk = 1024
    logits = store.create_array("predict/logits", (n, 1000), "float32", chunks=(chunk, 1000))
    thumbs = store.create_array("thumbs", (n, 64, 64, 3), "uint8", chunks=(chunk, 64, 64, 3))
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        logits[s:s + m] = rng.normal(size=(m, 1000)).astype(np.float32) * 3
        noise = rng.integers(-12, 12, size=(m, 64, 64, 3))
        thumbs[s:s + m] = np.clip(base[np.arange(s, s + m) % len(base)] + noise, 0, 255).astype(np.uint8)
    store.update_attrs(jobs={"predict": {"params": {"data": "/nonexistent", "model": "efficientnet_lite0"},
                                         "finished": "-", "images": n}})
    return store


def folder_stats(folder: Path) -> tuple[int, int, int]:
    files = [p for p in folder.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files), len(files), sum(p.suffix == ".html" for p in files)


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 5000
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        store = synthetic_store(tmp / "s.zarr", n, rng)
        t0, c0 = time.perf_counter(), time.process_time()
        Site(store, tmp / "thumbs-only").dataset_thumbnails(range(n), 96)
        baseline, baseline_cpu = time.perf_counter() - t0, time.process_time() - c0
        t0, c0 = time.perf_counter(), time.process_time()
        build_report(tmp / "s.zarr", tmp / "report")
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
        size, files, pages = folder_stats(tmp / "report")
        biggest = max((p.stat().st_size for p in (tmp / "report").rglob("*.html")), default=0)
    scale = 100_000 / n
    print(f"images {n}: report {size / 1e6:.1f} MB in {files} files ({pages} pages, largest page "
          f"{biggest / 1e3:.0f} kB), built in {elapsed:.1f} s wall, {cpu:.1f} s CPU")
    print(f"baseline (thumbnails only): {baseline:.1f} s wall, {baseline_cpu:.1f} s CPU; "
          f"report / baseline = {elapsed / baseline:.2f} (wall), {cpu / baseline_cpu:.2f} (CPU)")
    print(f"extrapolated to 100,000 images: {size * scale / 1e6:.0f} MB, {files * scale:.0f} files, "
          f"{cpu * scale / 60:.1f} min CPU")


if __name__ == "__main__":
    main()
