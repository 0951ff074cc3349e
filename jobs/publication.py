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
   ``WITHOUT ROWID``, see :meth:`OnlineTables.stage_view`; Feast reads and writes it unchanged),
   rows inserted in key order; the day's rows are written through Feast
   (``provider.online_write_batch`` with Feast ``Value`` protos, or Feast's own materialize engine
   with ``method=materialize``), then the rest of the state is copied forward in SQL from the base
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

Why not Feast's ``registry.enable_online_feature_view_versioning`` (read in the installed 0.67
sources): it names per-version online tables (``<view>_v<N>``), but a version is a *definition*
snapshot (cut on a schema change or by declaring ``version="vN"`` and re-applying; pinning back
raises ``FeatureViewPinConflict`` if the definition changed since), so moving "current" is an
``apply`` that rewrites the file registry in place (truncate + write: a concurrent reader can read a
torn file) and reaches readers only after their registry cache TTL (600 s by default); the flag must
also be set in every reader's ``feature_store.yaml`` (plain readers keep reading the unversioned
table), and each version table would still need the full state. A rename swap inside the online
store gives one atomic step for all views with no reader-side change.
It is specific to the SQLite online store; for another store (Redis, ...) ``publish`` falls back to
writing the day in place (``swap=in_place``, chosen by ``swap=auto``): the day's rows go straight
into the live keys with the same ``online_write_batch`` path (no staging, no copy forward: entities
not active today keep yesterday's values because nothing deletes them). The trade-offs: readers see
the day arrive batch by batch (a read during publish can mix days across entities, never within
one entity's row of one view); a failed publish leaves a partly written day serving until the
re-run; rollback re-writes the target date's rows on top of the live state (entities first seen
later are not removed, entities whose later value overwrote the target's are restored only if the
target date itself wrote them); and ``keep``/snapshots do not apply. Feast's Redis store normally
skips a row whose event timestamp is not newer than the stored one; the publisher is the only
writer (publication lock) and must replace what is served on a re-run of a date (same timestamps)
or a rollback (older ones), so it writes with ``skip_dedup`` (:func:`writer_config`). A production
store would use the same staged design with its own swap (Redis: per-publication key prefix/DB +
client pointer; Postgres: the same renames in a transaction).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as dt
import fcntl
import json
import os
import shutil
import sqlite3
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from jobs.embed import published_at
from jobs.failpoints import failpoint
from jobs.io import atomic_write_json, partition
from jobs.settings import Paths, parse_date

FEATURE_VIEWS = ("profile_embeddings", "title_embeddings")
LIVE_TABLE = "fmpipe_publication_live"
POINTER_TABLE = "fmpipe_publication_pointer"     # the pointer record, written in the swap transaction
CACHE_KIB = 256 * 1024          # SQLite page cache while staging (the default 2 MiB thrashes on large tables)


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
    return on_disk


def _pointer_file(paths: Paths) -> dict | None:
    p = pointer_path(paths)
    return json.loads(p.read_text()) if p.exists() else None


def committed_pointer(paths: Paths) -> dict | None:
    """The pointer record of the last swap (SQLite online store only; None elsewhere or before any)."""
    from jobs.feast_store import sqlite_online_path
    db = sqlite_online_path(paths)
    if db is None or not db.exists():
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
    f = root(paths) / "history.jsonl"
    return [json.loads(line) for line in f.read_text().splitlines() if line.strip()] if f.exists() else []


def _append_history(paths: Paths, record: dict) -> None:
    with open(root(paths) / "history.jsonl", "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


@contextlib.contextmanager
def lock(paths: Paths):
    """One publisher at a time (publish, rollback, index rebuild) per FMPIPE_HOME."""
    root(paths).mkdir(parents=True, exist_ok=True)
    with open(root(paths) / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _safe(pub_id: str) -> str:
    return pub_id.replace("-", "").replace(".", "_")


# ---------------------------------------------------------------------------------------------
# Online tables: staging, snapshots and the swap (SQLite online store)
# ---------------------------------------------------------------------------------------------
class OnlineTables:
    """The live/staging/snapshot tables of the Feast online store, and the atomic swap."""

    def __init__(self, store, swap: str = "auto"):
        if swap not in ("auto", "atomic", "in_place"):
            raise ValueError(f"swap must be auto, atomic or in_place, not {swap!r}")
        self.store, self.project = store, store.project
        self.kind = getattr(store.config.online_store, "type", "")
        self.atomic = swap == "atomic" or (swap == "auto" and self.kind == "sqlite")
        if self.atomic and self.kind != "sqlite":
            raise NotImplementedError(f"atomic publication swap is implemented for the SQLite online store, not {self.kind!r}; "
                                      "use swap=in_place (not atomic) or see the jobs.publication docstring")
        self._conn = None

    # -- plumbing
    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            from feast.infra.online_stores.sqlite import SqliteOnlineStore
            path = SqliteOnlineStore._get_db_path(self.store.config)
            self._conn = sqlite3.connect(path, timeout=60, isolation_level=None)
            self._conn.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
            self._conn.execute(f"CREATE TABLE IF NOT EXISTS {LIVE_TABLE} (feature_view TEXT PRIMARY KEY, publication TEXT)")
            self._conn.execute(f"CREATE TABLE IF NOT EXISTS {POINTER_TABLE} (id INTEGER PRIMARY KEY CHECK (id = 1), record TEXT)")
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def live(self, fv_name: str) -> str:
        return f"{self.project}_{fv_name}"

    def snapshot(self, pub_id: str, fv_name: str) -> str:
        return f"{self.project}__pub_{_safe(pub_id)}__{fv_name}"

    def _stage_view_name(self, pub_id: str, fv_name: str) -> str:
        return f"_stage_{_safe(pub_id)}__{fv_name}"

    def staging(self, pub_id: str, fv_name: str) -> str:
        return f"{self.project}_{self._stage_view_name(pub_id, fv_name)}"

    def exists(self, table: str) -> bool:
        if not self.atomic:
            return False
        return self.conn().execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (table,)).fetchone() is not None

    def tables(self, prefix: str) -> list[str]:
        if not self.atomic:
            return []
        names = self.conn().execute("SELECT name FROM sqlite_master WHERE type='table'").fetchall()
        return [r[0] for r in names if r[0].startswith(prefix)]

    def live_publication(self) -> dict[str, str]:
        if not self.atomic:
            return {}
        return dict(self.conn().execute(f"SELECT feature_view, publication FROM {LIVE_TABLE}").fetchall())

    # -- staging
    def stage_view(self, fv, pub_id: str, max_value_bytes: int = 0):
        """A copy of feature view ``fv`` whose online table is a fresh, empty staging table.

        Feast's DDL (columns, primary key). When a record fits in a B-tree cell without overflow
        (values up to ~900 bytes on 4 KiB pages, e.g. 64-d float vectors) the table is stored
        clustered on the key (``WITHOUT ROWID``: one B-tree instead of table + key index, ~1.6x
        faster inserts); larger values (256-d vectors) keep the rowid layout, where they do not
        spill into overflow pages.
        """
        if not self.atomic:
            return fv
        live = self.live(fv.name)
        row = self.conn().execute("SELECT sql FROM sqlite_master WHERE type='table' AND name=?", (live,)).fetchone()
        if row is None:
            raise RuntimeError(f"online table {live} missing: run feast apply (publish does) first")
        staged = copy.copy(fv)
        staged.name = self._stage_view_name(pub_id, fv.name)
        table = self.staging(pub_id, fv.name)
        c = self.conn()
        c.execute(f'DROP TABLE IF EXISTS "{table}"')
        ddl = row[0].replace(f'"{live}"', f'"{table}"', 1).rstrip()
        page = c.execute("PRAGMA page_size").fetchone()[0]
        max_local = (page - 12) * 64 // 255 - 23            # largest cell payload kept on an index-tree page
        clustered = max_value_bytes + 96 <= max_local
        if ddl.upper().endswith("WITHOUT ROWID") and not clustered:
            ddl = ddl[: -len("WITHOUT ROWID")].rstrip()
        elif clustered and "PRIMARY KEY" in ddl.upper() and not ddl.upper().endswith("WITHOUT ROWID"):
            ddl += " WITHOUT ROWID"
        c.execute(ddl)
        return staged

    def copy_forward(self, src: str, dst: str, cutoff: dt.datetime) -> int:
        """Rows of ``src`` newer than ``cutoff`` whose (entity, feature) ``dst`` lacks: the carried state."""
        from feast.infra.online_stores.sqlite import adapt_datetime_epoch
        c = self.conn()
        before = c.total_changes
        c.execute("BEGIN")
        try:
            c.execute(f'INSERT OR IGNORE INTO "{dst}" SELECT * FROM "{src}" WHERE event_ts > ?',
                      (adapt_datetime_epoch(cutoff.astimezone(dt.timezone.utc).replace(tzinfo=None)),))
            c.execute("COMMIT")
        except BaseException:
            c.execute("ROLLBACK")
            raise
        return c.total_changes - before

    # -- the swap
    def swap_in(self, incoming: dict[str, str], outgoing_pub: str | None, new_pub: str, record: dict) -> None:
        """One transaction: for each view, live -> snapshot(outgoing), ``incoming[view]`` -> live, and
        the pointer ``record`` stored (this transaction is the commit point of a publication)."""
        if not self.atomic:
            return
        c = self.conn()
        c.execute("BEGIN IMMEDIATE")
        try:
            for fv_name, table in incoming.items():
                live = self.live(fv_name)
                if self.exists(live):
                    if outgoing_pub:
                        keep_as = self.snapshot(outgoing_pub, fv_name)
                        c.execute(f'DROP TABLE IF EXISTS "{keep_as}"')
                        c.execute(f'ALTER TABLE "{live}" RENAME TO "{keep_as}"')
                    else:
                        c.execute(f'DROP TABLE "{live}"')
                c.execute(f'ALTER TABLE "{table}" RENAME TO "{live}"')
                c.execute(f"INSERT OR REPLACE INTO {LIVE_TABLE} VALUES (?, ?)", (fv_name, new_pub))
            c.execute(f"INSERT OR REPLACE INTO {POINTER_TABLE} VALUES (1, ?)", (json.dumps(record, sort_keys=True),))
            c.execute("COMMIT")
        except BaseException:
            c.execute("ROLLBACK")
            raise

    def drop(self, table: str) -> None:
        if self.atomic:
            self.conn().execute(f'DROP TABLE IF EXISTS "{table}"')


# ---------------------------------------------------------------------------------------------
# Building a date's online state
# ---------------------------------------------------------------------------------------------
def source_root(paths: Paths, fv_name: str) -> Path:
    return {"profile_embeddings": paths.profile_embeddings, "title_embeddings": paths.title_embeddings}[fv_name]


def in_key_order(fv, table: pa.Table) -> pa.Table:
    """Rows sorted by Feast's serialized entity key, the online table's primary-key order: inserts
    then append to the B-tree instead of landing on random pages (~1.5x faster writes at 100k rows)."""
    key = fv.entity_columns[0].name
    if len(fv.entity_columns) == 1 and table.schema.field(key).type == pa.int64():
        # serialize_entity_key ends with the value as little-endian int64 after a constant prefix
        b = table[key].to_numpy().astype("<i8").view(np.uint8).reshape(-1, 8)
        order = np.lexsort(tuple(b[:, i] for i in range(7, -1, -1)))
    else:
        from feast.infra.key_encoding_utils import serialize_entity_key
        from jobs.feast_store import online_rows
        keys = [serialize_entity_key(r[0], 3) for r in online_rows(fv, table)]
        order = np.array(sorted(range(len(keys)), key=keys.__getitem__), dtype=np.int64)
    return table.take(pa.array(order))


def writer_config(store):
    """The RepoConfig the publisher writes with: the store's own, except that an online store which
    drops rows not newer than the stored ones (Redis, ``skip_dedup: false``) writes unconditionally.

    Why: a publication of date D must become what is served, also when D is re-run (the same event
    timestamps) or rolled back to (older ones); the publisher is the only writer (publication lock),
    so there is no newer concurrent write to protect. The SQLite store always overwrites."""
    online = store.config.online_store
    if getattr(online, "skip_dedup", True):
        return store.config
    cfg = copy.copy(store.config)
    cfg._online_store = online.model_copy(update={"skip_dedup": True})
    return cfg


def write_rows(store, fv, table: pa.Table, batch_rows: int) -> int:
    """The day's rows through Feast: Feast ``Value`` protos -> the provider's ``online_write_batch``,
    ``batch_rows`` at a time (one SQLite transaction / one Redis pipeline each), in the table's key order."""
    from jobs.feast_store import online_rows
    provider, n = store._get_provider(), 0
    conn = getattr(provider.online_store, "_get_conn", None)
    if getattr(store.config.online_store, "type", "") == "sqlite" and conn is not None:
        conn(store.config).execute(f"PRAGMA cache_size=-{CACHE_KIB}")      # Feast's own connection
    config = writer_config(store)
    for batch in in_key_order(fv, table).to_batches(max_chunksize=batch_rows):
        if batch.num_rows:
            provider.online_write_batch(config, fv, online_rows(fv, batch), None)
            n += batch.num_rows
    return n


def materialize_rows(store, fv, day: dt.date) -> None:
    """Stock path: Feast's materialization engine reads the offline store and writes ``fv``'s table."""
    from tqdm import tqdm
    stamp = published_at(day)
    store._get_provider().materialize_single_feature_view(
        config=store.config, feature_view=fv, start_date=stamp - dt.timedelta(hours=1), end_date=stamp,
        registry=store.registry, project=store.project, tqdm_builder=lambda n: tqdm(total=n, disable=True))


def _columns(fv) -> list[str]:
    return [c.name for c in fv.entity_columns] + [fv.batch_source.timestamp_field] + [f.name for f in fv.features]


def max_value_bytes(fv, table: pa.Table) -> int:
    """Largest serialized feature value of the table (vectors dominate: 4 bytes a float)."""
    widest = 16
    for f in fv.features:
        col = table[f.name]
        if pa.types.is_list(col.type) or pa.types.is_large_list(col.type) or pa.types.is_fixed_size_list(col.type):
            longest = pc.max(pc.list_value_length(col)).as_py() or 0
            widest = max(widest, 4 * longest + 8)
        elif pa.types.is_string(col.type):
            longest = pc.max(pc.utf8_length(col)).as_py() or 0
            widest = max(widest, longest + 8)
    return widest


def day_table(paths: Paths, fv, day: dt.date) -> pa.Table:
    return pq.read_table(partition(source_root(paths, fv.name), day), columns=_columns(fv))


def seed_table(paths: Paths, fv, day: dt.date, exclude: pa.Array) -> pa.Table:
    """Latest offline row per entity from the dates before ``day`` still inside the view's TTL."""
    cutoff = published_at(day) - fv.ttl if fv.ttl else None
    key = fv.entity_columns[0].name
    days = sorted((dt.date.fromisoformat(p.name[3:]) for p in source_root(paths, fv.name).glob("dt=*") if p.is_dir()),
                  reverse=True)
    seen, parts = exclude, []
    for d in days:
        if d >= day or (cutoff is not None and published_at(d) <= cutoff):
            continue
        t = pq.read_table(partition(source_root(paths, fv.name), d), columns=_columns(fv))
        t = t.filter(pc.invert(pc.is_in(t[key], value_set=seen)))
        if t.num_rows:
            parts.append(t)
            seen = pa.concat_arrays([seen, t[key].combine_chunks()])
    return pa.concat_tables(parts) if parts else None


def base_publication(paths: Paths, online: OnlineTables, day: dt.date) -> tuple[str | None, dict[str, str]]:
    """The most recently committed publication of an earlier date whose state is still retained,
    and the table holding each view's state (live or snapshot)."""
    live = online.live_publication()
    for rec in reversed(history(paths)):
        if dt.date.fromisoformat(rec["date"]) >= day:
            continue
        pub = rec["publication"]
        tables = {}
        for fv_name in FEATURE_VIEWS:
            t = online.live(fv_name) if live.get(fv_name) == pub else online.snapshot(pub, fv_name)
            if online.exists(t):
                tables[fv_name] = t
        if len(tables) == len(FEATURE_VIEWS):
            return pub, tables
    return None, {}


def stage_day(store, paths: Paths, online: OnlineTables, day: dt.date, pub_id: str, method: str = "write",
              batch_rows: int = 4096) -> dict:
    """Build the complete online state of ``day`` aside (staging tables); nothing is visible yet."""
    base_pub, base_tables = base_publication(paths, online, day)
    out: dict = {"base": base_pub, "staging": {}, "rows": {}, "carried": {}, "seeded": {}, "timings": {}}
    for fv_name in FEATURE_VIEWS:
        fv = store.get_feature_view(fv_name)
        t0 = time.perf_counter()
        today = day_table(paths, fv, day)
        staged = online.stage_view(fv, pub_id, max_value_bytes(fv, today))
        key = fv.entity_columns[0].name
        seeded = 0
        if online.atomic and base_pub is None:        # no retained state to carry: rebuild it from offline
            seed = seed_table(paths, fv, day, today[key].combine_chunks())
            if seed is not None:
                seeded = write_rows(store, staged, seed, batch_rows)
        t1, c1 = time.perf_counter(), time.process_time()
        if method == "materialize":
            materialize_rows(store, staged, day)
        elif method == "write":
            write_rows(store, staged, today, batch_rows)
        else:
            raise ValueError(f"method must be 'write' or 'materialize', not {method!r}")
        t2, c2 = time.perf_counter(), time.process_time()
        carried = 0
        if online.atomic and base_pub is not None:
            cutoff = published_at(day) - fv.ttl if fv.ttl else dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
            carried = online.copy_forward(base_tables[fv_name], online.staging(pub_id, fv_name), cutoff)
        t3 = time.perf_counter()
        out["staging"][fv_name] = online.staging(pub_id, fv_name) if online.atomic else online.live(fv_name)
        out["rows"][fv_name] = today.num_rows
        out["seeded"][fv_name] = seeded
        out["carried"][fv_name] = carried
        out["timings"][fv_name] = {"seed_s": round(t1 - t0, 3), "write_s": round(t2 - t1, 3), "write_cpu_s": round(c2 - c1, 3), "copy_s": round(t3 - t2, 3)}
        failpoint("publish.staged_view")            # one view staged, the next not yet: a kill -9 lands mid-publish
    return out


# ---------------------------------------------------------------------------------------------
# Commit, reconcile, garbage collection
# ---------------------------------------------------------------------------------------------
def commit(paths: Paths, online: OnlineTables, pub_id: str, day: dt.date, incoming: dict[str, str],
           index_dir: str | None, model_version: str | None, action: str) -> dict:
    """Make ``pub_id`` current: swap its tables in together with the pointer record (one SQLite
    transaction, the commit point), then mirror the record to ``CURRENT.json`` and the history."""
    cur = current(paths)
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
    """Mirror a committed pointer ``record`` to the files: manifest status, CURRENT.json, history."""
    m = manifest(paths, record["publication"])
    if m.get("status") != "committed" or not m.get("retained", True):
        m.update({"status": "committed", "retained": True})
        write_manifest(paths, record["publication"], m)
    if _pointer_file(paths) != record:
        atomic_write_json(record, pointer_path(paths))
    if record.get("seq") not in {r.get("seq") for r in history(paths)}:
        _append_history(paths, record)


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
    settle(paths, cur)
    if online is None or not online.atomic:
        return repaired
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
        if not any(table.startswith(f"{online.project}__pub_{_safe(p)}__") for p in retained):
            online.drop(table)
            dropped.append(table)
    for table in online.tables(f"{online.project}__stage_"):
        online.drop(table)
        dropped.append(table)
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


# ---------------------------------------------------------------------------------------------
# Rollback
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RollbackConfig:
    to: str = ""
    keep: int = 3
    batch_rows: int = 4096


def rollback(cfg: RollbackConfig, paths: Paths) -> dict:
    """Make the latest committed publication of ``cfg.to`` current again (features and index)."""
    from jobs.feast_store import get_store
    day = parse_date(cfg.to)
    candidates = [r for r in reversed(history(paths)) if r["date"] == day.isoformat()]
    if not candidates:
        dates = sorted({r["date"] for r in history(paths)})
        raise ValueError(f"no publication of {day} to roll back to; published dates: {dates}")
    t0 = time.perf_counter()
    store = get_store(paths)
    online = OnlineTables(store)
    try:
        with lock(paths):
            reconcile(paths, online)
            target = candidates[0]
            pub_id, index_dir = target["publication"], target.get("index_dir")
            cur = current(paths)
            if cur and cur["publication"] == pub_id:
                return {"rolled_back_to": pub_id, "date": day.isoformat(), "action": "noop (already current)"}
            snaps = {fv: online.snapshot(pub_id, fv) for fv in FEATURE_VIEWS}
            restorable = (online.atomic and all(online.exists(t) for t in snaps.values())
                          and index_dir and (paths.home / index_dir).exists())
            if restorable:
                action, incoming, model_version = "rollback", snaps, target.get("model_version")
            else:                                     # rebuild the date's state as a new publication
                from jobs.index import IndexConfig, build_publication_indexes
                old = pub_id
                pub_id = new_id(day)
                pub_dir(paths, pub_id).mkdir(parents=True)
                write_manifest(paths, pub_id, {"publication": pub_id, "date": day.isoformat(), "status": "staging",
                                               "rebuilt_from": old})
                staged = stage_day(store, paths, online, day, pub_id, "write", cfg.batch_rows)
                meta = build_publication_indexes(IndexConfig(date=day.isoformat()), paths, pub_dir(paths, pub_id) / "index")
                index_dir = str((pub_dir(paths, pub_id) / "index").relative_to(paths.home))
                m = manifest(paths, pub_id)
                m.update({k: staged[k] for k in ("base", "rows", "carried", "seeded")}, index=meta)
                write_manifest(paths, pub_id, m)
                action, incoming, model_version = "rollback_rebuild", staged["staging"], meta["titles"]["model_version"]
            record = commit(paths, online, pub_id, day, incoming if online.atomic else {}, index_dir, model_version, action)
            gc = collect_garbage(paths, online, cfg.keep)
    finally:
        online.close()
    return {"rolled_back_to": pub_id, "date": day.isoformat(), "action": action, "seq": record["seq"],
            "previous": record["previous"], "index_dir": index_dir, "rollback_s": round(time.perf_counter() - t0, 3),
            "dropped": gc["dropped"]}


def main(argv: list[str] | None = None) -> dict:
    """``fmpipe rollback --to DATE`` (or ``to=DATE``); ``--list`` shows the publication history."""
    ap = argparse.ArgumentParser(description="Make a previous publication (features + indexes) current again.")
    ap.add_argument("--to", default="")
    ap.add_argument("--keep", type=int, default=RollbackConfig.keep)
    ap.add_argument("--list", action="store_true", help="print the publication history and the current pointer")
    ap.add_argument("overrides", nargs="*", help="to=DATE keep=N")
    args = ap.parse_args(argv)
    opts = dict(o.split("=", 1) for o in args.overrides if "=" in o)
    unknown = set(opts) - {"to", "keep"}
    if unknown:
        raise SystemExit(f"unknown option(s) {sorted(unknown)}; valid: ['keep', 'to']")
    paths = Paths.from_env()
    if args.list:
        out = {"current": current(paths), "history": history(paths)}
    else:
        to = opts.get("to") or args.to
        if not to:
            raise SystemExit("usage: fmpipe rollback --to YYYY-MM-DD")
        out = rollback(RollbackConfig(to=to, keep=int(opts.get("keep", args.keep))), paths)
    print(json.dumps(out, indent=2, default=str))
    return out
