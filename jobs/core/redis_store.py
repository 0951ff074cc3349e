"""Atomic publication to a Redis online store: the whole state staged in a second Redis database,
then ``SWAPDB`` in one ``MULTI/EXEC`` with the publication's marker key.

Why this design: Feast's ``RedisOnlineStore`` reads fixed keys (serialized entity key + project) in
the database its connection string names, so a per-publication key prefix would need a reader-side
change. ``SWAPDB live staging`` exchanges two whole databases atomically for every connected
client, so plain Feast readers (``FeatureStore(repo_path=...)``, any process) keep reading their
database unchanged and see the old publication or the new one, never a mix. This mirrors the
SQLite design (:mod:`jobs.core.online_store`): the staging database plays the staging table, ``SWAPDB``
the rename, and after a swap the staging database holds the outgoing publication whole (one
snapshot, so rolling back to the previous publication is another ``SWAPDB``).

* *Stage* (:meth:`RedisTables.stage_view`): the staging database is emptied (only when it is empty
  or holds our marker: never a database with anybody else's keys), the day's rows are written
  through Feast's own ``online_write_batch`` (with a client on the staging database), then the
  rest of the base state is copied forward with ``COPY ... DB`` (today's rows win; rows older
  than the view's TTL are not copied, so entities dropped from a publication are gone after the
  swap, not lingering forever).
* *Commit* (:meth:`RedisTables.swap_in`): ``WATCH`` the staging marker, check it names the staged
  publication, then ``MULTI; SET marker <pointer record>; SWAPDB; EXEC``. The marker key
  (:data:`MARKER`) travels with the data, so the live database always says which publication it
  holds; :func:`committed_record` is the commit record :func:`jobs.core.publication.current` follows.
* *Re-seed* (:meth:`RedisTables.ensure_serving`, from ``reconcile`` before every pointer move): a
  live database without the current publication's marker (Redis flushed, restarted without
  persistence, or written by an older in-place publisher) gets the current publication rebuilt
  from the offline tables and swapped in.

Limits: plain Redis (and Sentinel masters) only: Redis Cluster has no ``SWAPDB`` (use
``swap=in_place``). The live database must hold only this Feast project's keys (a swap would hide
anybody else's: the publisher refuses, naming a key). Memory is twice the state (live + staging).
One ``get_online_features`` call is one pipeline of ``HMGET`` s; each command sees one whole
publication, and a pipeline that arrives in one read (small calls) too. The staging database is
``$FMPIPE_REDIS_STAGING_DB`` (default: the live database + 1).
"""
from __future__ import annotations

import datetime as dt
import json
import os
import warnings

import pyarrow as pa

from jobs.core.online_store import PublicationNames
from jobs.core.publication import FEATURE_VIEWS, _safe

MARKER_PREFIX = b"fmpipe:publication:"
SCAN_COUNT = 1000


class RedisPublicationError(RuntimeError):
    """The Redis layout does not allow an atomic publication (the message says why and what to do)."""


def marker_key(project: str) -> bytes:
    return MARKER_PREFIX + project.encode()


def connection(online_config, db: int | None = None):
    """A redis-py client for the store's connection string (Feast's own parser), on ``db``."""
    import redis
    from feast.infra.online_stores.redis import RedisOnlineStore, RedisType
    nodes, params = RedisOnlineStore._parse_connection_string(online_config.connection_string)
    params = dict(params)
    params.setdefault("socket_connect_timeout", 5)
    if db is not None:
        params["db"] = db
    if online_config.redis_type == RedisType.redis_sentinel:
        from redis.sentinel import Sentinel
        hosts = [(n["host"], int(n["port"])) for n in nodes]
        return Sentinel(hosts, **params).master_for(online_config.sentinel_master)
    if online_config.redis_type != RedisType.redis:
        raise RedisPublicationError("atomic Redis publication needs SWAPDB, which Redis Cluster lacks: "
                                    "publish with swap=in_place (not atomic)")
    return redis.Redis(host=nodes[0]["host"], port=int(nodes[0]["port"]), **params)


def live_db(online_config) -> int:
    from feast.infra.online_stores.redis import RedisOnlineStore
    return int(RedisOnlineStore._parse_connection_string(online_config.connection_string)[1].get("db", 0))


def staging_db(online_config) -> int:
    """``$FMPIPE_REDIS_STAGING_DB`` or the live database + 1; never the live one."""
    live = live_db(online_config)
    chosen = int(os.environ.get("FMPIPE_REDIS_STAGING_DB", live + 1))
    if chosen == live:
        raise RedisPublicationError(f"FMPIPE_REDIS_STAGING_DB={chosen} is the live database of the online store: "
                                    "choose another (empty) database index")
    return chosen


