"""The dataset's files as the manifest names them, and a picture turned upright: no torch,
so the report (which opens dataset files for large thumbnails) uses them too."""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image, ImageOps

# os.walk gives the bytes of a name that is not UTF-8 (a Latin-1 é from an old zip) as lone
# surrogates U+DC80-U+DCFF, which parquet, HTML and JSON cannot hold; the manifest keeps them
# as the private-use characters U+F780-U+F7FF instead, and maps them back to open the file
_TO_MANIFEST = {0xDC80 + i: 0xF780 + i for i in range(128)}
_TO_FILE = {v: k for k, v in _TO_MANIFEST.items()}


def manifest_name(name: str) -> str:
    """A file or folder name as the manifest keeps it: valid UTF-8 whatever its bytes."""
    return name.translate(_TO_MANIFEST)


def dataset_file(root: str | os.PathLike, path: str) -> str:
    """The file behind a manifest path under the data root."""
    return str(Path(root) / path.translate(_TO_FILE))


def file_version(st: os.stat_result) -> tuple[int, int, int, int]:
    """What says a file is unchanged without reading it: size, mtime, ctime and inode. Size and
    mtime alone miss a rewrite that keeps both (`touch -d`, `cp -p`, a tool restoring mtimes);
    ctime cannot be set back, and a replaced file has a new inode."""
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino


_ORIENTATION = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
                5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
                8: Image.Transpose.ROTATE_90}


def upright(img: Image.Image) -> Image.Image:
    """The image turned as its EXIF orientation says. Pillow's exif_transpose also rewrites the
    EXIF block, which fails on a malformed tag of a file that decodes fine: then the
    orientation tag alone decides."""
    try:
        ImageOps.exif_transpose(img, in_place=True)  # upright without a copy of the pixels
        return img
    except Exception:  # noqa: BLE001 - any EXIF writer error: the pixels are fine
        method = _ORIENTATION.get(img.getexif().get(0x0112))
        return img.transpose(method) if method is not None else img
