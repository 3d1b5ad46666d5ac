"""Finding, decoding and batching images without ever holding the dataset in memory.

Every file under the data folder is listed (recursively, in a stable order); a file that
cannot be used, or a folder that cannot be listed, is not an error but a manifest row with
status "skipped" and a reason.
Grayscale, palette, CMYK, alpha and 16-bit images are converted to 8-bit RGB; images
larger than `MAX_PIXELS` are refused before their pixels are decoded; JPEGs many times the
model's input size are decoded at a reduced scale (`Preprocessing.jpeg_draft`).
"""

from __future__ import annotations

import hashlib
import stat
import os
import queue
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image, ImageFile

from engine.errors import InputError
from engine.files import manifest_name, upright
from engine.models import Preprocessing

MAX_PIXELS = 100_000_000  # 10k x 10k; larger is treated as a decompression bomb
Image.MAX_IMAGE_PIXELS = MAX_PIXELS
# longer side / shorter side: resizing the short side to the model's 256 px makes a 1 x 100000
# line 26 GB; at 100:1 it is 6.5 M pixels (panoramas are ~10-20:1)
MAX_ASPECT = 100
ImageFile.LOAD_TRUNCATED_IMAGES = False

SPLITS = ("train", "val", "valid", "validation", "test")


def size_refusal(w: int, h: int) -> str | None:
    """Why an image of this size is not decoded (a decompression bomb, or a line), or None."""
    if w * h > MAX_PIXELS:
        return f"decompression bomb guard: {w}x{h} pixels exceeds {MAX_PIXELS}"
    if min(w, h) > 0 and max(w, h) > MAX_ASPECT * min(w, h):
        return f"aspect ratio guard: {w}x{h} is longer than {MAX_ASPECT}:1 (a line, not a picture)"
    return None


class ImageError(Exception):
    """Why a file was skipped; the message goes into the manifest's `reason`."""


@dataclass(frozen=True)
class Entry:
    """One file of the dataset: its path relative to the data root, label and split; or a
    folder that could not be listed, with the `reason` (its files are unknown, not absent)."""

    path: str
    label: str | None
    split: str | None
    reason: str | None = None


def _label_and_split(rel_dir: Path) -> tuple[str | None, str | None]:
    """Label and split of the files in folder `rel_dir` (relative to the data root)."""
    parts = rel_dir.parts
    split = parts[0] if parts and parts[0].lower() in SPLITS else None
    label_parts = parts[1:] if split else parts
    return (manifest_name(label_parts[-1]) if label_parts else None), split