def committed_record(online_config, project: str) -> dict | None:
    """The pointer record stored with the live data by the last swap, or None (none yet, Redis
    flushed, or unreachable: then the files say what serves)."""
    import redis
    client = connection(online_config)
    try:
        raw = client.get(marker_key(project))
    except redis.RedisError as e:
        warnings.warn(f"Redis online store unreachable ({e}): following publications/CURRENT.json",
                      RuntimeWarning, stacklevel=2)
        return None
    finally:
        client.close()
    marker = json.loads(raw) if raw else None
    return marker.get("record") if marker and marker.get("status") == "committed" else None


class RedisTables(PublicationNames):
    """The :class:`jobs.core.online_store.OnlineTables` interface over a live and a staging Redis database.

    Table names are symbolic: ``live(fv)`` is the live database, ``staging(pub, fv)`` the staging
    database while it holds ``pub`` being staged, ``snapshot(pub, fv)`` the staging database after
    a swap left ``pub`` there whole."""

    kind = "redis"
    atomic = True

    def __init__(self, store):
        self.store, self.project = store, store.project
        cfg = store.config.online_store
        self.live_index, self.stage_index = live_db(cfg), staging_db(cfg)
        self.live_client = connection(cfg)
        self.stage_client = connection(cfg, self.stage_index)
        self.marker = marker_key(self.project)
        self._writer = None

    # -- names and state (live and snapshot names: PublicationNames)
    def staging(self, pub_id: str, fv_name: str) -> str:
        return f"{self.project}__stage_{_safe(pub_id)}__{fv_name}"

    def _marker(self, client) -> dict | None:
        raw = client.get(self.marker)
        return json.loads(raw) if raw else None

    def live_publication(self) -> dict[str, str]:
        m = self._marker(self.live_client)
        return {fv: m["publication"] for fv in FEATURE_VIEWS} if m else {}

    def _held(self) -> tuple[str, str] | None:
        """(status, publication) of what the staging database holds, from its marker."""
        m = self._marker(self.stage_client)
        return (m["status"], m["publication"]) if m else None

    def exists(self, table: str) -> bool:
        if table.startswith(f"{self.project}__"):
            return table in self.tables(f"{self.project}__")
        return bool(self.live_publication())

    def tables(self, prefix: str) -> list[str]:
        held = self._held()
        if held is None:
            return []
        name = self.snapshot if held[0] == "committed" else self.staging
        return [t for t in (name(held[1], fv) for fv in FEATURE_VIEWS) if t.startswith(prefix)]

    def can_build_on(self, table: str) -> bool:
        """Only the live database can be a base: staging empties the staging database first."""
        return table.startswith(f"{self.project}_") and not table.startswith(f"{self.project}__") and self.exists(table)

    # -- staging
    def _foreign_key(self, client) -> bytes | None:
        """A key that is neither this project's Feast key nor our marker (a swap would hide it)."""
        suffix = self.project.encode()
        for key in client.scan_iter(count=SCAN_COUNT):
            if not key.endswith(suffix):
                return key
        return None

    def _prepare(self, pub_id: str) -> None:
        held = self._held()
        if held == ("staging", pub_id):
            return
        if held is None and self.stage_client.dbsize() and self._foreign_key(self.stage_client) is not None:
            raise RedisPublicationError(
                f"Redis database {self.stage_index} (the staging database) holds keys that are not an fmpipe "
                f"publication: refusing to empty it. Point FMPIPE_REDIS_STAGING_DB at an empty database.")
        if not self.live_publication() and self.live_client.dbsize():
            key = self._foreign_key(self.live_client)
            if key is not None:
                raise RedisPublicationError(
                    f"Redis database {self.live_index} (the live online store) holds a key that is not this Feast "
                    f"project's ({key[:60]!r}): an atomic swap would hide it. Give the online store its own database.")
        self.stage_client.flushdb()
        self.stage_client.set(self.marker, json.dumps({"status": "staging", "publication": pub_id}))

    def stage_view(self, fv, pub_id: str, max_value_bytes: int = 0):
        """``fv`` itself: its rows go to the staging database through :meth:`write`."""
        self._prepare(pub_id)
        return fv

    def writer(self):
        """Feast's ``RedisOnlineStore`` with its client on the staging database."""
        if self._writer is None:
            from feast.infra.online_stores.redis import RedisOnlineStore
            self._writer = RedisOnlineStore()
            self._writer._client = self.stage_client
        return self._writer

    def write(self, store, fv, table: pa.Table, batch_rows: int) -> int:
        """The rows through Feast's ``online_write_batch`` into the staging database (unconditional:
        the staging database starts empty, and a rollback's older rows must win)."""
        from jobs.core.feast_store import online_rows
        from jobs.core.online_store import writer_config
        config, n = writer_config(store), 0
        for batch in table.to_batches(max_chunksize=batch_rows):
            if batch.num_rows:
                self.writer().online_write_batch(config, fv, online_rows(fv, batch), None)
                n += batch.num_rows
        return n

    def materialize(self, store, fv, day: dt.date, source) -> None:
        raise RedisPublicationError("method=materialize writes through Feast's provider into the live Redis "
                                    "database; use method=write for an atomic Redis publication (or swap=in_place)")

    def copy_forward(self, src: str, dst: str, cutoff: dt.datetime) -> int:
        """``COPY`` every live key of the view whose event time is after ``cutoff`` and that the
        staging database lacks (today's rows win). Returns rows (keys) carried."""
        from google.protobuf.timestamp_pb2 import Timestamp
        fv_name = src[len(self.project) + 1:]
        ts_field, limit, carried = f"_ts:{fv_name}".encode(), cutoff.timestamp(), 0
        keys = list(self.live_client.scan_iter(count=SCAN_COUNT))
        for i in range(0, len(keys), SCAN_COUNT):
            chunk = [k for k in keys[i:i + SCAN_COUNT] if k != self.marker]
            with self.live_client.pipeline(transaction=False) as pipe:
                for k in chunk:
                    pipe.hget(k, ts_field)
                stamps = pipe.execute(raise_on_error=False)
            chosen = []
            for k, raw in zip(chunk, stamps):
                if isinstance(raw, bytes):
                    ts = Timestamp.FromString(raw)
                    if ts.seconds + ts.nanos / 1e9 > limit:
                        chosen.append(k)
            with self.live_client.pipeline(transaction=False) as pipe:
                for k in chosen:
                    pipe.copy(k, k, destination_db=self.stage_index)
                carried += sum(1 for ok in pipe.execute() if ok)
        return carried

    # -- the swap
    def swap_in(self, incoming: dict[str, str], outgoing_pub: str | None, new_pub: str, record: dict) -> None:
        """``MULTI; SET marker record; SWAPDB live staging; EXEC`` after checking (under ``WATCH``) that
        the staging database holds ``incoming`` whole: the commit point of a Redis publication."""
        import redis
        want = self.tables(f"{self.project}__")
        if sorted(incoming.values()) != sorted(want):
            raise RedisPublicationError(f"the staging database holds {want}, not {sorted(incoming.values())}: "
                                        "nothing swapped (re-run the publish)")
        marker = json.dumps({"status": "committed", "publication": new_pub, "record": record}, sort_keys=True)
        with self.stage_client.pipeline(transaction=True) as pipe:
            try:
                pipe.watch(self.marker)
                held = self._marker(pipe)
                if not held or held["publication"] != new_pub:
                    raise RedisPublicationError(f"the staging database changed under the publisher ({held}): nothing swapped")
                pipe.multi()
                pipe.set(self.marker, marker)
                pipe.swapdb(self.live_index, self.stage_index)
                pipe.execute()
            except redis.WatchError:
                raise RedisPublicationError("the staging database changed during the swap: nothing swapped "
                                            "(re-run the publish)") from None

    def drop(self, table: str) -> None:
        """Empty the staging database when ``table`` is what it holds (checked by its marker)."""
        if table in self.tables(f"{self.project}__"):
            self.stage_client.flushdb()

    # -- re-seed
    def ensure_serving(self, paths, cur: dict) -> str | None:
        """Make the live database hold ``cur``'s publication: nothing when its marker says so, the
        retained snapshot swapped back when it is ``cur``'s, otherwise ``cur``'s state rebuilt from
        the offline tables (Redis flushed or restarted empty). Returns what was done, or None."""
        live = self.live_publication()
        pub = cur["publication"]
        if live and next(iter(live.values())) == pub:
            return None
        snaps = {fv: self.snapshot(pub, fv) for fv in FEATURE_VIEWS}
        if all(self.exists(t) for t in snaps.values()):
            self.swap_in(snaps, None, pub, cur)
            return "restored"
        from jobs.core.staging import stage_day
        staged = stage_day(self.store, paths, self, dt.date.fromisoformat(cur["date"]), pub, use_base=False)
        self.swap_in(staged["staging"], None, pub, cur)
        return "reseeded"

    def close(self) -> None:
        for c in (self.live_client, self.stage_client):
            c.close()
