"""Builds a folder of awkward inputs from a real image (used by several test modules)."""

from __future__ import annotations

import io
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from engine.files import manifest_name

HOSTILE_NAMES = ["with space.jpg", "quote's \"double\".jpg", "<script>alert(1)<\\script>.jpg",
                 "<img src=x onerror=alert(1)>.jpg", "\"';--.jpg", "ñandú_日本語_🐟.jpg",
                 "carriage\rreturn.jpg", "evil\u202egpj.exe"]


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature + IHDR claiming width x height, with a tiny IDAT (a bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def malformed_exif_jpeg(img: Image.Image) -> bytes:
    """A JPEG that decodes, with Orientation 6 and a mistyped tag (ASCII under 0x0140, a SHORT
    tag): Pillow's exif_transpose fails rewriting such an EXIF block (struct.error)."""
    exif = Image.Exif()
    exif[0x0112], exif[0x010F] = 6, "Canon"
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif, quality=90)
    data = bytearray(buf.getvalue())
    i = data.index(b"\x01\x0f\x00\x02")  # the IFD entry of tag 0x010F, type ASCII
    data[i:i + 2] = b"\x01\x40"
    return bytes(data)


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
    put("line.png", "skipped").write_bytes(png_header_only(1, 20000))  # resized to 256 px wide: 5 GB
    header = bytearray(png_header_only(32, 32))
    header[11] = 12  # IHDR's length field one short: Pillow raises ValueError, not OSError
    put("corrupt_header.png", "skipped").write_bytes(bytes(header))
    put("bad_exif.jpg", "ok").write_bytes(malformed_exif_jpeg(img))
    for name in HOSTILE_NAMES:
        shutil.copy(source_jpeg, put(name, "ok"))
    latin1 = os.fsdecode(b"caf\xe9.jpg")  # not UTF-8 (an old zip's Latin-1 name): os.walk's surrogate escape
    shutil.copy(source_jpeg, cls / latin1)
    expected[f"n01440764/{manifest_name(latin1)}"] = "ok"
    return expected
