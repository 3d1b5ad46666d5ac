"""Tables and JSON written beside a store or into a report folder, atomically."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pandas as pd

from storage.store import _jsonable, atomic_write_bytes


def write_csv(path: str | Path, df: pd.DataFrame) -> Path:
    buf = io.StringIO()
    df.to_csv(buf, index=False, lineterminator="\r\n")  # RFC 4180: a \r in a file name is then quoted too
    atomic_write_bytes(Path(path), buf.getvalue().encode("utf-8"))
    return Path(path)


def write_json(path: str | Path, obj: Any) -> Path:
    atomic_write_bytes(Path(path), json.dumps(_jsonable(obj), indent=2, ensure_ascii=False).encode("utf-8"))
    return Path(path)