def _not_a_file(path: Path) -> str | None:
    """Why a listed name cannot be read as a file (None: it can): a link to nothing, a name in a
    folder that may be listed but not entered, a pipe or device (reading a pipe would block)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return "broken symbolic link" if path.is_symlink() else "vanished while listed"
    except OSError as e:
        return f"unreadable: {e.strerror or e}"
    return None if stat.S_ISREG(st.st_mode) else "not a regular file (a pipe, socket or device)"


def list_images(root: str | os.PathLike, exclude: Sequence[str | os.PathLike] = (),
                limit: int | None = None) -> list[Entry]:
    """Every regular file under `root`, sorted by relative path (the image index order); the
    first `limit` of them when given.

    ImageFolder layout: the label is the name of the file's folder; a `train/`, `val/` or
    `test/` folder directly under the root names the split. Files directly in the root
    have no label. Linked folders are followed (each real folder once). Hidden files and
    folders (starting with '.') are not part of a dataset,
    nor are the folders in `exclude` (the run's own store and report, when they lie inside).
    A folder that cannot be listed (no permission) is an entry too, with the reason, so that
    its files are reported missing rather than silently absent; the root is an InputError.
    So is a name that is no readable file (`_not_a_file`).
    """
    root = Path(root)
    skip = {os.path.realpath(p) for p in exclude}
    entries, unlisted = [], []
    seen = {os.path.realpath(root)}  # folders entered: a linked folder is followed once, a link loop not at all
    for dirpath, dirnames, filenames in os.walk(root, onerror=unlisted.append, followlinks=True):
        kept = []
        for d in sorted(dirnames):
            real = os.path.realpath(os.path.join(dirpath, d))
            if not d.startswith(".") and real not in skip and real not in seen:
                seen.add(real)
                kept.append(d)
        dirnames[:] = kept
        rel_dir = Path(dirpath).relative_to(root)
        label, split = _label_and_split(rel_dir)
        for name in filenames:
            if name.startswith("."):
                continue
            entries.append(Entry(manifest_name((rel_dir / name).as_posix()), label, split,
                                 reason=_not_a_file(Path(dirpath) / name)))
    for error in unlisted:
        rel_dir = Path(error.filename).relative_to(root)
        if rel_dir == Path():
            raise InputError(f"data folder cannot be listed: {root} ({error.strerror or error})")
        entries.append(Entry(manifest_name(rel_dir.as_posix()), *_label_and_split(rel_dir),
                             reason=f"unreadable folder: {error.strerror or error}"))
    entries.sort(key=lambda e: e.path)
    return entries[:limit]


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB from any mode Pillow decodes (L, LA, P, RGBA, CMYK, I;16, I, F, ...)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        if img.mode == "F":
            lo, hi = float(arr.min()), float(arr.max())
            arr = (arr - lo) / (hi - lo or 1.0) * 255.0
        else:
            arr = arr / top * 255.0
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode != "RGB":
        return img.convert("RGB")
    return img


def open_image(path: str | os.PathLike, at_least: int | None = None) -> Image.Image:
    """Decode `path` to an upright 8-bit RGB image, or raise ImageError with the reason.

    `at_least`: a JPEG may be decoded at a reduced DCT scale (1/2, 1/4 or 1/8, Pillow's
    `draft`) as long as both its sides stay at least this long; others decode in full.
    """
    try:
        if os.path.getsize(path) == 0:
            raise ImageError("empty file")
        with Image.open(path) as img:
            w, h = img.size
            refusal = size_refusal(w, h)
            if refusal:
                raise ImageError(refusal)
            if at_least and min(w, h) >= 2 * at_least:  # else no scale applies: the plain decode
                img.draft(None, (at_least, at_least))
            img.load()
            return _to_rgb(upright(img))
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(f"decompression bomb guard: {e}") from None
    except Image.UnidentifiedImageError:
        raise ImageError("not an image (unrecognised format)") from None
    except (OSError, SyntaxError, ValueError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "truncated" in msg.lower() or "premature end" in msg.lower():
            raise ImageError(f"truncated or corrupt image: {msg}") from None
        raise ImageError(f"cannot decode: {msg}") from None


def resize_crop(img: Image.Image, prep: Preprocessing) -> np.ndarray:
    """Resize the shorter side to `prep.resize`, centre-crop `prep.crop`: uint8 [H, W, 3].

    Bilinear with antialiasing, exactly as torchvision's Resize + CenterCrop on a PIL image.
    """
    w, h = img.size
    if w <= h:
        nw, nh = prep.resize, int(prep.resize * h / w)
    else:
        nw, nh = int(prep.resize * w / h), prep.resize
    img = img.resize((nw, nh), Image.BILINEAR)
    c = prep.crop
    left = int(round((nw - c) / 2.0))
    top = int(round((nh - c) / 2.0))
    if nw < c or nh < c:  # only for crop > resize: pad like torchvision's CenterCrop
        canvas = Image.new("RGB", (max(nw, c), max(nh, c)))
        canvas.paste(img, ((max(nw, c) - nw) // 2, (max(nh, c) - nh) // 2))
        img, nw, nh = canvas, max(nw, c), max(nh, c)
        left, top = int(round((nw - c) / 2.0)), int(round((nh - c) / 2.0))
    return np.array(img.crop((left, top, left + c, top + c)), dtype=np.uint8)


DRAFT_MARGIN = 2  # a drafted JPEG keeps at least this many pixels per output pixel (Pillow's reducing_gap)


def open_for_model(path: str | os.PathLike, prep: Preprocessing) -> Image.Image:
    """Decode `path` as the model's input pipeline does, before the resize. Raises ImageError.

    With `prep.jpeg_draft`, a JPEG of at least 2 x DRAFT_MARGIN x `prep.resize` on both
    sides is decoded at a reduced scale (Pillow's draft; measured on a 4032x3024 photo:
    25 ms instead of 146, mean difference after the resize 0.2 levels, at most 3)."""
    return open_image(path, DRAFT_MARGIN * prep.resize if prep.jpeg_draft else None)


def load_preprocessed(path: str | os.PathLike, prep: Preprocessing) -> np.ndarray:
    """Decode + resize + crop one file: uint8 [crop, crop, 3]. Raises ImageError."""
    return resize_crop(open_for_model(path, prep), prep)


@dataclass
class Batch:
    """Decoded images of one batch, in index order; `failed` are the indices that did not decode."""

    indices: np.ndarray  # int64 [B], dataset image indices
    images: torch.Tensor  # uint8 [B, H, W, 3]
    failed: list[tuple[int, str]] = field(default_factory=list)

    def normalized(self, prep: Preprocessing, device: torch.device | str = "cpu") -> torch.Tensor:
        x = self.images
        if torch.device(device).type == "cuda":
            x = x.pin_memory().to(device, non_blocking=True)
        return prep.normalize(x)


def iter_batches(
    items: Sequence[tuple[int, str | os.PathLike]],
    prep: Preprocessing,
    batch_size: int = 32,
    decode_threads: int = 2,
    prefetch: int = 2,
) -> Iterator[Batch]:
    """Decode `(index, path)` items in a thread pool and yield them in batches, in order.

    Decoding runs ahead of the consumer by `prefetch` batches so it overlaps the model's
    forward pass; memory is bounded by (prefetch + 1) batches whatever the dataset size.
    A batch whose every image failed is still yielded (with zero images) so failures are seen.
    """
    chunks = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
    if not chunks:
        return

    def decode(item):
        idx, path = item
        try:
            return idx, load_preprocessed(path, prep), None
        except ImageError as e:
            return idx, None, str(e)

    def assemble(results) -> Batch:
        ok = [(i, a) for i, a, err in results if err is None]
        failed = [(i, err) for i, _, err in results if err is not None]
        if ok:
            images = torch.from_numpy(np.stack([a for _, a in ok]))
        else:
            images = torch.zeros((0, prep.crop, prep.crop, 3), dtype=torch.uint8)
        return Batch(np.array([i for i, _ in ok], dtype=np.int64), images, failed)

    with ThreadPoolExecutor(max_workers=max(1, decode_threads), thread_name_prefix="decode") as pool:
        pending: queue.SimpleQueue = queue.SimpleQueue()
        submitted = 0
        for _ in range(min(prefetch + 1, len(chunks))):
            pending.put([pool.submit(decode, it) for it in chunks[submitted]])
            submitted += 1
        for _ in range(len(chunks)):
            futures = pending.get()
            batch = assemble([f.result() for f in futures])
            if submitted < len(chunks):
                pending.put([pool.submit(decode, it) for it in chunks[submitted]])
                submitted += 1
            yield batch


class DecodedBatches:
    """The batches of `iter_batches` that hold images; after iteration `failed` lists, in
    index order, the `(index, reason)` of every file that did not decode.

    Shard tasks work on the decoded images and record the failures in their result; this
    keeps the two apart so no task has to skip the all-failed batches itself.
    """

    def __init__(self, items: Sequence[tuple[int, str | os.PathLike]], prep: Preprocessing, batch_size: int = 32):
        self._batches = iter_batches(items, prep, batch_size)
        self.failed: list[tuple[int, str]] = []

    def __iter__(self) -> Iterator[Batch]:
        for batch in self._batches:
            self.failed += batch.failed
            if len(batch.indices):
                yield batch


def label_index(label: str | None, wnid_index: dict[str, int]) -> int:
    """Class index of a folder label that is a WordNet id, else -1."""
    if label is None:
        return -1
    return wnid_index.get(label, -1)


def describe_paths(entries: Iterable[Entry]) -> dict:
    """Counts for the report's dataset summary."""
    entries = list(entries)
    labels = {e.label for e in entries if e.label}
    splits = sorted({e.split for e in entries if e.split})
    return {"files": len(entries), "labels": len(labels), "splits": splits}
