"""Online-store backends of a publication: the SQLite live/staging/snapshot tables and their
atomic swap, and the write path (Feast ``online_write_batch``) every backend shares.

The commit protocol that drives them is :mod:`jobs.core.publication`.

Why not Feast's ``registry.enable_online_feature_view_versioning`` (read in the installed 0.67
sources): it names per-version online tables (``<view>_v<N>``), but a version is a *definition*
snapshot (cut on a schema change or by declaring ``version="vN"`` and re-applying; pinning back
raises ``FeatureViewPinConflict`` if the definition changed since), so moving "current" is an
``apply`` that rewrites the file registry in place (truncate + write: a concurrent reader can read a
torn file) and reaches readers only after their registry cache TTL (600 s by default); the flag must
also be set in every reader's ``feature_store.yaml`` (plain readers keep reading the unversioned
table), and each version table would still need the full state. A rename swap inside the online
store gives one atomic step for all views with no reader-side change.
It is specific to the SQLite online store; Redis has its own atomic design with the same interface
(:mod:`jobs.core.redis_store`: the state staged in a second database, ``SWAPDB`` as the swap, chosen by
``swap=auto``, see :func:`open_online`). For any other store (and with ``swap=in_place``)
``publish`` writes the day in place: the day's rows go straight
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
store would use the same staged design with its own swap (Postgres: the same renames in a transaction).
"""
from __future__ import annotations

import copy
import datetime as dt
import json
import sqlite3
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from jobs.embed import published_at
from jobs.core.failpoints import failpoint

LIVE_TABLE = "fmpipe_publication_live"
POINTER_TABLE = "fmpipe_publication_pointer"     # the pointer record, written in the swap transaction
CACHE_KIB = 256 * 1024          # SQLite page cache while staging (the default 2 MiB thrashes on large tables)


def use_wal(conn: sqlite3.Connection, where: object) -> None:
    """Put the online store in WAL mode (persistent in the file) with fully synchronous commits.

    Why: in the default rollback-journal mode a writer committing a large staging table or copy-
    forward takes an exclusive lock, and Feast readers (``get_online_features`` in other processes,
    5 s busy timeout) fail with "database is locked"; in WAL mode readers keep reading the last
    committed state while the publisher writes. ``synchronous=FULL`` keeps every commit (the swap is
    the commit point) fsynced to the log before it returns, as the rollback journal did."""
    mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        warnings.warn(f"SQLite online store {where} stays in journal_mode={mode} (WAL needs shared memory on a "
                      "local filesystem): Feast readers can see 'database is locked' while a publication is written",
                      RuntimeWarning, stacklevel=2)
    conn.execute("PRAGMA synchronous=FULL")


def _safe(pub_id: str) -> str:
    return pub_id.replace("-", "").replace(".", "_")


# ---------------------------------------------------------------------------------------------
# Online tables: staging, snapshots and the swap (SQLite online store)
# ---------------------------------------------------------------------------------------------
class PublicationNames:
    """The names every online backend gives a view's live table and a publication's snapshot: one
    scheme, so the commit protocol's garbage collection finds any backend's snapshots."""
    project: str

    def live(self, fv_name: str) -> str:
        return f"{self.project}_{fv_name}"

    def snapshot_prefix(self, pub_id: str) -> str:
        return f"{self.project}__pub_{_safe(pub_id)}__"

    def snapshot(self, pub_id: str, fv_name: str) -> str:
        return self.snapshot_prefix(pub_id) + fv_name


