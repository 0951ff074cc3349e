"""The offline store's view of the embeddings: only dates that were published and not rolled back.

Why: Feast's file offline store reads whatever its ``FileSource`` points at. Pointed at the embed
output, ``get_historical_features`` returned days that failed the gate or that an operator rolled
back, so a ranker trained offline could learn from vectors that were never served. The sources in
``feature_repo/definitions.py`` point at this tree instead::

    published/profile/dt=D/*.parquet     hard links to embeddings/profile/dt=D/*.parquet as published
    published/title/dt=D/*.parquet       the same for titles
    published/STATE.json                 {date: publication} the tree holds

:func:`sync` runs after every pointer move (``jobs.core.publication.settle``: publish, rollback, index,
and ``reconcile`` after a crash): it adds the partitions of dates that became published, relinks a
date published again as a new publication, and withdraws dates a rollback undid
(:func:`jobs.rollback.published_dates`). Hard links cost no copy and pin the bytes that were
published: a later re-embed replaces the embed partition (new files), not the linked ones, until
that date is published again. Where the filesystem refuses links the files are copied.

Each date's partition is built aside and renamed into place (:func:`jobs.core.io.swap_dir`: fsynced
files and folder), and withdrawn by a rename before removal, so a reader lists a whole partition or
none; the two views are updated one after the other (an offline read is not a serving read).
"""
from __future__ import annotations

import datetime as dt
import errno
import json
import os
import shutil
import uuid
from pathlib import Path

from jobs.core.io import atomic_write_json, fsync_path, partition, swap_dir, temp_sibling
from jobs.core.settings import DIR_MODE, Paths
from jobs.core.failpoints import failpoint

VIEWS = ("profile", "title")


def root(paths: Paths) -> Path:
    return paths.home / "published"


def view_root(paths: Paths, view: str) -> Path:
    return root(paths) / view


def source_root(paths: Paths, view: str) -> Path:
    return {"profile": paths.profile_embeddings, "title": paths.title_embeddings}[view]


def ensure_roots(paths: Paths) -> None:
    """Create the (possibly empty) view folders, so the Feast sources always name a folder."""
    for view in VIEWS:
        view_root(paths, view).mkdir(parents=True, exist_ok=True, mode=DIR_MODE)


def desired(paths: Paths) -> dict[str, str]:
    """``{date: publication}`` the tree must hold: every published, not rolled-back date, with the
    publication of its latest pointer move."""
    from jobs.rollback import moves, published_dates        # jobs.rollback imports jobs.core.publication
    keep = {d.isoformat() for d in published_dates(paths)}
    out: dict[str, str] = {}
    for rec in moves(paths):
        if rec["date"] in keep:
            out[rec["date"]] = rec["publication"]
    return out


def held(paths: Paths) -> dict[str, str]:
    """What the tree holds (``STATE.json``); empty when missing or unreadable (then rebuilt)."""
    try:
        state = json.loads((root(paths) / "STATE.json").read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
            raise
        shutil.copy2(src, dst)


def _place(paths: Paths, view: str, day: dt.date) -> None:
    """Link ``day``'s embed files of ``view`` into a folder aside, then swap it into place."""
    src = partition(source_root(paths, view), day)
    files = sorted(src.glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"published date {day} has no {view} Parquet under {src}: the offline store cannot "
                                f"expose it (re-run `fmpipe embed date={day}` and publish it again)")
    final = partition(view_root(paths, view), day)
    tmp = temp_sibling(final)
    tmp.mkdir(parents=True, mode=DIR_MODE)
    for f in files:
        _link_or_copy(f, tmp / f.name)
    swap_dir(tmp, final)


def _withdraw(paths: Paths, view: str, day: str) -> None:
    final = view_root(paths, view) / f"dt={day}"
    if not final.exists():
        return
    aside = final.with_name(f".{final.name}.withdrawn-{uuid.uuid4().hex[:8]}")
    os.replace(final, aside)
    fsync_path(final.parent)
    shutil.rmtree(aside, ignore_errors=True)


def sync(paths: Paths) -> dict:
    """Bring the tree to :func:`desired` (call under the publication lock); returns what changed."""
    ensure_roots(paths)
    want, have = desired(paths), held(paths)
    added = sorted(d for d, pub in want.items()
                   if have.get(d) != pub or not all(partition(view_root(paths, v), dt.date.fromisoformat(d)).exists()
                                                    for v in VIEWS))
    removed = sorted(set(have) - set(want))
    stray = {p.name[3:] for v in VIEWS for p in view_root(paths, v).glob("dt=*")} - set(want)
    for d in added:
        for view in VIEWS:
            _place(paths, view, dt.date.fromisoformat(d))
            failpoint("published.placed")           # one view's date linked into published/, the next not yet
    for d in sorted(set(removed) | stray):
        for view in VIEWS:
            _withdraw(paths, view, d)
    failpoint("published.before_state")               # tree linked/withdrawn, STATE.json not yet rewritten
    if want != have:
        atomic_write_json(want, root(paths) / "STATE.json")
    return {"added": added, "removed": sorted(set(removed) | stray)}
