"""Decode + resize + crop of large JPEGs: Pillow's draft (the default) against the full decode, in one run.

Photos from phones and cameras (12 megapixels and more) cost 30-60x an ImageNet image to decode
in full, then again to resize. `Preprocessing.jpeg_draft` decodes such a JPEG at the smallest
DCT scale that keeps both sides at least twice the resize (engine.images.load_preprocessed);
the baseline is the same call with `jpeg_draft=False` (torchvision's Resize + CenterCrop on the
full image, bit for bit). The inputs are shared images upscaled to each size and saved as
JPEG (quality 92); also printed: how far the drafted crops are from the full ones, in levels.
Usage: python bench/decode.py [--data DIR] [--images 24] [--sizes 4032x3024,1600x1200,500x375] [--repeats 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from common import SHARED_DATA  # also puts the repository on sys.path

from engine.images import ImageError, list_images, load_preprocessed, open_image  # noqa: E402
from engine.models import Preprocessing  # noqa: E402


def images_per_second(paths: list[Path], prep: Preprocessing, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for p in paths:
            load_preprocessed(p, prep)
        best = min(best, time.perf_counter() - t0)
    return len(paths) / best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(SHARED_DATA))
    ap.add_argument("--images", type=int, default=24)
    ap.add_argument("--sizes", default="4032x3024,1600x1200,500x375")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    sources = []
    for e in list_images(args.data):
        try:
            sources.append(open_image(Path(args.data) / e.path))
        except ImageError:
            continue
        if len(sources) == args.images:
            break
    draft, full = Preprocessing(jpeg_draft=True), Preprocessing(jpeg_draft=False)
    print(f"{len(sources)} shared images per size, one thread, best of {args.repeats}")
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes.split(","):
            w, h = (int(v) for v in size.split("x"))
            paths = []
            for i, img in enumerate(sources):
                paths.append(Path(tmp) / f"{size}_{i}.jpg")
                img.resize((w, h), Image.BICUBIC).save(paths[-1], quality=92)
            fast, slow = images_per_second(paths, draft, args.repeats), images_per_second(paths, full, args.repeats)
            diff = np.concatenate([np.abs(load_preprocessed(p, draft).astype(int) - load_preprocessed(p, full)).ravel()
                                   for p in paths])
            print(f"  {size:>10}: draft {fast:7.1f} images/s, full decode {slow:7.1f}  x{fast / slow:5.2f}   "
                  f"difference mean {diff.mean():.3f} levels, max {diff.max()}")


if __name__ == "__main__":
    main()