class OnlineTables(PublicationNames):
    """The live/staging/snapshot tables of the Feast online store, and the atomic swap."""

    def __init__(self, store, swap: str = "auto"):
        if swap not in ("auto", "atomic", "in_place"):
            raise ValueError(f"swap must be auto, atomic or in_place, not {swap!r}")
        self.store, self.project = store, store.project
        self.kind = getattr(store.config.online_store, "type", "")
        self.atomic = swap == "atomic" or (swap == "auto" and self.kind == "sqlite")
        if self.atomic and self.kind != "sqlite":
            raise NotImplementedError(f"atomic publication swap is implemented for the SQLite online store, not {self.kind!r}; "
                                      "use swap=in_place (not atomic) or see the jobs.core.publication docstring")
        self._conn = None

    # -- plumbing
    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            from feast.infra.online_stores.sqlite import SqliteOnlineStore
            path = SqliteOnlineStore._get_db_path(self.store.config)
            self._conn = sqlite3.connect(path, timeout=60, isolation_level=None)
            use_wal(self._conn, path)
            self._conn.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
            self._conn.execute(f"CREATE TABLE IF NOT EXISTS {LIVE_TABLE} (feature_view TEXT PRIMARY KEY, publication TEXT)")
            self._conn.execute(f"CREATE TABLE IF NOT EXISTS {POINTER_TABLE} (id INTEGER PRIMARY KEY CHECK (id = 1), record TEXT)")
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

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
            failpoint("publish.swap.uncommitted")  # tables renamed and pointer stored inside the open transaction
            c.execute("COMMIT")
        except BaseException:
            c.execute("ROLLBACK")
            raise

    def drop(self, table: str) -> None:
        if self.atomic:
            self.conn().execute(f'DROP TABLE IF EXISTS "{table}"')

    # -- what staging calls, the same for every backend (jobs.core.redis_store.RedisTables has its own)
    def can_build_on(self, table: str) -> bool:
        """Whether a retained table (live or snapshot) can be the base a new state is copied from."""
        return self.exists(table)

    def write(self, store, fv, table: pa.Table, batch_rows: int) -> int:
        return write_rows(store, fv, table, batch_rows)

    def materialize(self, store, fv, day: dt.date, source) -> None:
        materialize_rows(store, fv, day, source)


def open_online(store, swap: str = "auto"):
    """The online backend of a publication: atomic Redis (:class:`jobs.core.redis_store.RedisTables`)
    for a plain/Sentinel Redis store unless ``swap=in_place``; else :class:`OnlineTables` (SQLite
    staged swap, or in place for stores without an atomic design, Redis Cluster included)."""
    online = store.config.online_store
    if getattr(online, "type", "") == "redis" and swap in ("auto", "atomic"):
        from jobs.core.redis_store import RedisTables
        if swap == "atomic" or getattr(getattr(online, "redis_type", None), "value", "redis") != "redis_cluster":
            return RedisTables(store)
        swap = "in_place"
    return OnlineTables(store, swap)



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
        from jobs.core.feast_store import entity_key_protos
        keys = [serialize_entity_key(k, 3) for k in entity_key_protos(fv, table)]
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
    """The day's rows, ``batch_rows`` at a time (one SQLite transaction / one Redis pipeline each), in
    the table's key order. A plain SQLite store gets Feast's rows laid out column-wise and one prepared
    upsert per batch (:mod:`jobs.core.sqlite_rows`, the same bytes); any other store goes through Feast's
    ``Value`` protos and the provider's ``online_write_batch``."""
    from jobs.core import sqlite_rows
    from jobs.core.feast_store import online_rows
    provider, n = store._get_provider(), 0
    get_conn = getattr(provider.online_store, "_get_conn", None)
    direct = sqlite_rows.covers(store) and get_conn is not None
    if direct:
        conn = get_conn(store.config)                                      # Feast's own connection
        conn.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
        name, version = f"{store.project}_{fv.name}", store.config.entity_key_serialization_version
    config = writer_config(store)
    for batch in in_key_order(fv, table).to_batches(max_chunksize=batch_rows):
        if not batch.num_rows:
            continue
        if direct:
            sqlite_rows.write(conn, name, fv, batch, version)
        else:
            provider.online_write_batch(config, fv, online_rows(fv, batch), None)
        n += batch.num_rows
    return n


def materialize_rows(store, fv, day: dt.date, source) -> None:
    """Stock path: Feast's materialization engine reads the offline store and writes ``fv``'s table.

    The view's source is pointed at the embed output for this call: the offline store's own
    sources expose published dates only (:mod:`jobs.core.published`), and ``day`` is not published yet;
    ``source`` is the embed output folder of the view."""
    from feast import FileSource
    from tqdm import tqdm
    src = fv.batch_source
    fv = copy.copy(fv)
    fv.batch_source = FileSource(name=f"{src.name}_unpublished", path=str(source), timestamp_field=src.timestamp_field,
                                 created_timestamp_column=src.created_timestamp_column)
    for alias in ("data_source", "source"):            # Feast 0.67's compute engine reads these, not batch_source
        if getattr(fv, alias, None) is src:
            setattr(fv, alias, fv.batch_source)
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
