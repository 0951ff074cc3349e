"""Versioned publications: the features and the indexes of one date, made current together by one
atomic pointer swap, with rollback to any retained publication.

Layout under ``$FMPIPE_HOME``::

    publications/CURRENT.json           the pointer: {date, publication, index_dir, model_version, seq}
    publications/history.jsonl          one line per pointer move (publish, rollback, index rebuild)
    publications/<date>.<id>/manifest.json   what the publication holds (status, rows, base, tables)
    publications/<date>.<id>/index*/    its FAISS indexes (titles cosine + raw inner product, profiles)
    feast/online.db                     SQLite online store: the live Feast tables, plus one snapshot
                                        table per retained publication and staging tables while building

How a date is published (``jobs.publish.run``), and why readers never see half a day:

1. *Stage.* Each feature view's online state is built in a staging table of the same SQLite
   database (Feast's columns and primary key; for small records stored clustered on that key,
   ``WITHOUT ROWID``, see :meth:`jobs.core.online_store.OnlineTables.stage_view`; Feast reads and writes it unchanged),
   rows inserted in key order; the day's rows are Feast's row bytes (:mod:`jobs.core.sqlite_rows`; other
   stores: ``provider.online_write_batch`` with Feast ``Value`` protos; or Feast's own materialize
   engine with ``method=materialize``), then the rest of the state is copied forward in SQL from the base
   publication (``INSERT OR IGNORE``: today's rows win; rows older than the view's TTL are dropped).
   The base is the most recently committed publication of an earlier date, so re-running a date
   rebuilds the same state (idempotent), and publishing after a rollback builds on the rolled-back-to
   state. With no retained base, the state is seeded from the offline Parquet (latest row per
   entity within the TTL), which gives the same values.
2. *Index.* The title and profile indexes are built aside, into the publication's folder.
3. *Commit.* One SQLite transaction renames, for every feature view, ``live -> snapshot of the
   publication being replaced`` and ``staging -> live``, records the live publication in a
   bookkeeping table and stores the new pointer record (``fmpipe_publication_pointer``): that
   transaction is the commit point. Then the record is mirrored to the files (manifest status,
   ``CURRENT.json`` by temp file + ``os.replace``, one history line). A Feast reader (any process,
   plain ``FeatureStore(repo_path=...)``, ``get_online_features``) reads the live table names: every
   read sees a whole day's state, the old one or the new one, never a half-written day (the renames
   commit atomically; open connections re-prepare against the new schema). Readers of the pointer
   (:func:`current`: indexes, retrieval, reports) take the newer of ``CURRENT.json`` and the stored
   record, so they follow the features being served. Residual window, microseconds wide: one
   ``get_online_features`` call over *two* views issues one SELECT per view, and a reader reads the
   pointer and the features in separate statements, so a call racing the swap can pair one day's
   state with the other's. A failure before the commit leaves the previous publication serving
   (only a staging table and a folder are left behind, removed by the next run). A crash after it
   (``kill -9`` between the swap and ``CURRENT.json``) has published: readers already see the new
   day whole, features and index, and :func:`reconcile` (run under the lock before every publish,
   index build and rollback) finishes the file mirror.

Rollback (``fmpipe rollback --to DATE``) makes the latest committed publication of DATE current
again: when its snapshot tables are retained it is the same swap (instant, exact: every entity's
value as of that publication, including entities first seen later, which disappear again);
otherwise its state is rebuilt (re-writing that date's rows on top of its base) and committed as a
new publication of that date. The index pointer moves with it. ``keep`` publications stay
restorable (snapshot tables + index folders); older ones are dropped after each commit.

Order: serving never moves to an older date by accident. :func:`commit` refuses a date older than
the serving one (:class:`PublishOrderError`, naming both dates and the ways forward) unless the
caller passes ``backwards_ok`` (rollback; ``fmpipe publish force=true``). ``jobs.publish`` turns a
re-publish of an old date whose inputs are byte-identical to its latest publication
(:func:`published_with`, the manifest's ``content`` digest) into a no-op instead.

The online backends (SQLite staging/snapshot tables and the swap, the in-place path for other
stores) live in :mod:`jobs.core.online_store`; Redis (a staging database and ``SWAPDB``, the pointer
record in a marker key swapped with the data, re-seeded from the offline tables when flushed) in
:mod:`jobs.core.redis_store`; building a date's state aside in :mod:`jobs.core.staging`;
rollback in :mod:`jobs.rollback`.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import shutil
import sqlite3
import uuid
import warnings
from pathlib import Path

from jobs.core.failpoints import failpoint
from jobs.core.io import atomic_write_json, fsync_path
from jobs.core.online_store import LIVE_TABLE, POINTER_TABLE, OnlineTables, _safe, in_key_order  # noqa: F401 (re-exported)
from jobs.core.settings import DIR_MODE, FILE_MODE, Paths

FEATURE_VIEWS = ("profile_embeddings", "title_embeddings")


def root(paths: Paths) -> Path:
    return paths.home / "publications"


def pointer_path(paths: Paths) -> Path:
    return root(paths) / "CURRENT.json"


def pub_dir(paths: Paths, pub_id: str) -> Path:
    return root(paths) / pub_id


def new_id(day: dt.date) -> str:
    return f"{day.isoformat()}.{uuid.uuid4().hex[:8]}"


def current(paths: Paths) -> dict | None:
    """The current publication's pointer record, or None before the first publish.

    The newer (by ``seq``) of ``CURRENT.json`` and the record the last swap transaction stored in
    the SQLite online store: the swap is the commit point, so a publisher killed after it and
    before ``CURRENT.json`` is written has still published, and readers (indexes, retrieval,
    reports) follow the features they are served instead of pairing them with yesterday's index."""
    on_disk = _pointer_file(paths)
    in_store = committed_pointer(paths)
    if in_store is not None and (on_disk is None or in_store.get("seq", 0) > on_disk.get("seq", 0)):
        return in_store
    if on_disk is None and in_store is None and pointer_path(paths).exists():
        moves = history(paths)                 # a damaged CURRENT.json and no store record: the last move
        return moves[-1] if moves else None
    return on_disk


