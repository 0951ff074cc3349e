"""Atomic file and directory writes, and the date-partition layout.

Every publication step writes aside (a temporary sibling) and then renames into place, so a crash
or a failed run never leaves a half-written file or partition where a reader can see it, and a
re-run of the same date replaces the previous output wholesale (idempotent).
"""
from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from fm.durable import commit_file as _commit, fsync_path, fsync_tree  # noqa: F401 (re-exported)
from jobs.core.settings import DIR_MODE, FILE_MODE, Paths
from jobs.core.failpoints import failpoint


def partition(root: Path, day: dt.date) -> Path:
    return root / f"dt={day.isoformat()}"


def raw_partition(paths: Paths, day: dt.date) -> Path:
    return partition(paths.raw, day)


def temp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")


def restrict_tree(root: Path) -> None:
    """Set :data:`FILE_MODE` on every file and :data:`DIR_MODE` on every folder under ``root``
    (``root`` included), whatever the umask of the process or library that wrote them."""
    if root.is_file():
        os.chmod(root, FILE_MODE)
        return
    for dirpath, _, files in os.walk(root):
        os.chmod(dirpath, DIR_MODE)
        for f in files:
            os.chmod(Path(dirpath) / f, FILE_MODE)


def atomic_write_table(table: pa.Table, path: Path) -> Path:
    """Write one Parquet file under a temporary name, then rename it into place (durably)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    pq.write_table(table, tmp)
    os.chmod(tmp, FILE_MODE)
    failpoint(f"io.before_rename:{path.name}")   # file written aside, not yet renamed into place
    _commit(tmp, path)
    failpoint(f"io.renamed:{path.name}")         # renamed into place and fsynced
    return path


def atomic_write_text(text: str, path: Path) -> Path:
    """Write a text file under a temporary name with :data:`FILE_MODE`, then rename it into place (durably)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        os.fchmod(f.fileno(), FILE_MODE)          # the umask may have removed bits, never adds any back
        f.write(text)
    failpoint(f"io.before_rename:{path.name}")   # file written aside, not yet renamed into place
    _commit(tmp, path)
    failpoint(f"io.renamed:{path.name}")         # renamed into place and fsynced
    return path


def atomic_write_json(obj: dict, path: Path) -> Path:
    return atomic_write_text(json.dumps(obj, indent=2, sort_keys=True, default=str), path)


def swap_dir(staging: Path, final: Path) -> None:
    """Replace directory ``final`` by ``staging``: the old copy moves aside first, then is removed.

    Two renames are not one atomic step; between them a reader sees no directory (never a partial
    one), and a crash there leaves the old copy recoverable under its ``.old-`` name.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    restrict_tree(staging)
    fsync_tree(staging)
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(final, old)
    failpoint(f"io.swap_dir.aside:{final.parent.name}/{final.name}")   # old copy aside, new one not yet in place
    os.replace(staging, final)
    fsync_path(final.parent)
    failpoint(f"io.swap_dir.done:{final.parent.name}/{final.name}")    # new copy in place, old one not yet removed
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def partition_dates(root: Path, until: dt.date | None = None, marker: str | None = None) -> list[dt.date]:
    """Dates of the ``dt=YYYY-MM-DD`` partition folders under ``root``, oldest first (a missing root:
    none; names that are not dates are ignored, e.g. a staging folder). ``until``: only dates on or
    before it; ``marker``: only partitions holding that file (e.g. a committed ``_manifest.json``)."""
    out = []
    for p in root.glob("dt=*") if root.exists() else []:
        try:
            d = dt.date.fromisoformat(p.name[3:])
        except ValueError:
            continue
        if p.is_dir() and (until is None or d <= until) and (marker is None or (p / marker).exists()):
            out.append(d)
    return sorted(out)


def latest_partition_before(root: Path, day: dt.date) -> dt.date | None:
    """Most recent ``dt=`` partition strictly before ``day`` (the state to build on)."""
    earlier = [d for d in partition_dates(root) if d < day]
    return max(earlier) if earlier else None
