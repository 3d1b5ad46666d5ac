"""The report folder holds one report: the files its last build wrote, and nothing of older ones.

Every build lists the files it wrote in MANIFEST, which also marks the folder as a neurocat
report's. The next build into the folder removes the files of that list it did not write
again (the pages and pictures of a section, layer or render no longer in the store), and
only those: a file the user put beside the report is left alone. A folder that holds files
but no manifest is refused, never mixed into or emptied, unless it is a report from before
manifests (rebuilt in place; its own leftovers stay that once).

Light to import (storage only to write the manifest): the CLI checks a folder before it
imports anything heavy.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path, PurePosixPath

from engine.errors import InputError

MANIFEST = ".neurocat-report.json"
OLDER_REPORT = "neurocat static report"  # the footer of every page (templates/base.html)


def report_files(folder: str | Path) -> set[str]:
    """The files (paths relative to `folder`, '/'-separated) the last report written into
    `folder` lists; none for a folder that is new or empty. InputError for a folder that
    holds files without a manifest, or a file where the folder should be."""
    folder = Path(folder)
    manifest = folder / MANIFEST
    if manifest.is_file():
        try:
            return {f for f in json.loads(manifest.read_text(encoding="utf-8"))["files"]
                    if isinstance(f, str) and _inside(f)}
        except (ValueError, KeyError, TypeError) as e:
            raise InputError(f"{folder}: its report manifest {MANIFEST} is unreadable ({e!r}); "
                             "delete the folder or choose another") from None
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{folder} is a file, not a folder")
    if folder.is_dir():
        found = sorted(p.name for p in folder.iterdir())
        if found and _older_report(folder):
            return set()  # rebuilt in place, as it was before manifests; what it held beyond the new report stays
        if found:
            shown = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
            raise InputError(f"{folder} is not a neurocat report folder (it holds {shown}, but no {MANIFEST}): "
                             "a report replaces what its folder holds, so choose a new or empty folder")
    return set()


def _older_report(folder: Path) -> bool:
    """A report written before manifests: its index page ends with the report's footer."""
    index = folder / "index.html"
    try:
        return index.is_file() and OLDER_REPORT in index.read_text(encoding="utf-8", errors="replace")[-4096:]
    except OSError:
        return False


def check_report_folder(folder: str | Path, store: str | Path | None = None) -> None:
    """Refuse, before a job runs, a report folder that a report could not own (report_files),
    or one that would hold the run's store."""
    report_files(folder)
    if store is not None and _within(Path(store).resolve(), Path(folder).resolve()):
        raise InputError(f"the store {store} lies inside the report folder {folder}: "
                         "a report folder holds its report only, put the store beside it")


def claim(folder: str | Path, name: str) -> Path:
    """The path of file `name` in report folder `folder`, listed in its manifest before a job
    writes it there ahead of the report (the audit's findings.json)."""
    record(folder, report_files(folder) | {name})
    return Path(folder) / name


def record(folder: str | Path, files: set[str]) -> None:
    """List `files` in the folder's manifest: the report they make up owns them."""
    from storage.files import write_json

    write_json(Path(folder) / MANIFEST, {"files": sorted(files)})


def remove(folder: str | Path, files: set[str]) -> None:
    """Delete `files` of the report in `folder`, then the sub-folders they leave empty."""
    root = Path(folder).resolve()
    emptied = set()
    for name in files:
        path = root / name
        if not _within(path.parent.resolve(), root):  # a linked folder leads out: not the report's
            continue
        if path.is_file() or path.is_symlink():
            path.unlink()
        emptied.update(p for p in path.parents if root in p.parents)
    for path in sorted(emptied, key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):  # not empty: it holds files of this report, or the user's
            path.rmdir()


def _inside(name: str) -> bool:
    """A manifest entry that names a file inside the folder (not the manifest itself)."""
    path = PurePosixPath(name)
    return bool(name) and not path.is_absolute() and ".." not in path.parts and "\\" not in name and name != MANIFEST


def _within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents
