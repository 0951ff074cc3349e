"""Building a date's complete online state aside (staging tables), before the commit makes it current.

See :mod:`jobs.core.publication` for why (stage, index, commit) and the base a date builds on.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from jobs.embed import published_at
from jobs.core.failpoints import failpoint
from jobs.core.io import partition, partition_dates
from jobs.core.online_store import OnlineTables, _columns, max_value_bytes
from jobs.core.publication import FEATURE_VIEWS, history
from jobs.core.settings import Paths


def source_root(paths: Paths, fv_name: str) -> Path:
    return {"profile_embeddings": paths.profile_embeddings, "title_embeddings": paths.title_embeddings}[fv_name]



def content_digest(paths: Paths, day: dt.date, chunk: int = 1 << 20) -> str:
    """SHA-256 over the bytes of every input file of ``day``'s publication (both views' partitions).

    Recorded in the manifest, it tells an idempotent re-publish of an old date (same bytes: a no-op)
    from a changed one (refused unless forced). Bytes, not mtimes: a re-embed that writes identical
    files is still the same content. Cost: one read of the day's embeddings (~1 s per GB)."""
    h = hashlib.sha256()
    for fv_name in FEATURE_VIEWS:
        part = partition(source_root(paths, fv_name), day)
        for f in sorted(part.glob("*.parquet")):
            h.update(f"{fv_name}/{f.name}\0".encode())
            with open(f, "rb") as fh:
                while block := fh.read(chunk):
                    h.update(block)
    return h.hexdigest()


def day_table(paths: Paths, fv, day: dt.date) -> pa.Table:
    return pq.read_table(partition(source_root(paths, fv.name), day), columns=_columns(fv))


def seed_skip(paths: Paths) -> set[dt.date]:
    """Dates whose rows must never be seeded into a state: those a rollback undid (until published
    again). Why: a re-seed (no retained base, or a flushed Redis) must rebuild what was served, and
    an operator rolled those days back because they were bad."""
    from jobs.rollback import rolled_back_dates             # jobs.rollback imports this module
    return {dt.date.fromisoformat(d) for d in rolled_back_dates(paths)}


def seed_table(paths: Paths, fv, day: dt.date, exclude: pa.Array, skip: set[dt.date] = frozenset()) -> pa.Table:
    """Latest offline row per entity from the dates before ``day`` still inside the view's TTL
    (dates in ``skip`` left out)."""
    cutoff = published_at(day) - fv.ttl if fv.ttl else None
    key = fv.entity_columns[0].name
    days = partition_dates(source_root(paths, fv.name))[::-1]
    seen, parts = exclude, []
    for d in days:
        if d >= day or d in skip or (cutoff is not None and published_at(d) <= cutoff):
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
            if online.can_build_on(t):
                tables[fv_name] = t
        if len(tables) == len(FEATURE_VIEWS):
            return pub, tables
    return None, {}


def stage_day(store, paths: Paths, online: OnlineTables, day: dt.date, pub_id: str, method: str = "write",
              batch_rows: int = 4096, use_base: bool = True) -> dict:
    """Build the complete online state of ``day`` aside (staging tables); nothing is visible yet.
    ``use_base=False`` rebuilds it from the offline tables alone (a re-seed of a flushed store)."""
    base_pub, base_tables = base_publication(paths, online, day) if use_base else (None, {})
    skip = seed_skip(paths) if base_pub is None else set()
    out: dict = {"base": base_pub, "staging": {}, "rows": {}, "carried": {}, "seeded": {}, "timings": {}}
    for fv_name in FEATURE_VIEWS:
        fv = store.get_feature_view(fv_name)
        t0 = time.perf_counter()
        today = day_table(paths, fv, day)
        staged = online.stage_view(fv, pub_id, max_value_bytes(fv, today))
        key = fv.entity_columns[0].name
        seeded = 0
        if online.atomic and base_pub is None:        # no retained state to carry: rebuild it from offline
            seed = seed_table(paths, fv, day, today[key].combine_chunks(), skip)
            if seed is not None:
                seeded = online.write(store, staged, seed, batch_rows)
        t1, c1 = time.perf_counter(), time.process_time()
        if method == "materialize":
            online.materialize(store, staged, day, source_root(paths, fv_name))
        elif method == "write":
            online.write(store, staged, today, batch_rows)
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
