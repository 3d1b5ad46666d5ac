"""Builds a folder of awkward inputs from a real image (used by several test modules)."""

from __future__ import annotations

import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

HOSTILE_NAMES = ["with space.jpg", "quote's \"double\".jpg", "<script>alert(1)<\\script>.jpg",
                 "<img src=x onerror=alert(1)>.jpg", "\"';--.jpg", "ñandú_日本語_🐟.jpg"]


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature + IHDR claiming width x height, with a tiny IDAT (a bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def make_bad_folder(dst: Path, source_jpeg: Path) -> dict[str, str]:
    """Write awkward files into dst/<class>/...; return {relative path: 'ok' | 'skipped'}."""
    cls = dst / "n01440764"
    cls.mkdir(parents=True)
    img = Image.open(source_jpeg).convert("RGB")
    expected = {}

    def put(name: str, status: str) -> Path:
        expected[f"n01440764/{name}"] = status
        return cls / name

    shutil.copy(source_jpeg, put("good.jpg", "ok"))
    put("empty.jpg", "skipped").write_bytes(b"")
    data = source_jpeg.read_bytes()
    put("truncated.jpg", "skipped").write_bytes(data[: len(data) // 2])
    put("notes.jpg", "skipped").write_text("this is a text file, not an image\n")
    rgba = img.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(put("alpha.png", "ok"))
    gray16 = (np.asarray(img.convert("L"), dtype=np.uint16) * 257)
    Image.fromarray(gray16).save(put("sixteen_bit.png", "ok"))
    img.convert("L").save(put("gray.jpg", "ok"))
    img.convert("CMYK").save(put("cmyk.jpg", "ok"))
    img.convert("P").save(put("palette.gif", "ok"))
    put("bomb.png", "skipped").write_bytes(png_header_only(20000, 20000))
    for name in HOSTILE_NAMES:
        shutil.copy(source_jpeg, put(name, "ok"))
    return expected
