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
from jobs.settings import Paths


def partition(root: Path, day: dt.date) -> Path:
    return root / f"dt={day.isoformat()}"


def raw_partition(paths: Paths, day: dt.date) -> Path:
    return partition(paths.raw, day)


def temp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")


def atomic_write_table(table: pa.Table, path: Path) -> Path:
    """Write one Parquet file under a temporary name, then rename it into place (durably)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    pq.write_table(table, tmp)
    _commit(tmp, path)
    return path


def atomic_write_json(obj: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
    _commit(tmp, path)
    return path


def swap_dir(staging: Path, final: Path) -> None:
    """Replace directory ``final`` by ``staging``: the old copy moves aside first, then is removed.

    Two renames are not one atomic step; between them a reader sees no directory (never a partial
    one), and a crash there leaves the old copy recoverable under its ``.old-`` name.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    fsync_tree(staging)
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(final, old)
    os.replace(staging, final)
    fsync_path(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def latest_partition_before(root: Path, day: dt.date) -> dt.date | None:
    """Most recent ``dt=`` partition strictly before ``day`` (the state to build on)."""
    days = [dt.date.fromisoformat(p.name[3:]) for p in root.glob("dt=*") if p.is_dir()]
    earlier = [d for d in days if d < day]
    return max(earlier) if earlier else None