def _pointer_file(paths: Paths) -> dict | None:
    """CURRENT.json, or None when absent, empty or corrupt (power loss, a full disk, a hand edit).

    Why not fail: the commit record in the SQLite store (or the history) says what is serving, and
    :func:`settle` rewrites the file from it under the lock before the next pointer move."""
    p = pointer_path(paths)
    if not p.exists():
        return None
    try:
        record = json.loads(p.read_text())
    except (ValueError, UnicodeDecodeError):
        record = None
    if not isinstance(record, dict) or "publication" not in record:
        warnings.warn(f"{p} is empty or corrupt: following the committed record instead (the next publish, "
                      "index build or rollback rewrites it)", RuntimeWarning, stacklevel=2)
        return None
    return record


def committed_pointer(paths: Paths) -> dict | None:
    """The pointer record of the last swap: stored in the SQLite online store, or with the live data
    of a Redis one (:func:`jobs.core.redis_store.committed_record`); None for other stores or before any."""
    from jobs.core.feast_store import repo_config, sqlite_online_path
    db = sqlite_online_path(paths)
    if db is None:
        cfg = repo_config(paths)
        if getattr(cfg.online_store, "type", "") == "redis":
            from jobs.core.redis_store import committed_record
            return committed_record(cfg.online_store, cfg.project)
        return None
    if not db.exists():
        return None
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=60)) as c:
        try:
            row = c.execute(f"SELECT record FROM {POINTER_TABLE} WHERE id = 1").fetchone()
        except sqlite3.OperationalError as e:           # a store no swap has written to yet
            if "no such table" in str(e):
                return None
            raise
    return json.loads(row[0]) if row else None


def next_seq(paths: Paths, cur: dict | None) -> int:
    """The sequence number of the next pointer move after ``cur`` (the current record; history and
    pointer both count)."""
    return max([r.get("seq", 0) for r in history(paths)] + [(cur or {}).get("seq", 0)]) + 1


def manifest(paths: Paths, pub_id: str) -> dict:
    return json.loads((pub_dir(paths, pub_id) / "manifest.json").read_text())


def write_manifest(paths: Paths, pub_id: str, data: dict) -> None:
    atomic_write_json(data, pub_dir(paths, pub_id) / "manifest.json")


def history(paths: Paths) -> list[dict]:
    """Every pointer move, oldest first. A line that does not parse (a torn last line after power
    loss) is skipped with a warning naming it: the commit point is the store's record, and one lost
    history line must not stop publish, rollback or retrieval."""
    f = root(paths) / "history.jsonl"
    if not f.exists():
        return []
    records = []
    for n, line in enumerate(f.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            rec = None
        if isinstance(rec, dict) and "publication" in rec and "date" in rec:
            records.append(rec)
        else:
            warnings.warn(f"{f} line {n} is torn or corrupt ({line[:80]!r}): skipped", RuntimeWarning, stacklevel=2)
    return records


def _append_history(paths: Paths, record: dict) -> None:
    """Append one line, durably; a torn last line is first closed with a newline so the new record
    never fuses with it."""
    f_path = root(paths) / "history.jsonl"
    torn = False
    if f_path.exists() and f_path.stat().st_size > 0:
        with open(f_path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            torn = f.read(1) != b"\n"
    created = not f_path.exists()
    with os.fdopen(os.open(f_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, FILE_MODE), "a", encoding="utf-8") as f:
        os.fchmod(f.fileno(), FILE_MODE)
        f.write(("\n" if torn else "") + json.dumps(record, sort_keys=True) + "\n")
        f.flush()
        failpoint("publish.journal.unsynced")      # history line in the page cache, not yet fsynced
        os.fsync(f.fileno())
    if created:
        fsync_path(f_path.parent)                 # the new file's name must survive power loss too


@contextlib.contextmanager
def lock(paths: Paths):
    """One publisher at a time (publish, rollback, index rebuild) per FMPIPE_HOME."""
    from jobs.core.locks import open_lock_file
    root(paths).mkdir(parents=True, exist_ok=True)
    os.chmod(root(paths), DIR_MODE)
    with os.fdopen(open_lock_file(root(paths) / ".lock"), "r+") as f:    # owner-only: nobody else can hold it
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)



# ---------------------------------------------------------------------------------------------
# Commit, reconcile, garbage collection
# ---------------------------------------------------------------------------------------------
class PublishOrderError(RuntimeError):
    """A date older than the serving one was asked to become current (the message says how to proceed)."""


def is_behind(day: dt.date, cur: dict | None) -> bool:
    """Whether making ``day`` current would move serving backwards from the ``cur`` record."""
    return cur is not None and day < dt.date.fromisoformat(cur["date"])


def order_error(day: dt.date, cur: dict) -> PublishOrderError:
    """The refusal of an out-of-order publish: what, why, and the two ways forward."""
    serving = cur["date"]
    return PublishOrderError(
        f"refusing to publish {day}: serving is already at the later date {serving} (publication "
        f"{cur['publication']}), and making {day} current would move serving backwards (entities updated since {day} "
        f"would revert or vanish, and the next day would build on the old state). To bring a changed {day} "
        f"forward, re-run it and every later date in order: `fmpipe backfill --start {day} --end {serving} "
        f"publish.force=true` (serving is at {day} until the run reaches {serving}). To serve {day} again on "
        f"purpose, roll back: `fmpipe rollback --to {day}` (or `fmpipe publish date={day} force=true`). "
        f"Re-publishing {day} with exactly the content it was published with is a no-op.")


def check_order(day: dt.date, cur: dict | None, backwards_ok: bool = False) -> None:
    """Refuse to make ``day`` current while a later date is serving, unless explicitly allowed.

    Why: each date's online state is built on the previous one; putting an older date in front
    silently reverts every entity updated since, and the following day would build on it."""
    if not backwards_ok and is_behind(day, cur):
        raise order_error(day, cur)


def published_with(paths: Paths, day: dt.date, content: str) -> dict | None:
    """The latest committed record of ``day`` if its publication was built from exactly ``content``
    (the digest of its input tables), else None: what makes re-publishing an old date a no-op.
    Only the latest record counts: the later dates being served were built on that one."""
    rec = next((r for r in reversed(history(paths)) if r["date"] == day.isoformat()), None)
    if rec is None:
        return None
    try:
        m = json.loads((pub_dir(paths, rec["publication"]) / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    return rec if m.get("content") == content else None


def commit(paths: Paths, online: OnlineTables, pub_id: str, day: dt.date, incoming: dict[str, str],
           index_dir: str | None, model_version: str | None, action: str, backwards_ok: bool = False) -> dict:
    """Make ``pub_id`` current: swap its tables in together with the pointer record (one SQLite
    transaction, the commit point), then mirror the record to ``CURRENT.json`` and the history.

    The order check lives here, under the caller's publication lock, so no caller can move serving
    to an older date by accident; only an explicit rollback or forced publish passes ``backwards_ok``."""
    cur = current(paths)
    check_order(day, cur, backwards_ok)
    outgoing = (cur or {}).get("publication")
    if outgoing == pub_id:
        outgoing = None
    record = {"date": day.isoformat(), "publication": pub_id, "index_dir": index_dir, "model_version": model_version,
              "seq": next_seq(paths, cur), "action": action, "committed_at": dt.datetime.now(dt.timezone.utc).isoformat(),
              "previous": outgoing}
    online.swap_in(incoming, outgoing, pub_id, record)
    failpoint("publish.swapped")                    # committed in the online store, CURRENT.json not yet written
    settle(paths, record)
    return record


def settle(paths: Paths, record: dict) -> None:
    """Mirror a committed pointer ``record`` to the files: manifest status, CURRENT.json, history,
    and the offline store's ``published/`` tree (:mod:`jobs.core.published`)."""
    m = manifest(paths, record["publication"])
    if m.get("status") != "committed" or not m.get("retained", True):
        m.update({"status": "committed", "retained": True})
        write_manifest(paths, record["publication"], m)
    failpoint("publish.settle.manifest")           # manifest says committed, CURRENT.json not yet rewritten
    if _pointer_file(paths) != record:
        atomic_write_json(record, pointer_path(paths))
    failpoint("publish.settle.pointer")            # CURRENT.json written, history line not yet appended
    if record.get("seq") not in {r.get("seq") for r in history(paths)}:
        _append_history(paths, record)
    failpoint("publish.settle.journal")            # history line appended, published/ tree not yet synced
    from jobs.core.published import sync                  # the offline store follows every pointer move
    sync(paths)


def reconcile(paths: Paths, online: OnlineTables | None = None) -> str | None:
    """Finish a publisher's commit that a crash interrupted; run under the lock before every pointer move.

    Killed after the swap transaction (the commit point) and before the files: roll forward (the
    store's pointer record becomes CURRENT.json, the manifest says committed, history gets its
    line). Killed between CURRENT.json and the history line: append it. Returns the publication
    repaired, if any. Live tables that disagree with the pointer for any other reason (an online
    store written by an older version, or edited by hand) are put back to the pointer's tables."""
    cur = current(paths)
    if cur is None:
        return None
    repaired = cur["publication"] if _pointer_file(paths) != cur else None
    failpoint("publish.reconcile")                 # recovery under way: files not yet settled from the store's record
    settle(paths, cur)
    if online is None or not online.atomic:
        return repaired
    if hasattr(online, "ensure_serving"):              # Redis: re-seed a flushed store, restore a snapshot
        return cur["publication"] if online.ensure_serving(paths, cur) else repaired
    wrong = {fv: pub for fv, pub in online.live_publication().items() if pub != cur["publication"]}
    if not wrong:
        return repaired
    incoming = {fv: online.snapshot(cur["publication"], fv) for fv in wrong}
    missing = [t for t in incoming.values() if not online.exists(t)]
    if missing:
        raise RuntimeError(f"online store serves {wrong} but the current pointer names {cur['publication']} whose "
                           f"tables {missing} are gone: roll back explicitly (fmpipe rollback --to DATE)")
    by_pub: dict[str, dict[str, str]] = {}
    for fv, pub in wrong.items():
        by_pub.setdefault(pub, {})[fv] = incoming[fv]
    for pub, tables in by_pub.items():
        online.swap_in(tables, pub, cur["publication"], cur)
    return cur["publication"]


def collect_garbage(paths: Paths, online: OnlineTables, keep: int) -> dict:
    """Keep the ``keep`` most recently committed publications restorable; drop the rest and any
    leftovers of failed attempts (staging tables, uncommitted folders)."""
    recent: list[str] = []
    for rec in reversed(history(paths)):
        if rec["publication"] not in recent:
            recent.append(rec["publication"])
    retained = set(recent[:max(keep, 1)])
    cur = current(paths)
    if cur:
        retained.add(cur["publication"])
    dropped = []
    for table in online.tables(f"{online.project}__pub_"):
        if not any(table.startswith(online.snapshot_prefix(p)) for p in retained):
            online.drop(table)
            dropped.append(table)
    for table in online.tables(f"{online.project}__stage_"):
        online.drop(table)
        dropped.append(table)
    failpoint("publish.gc.online_dropped")          # old online tables dropped, old publication folders not yet
    for d in root(paths).iterdir() if root(paths).exists() else []:
        if not d.is_dir() or d.name.startswith("."):
            continue
        mf = d / "manifest.json"
        status = json.loads(mf.read_text()).get("status") if mf.exists() else None
        if status != "committed":
            shutil.rmtree(d, ignore_errors=True)
            dropped.append(str(d.name))
        elif d.name not in retained:
            m = json.loads(mf.read_text())
            if m.get("retained", True):
                for sub in d.iterdir():
                    if sub.is_dir():
                        shutil.rmtree(sub, ignore_errors=True)
                m["retained"] = False
                atomic_write_json(m, mf)
                dropped.append(str(d.name))
    return {"retained": sorted(retained), "dropped": dropped}
