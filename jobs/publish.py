"""Publish the day's validated embeddings: Feast online state + FAISS indexes, made current together.

The offline store is the embed job's Parquet of the published dates only: every pointer move
hard-links the partitions of published, not rolled-back dates into ``published/`` (the Feast
sources' folder, :mod:`jobs.core.published`), so point-in-time ``get_historical_features`` works across
every published day without a copy and never returns a day that failed the gate or was rolled back.
Online, the day's complete state is built aside and swapped in atomically with the day's indexes
(see :mod:`jobs.core.publication` for the design, rollback and failure behaviour).

``method=write`` (default) writes the day's rows in batches of ``batch_rows``: into a plain SQLite
online store as Feast's own row bytes laid out column-wise with one prepared upsert per batch
(:mod:`jobs.core.sqlite_rows`), into any other store through Feast's provider API (``online_write_batch``
with Feast ``Value`` protos encoded from Arrow); ``method=materialize`` uses Feast's stock materialization engine for the same
rows, for comparison (``bench/publish.py``). Both are read back with ``get_online_features``.
The gate's verdict must cover exactly the bytes published (:mod:`jobs.core.verdict`): data changed
after validate (a re-embed) or a missing or stale verdict is refused until validate runs again.
Re-running a date rebuilds the same state from the same base (idempotent). A date older than the
one serving is never made current by accident: re-publishing it with exactly the content it was
published with is a no-op (serving stays), anything else is refused with the ways forward
(``fmpipe backfill ... publish.force=true`` or ``fmpipe rollback``) unless ``force=true``. After a
rollback, publishing is refused until ``fmpipe rollback --release`` (or ``force=true``): see :mod:`jobs.rollback`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import pyarrow.parquet as pq

from jobs.core import publication as pubs
from jobs.core import feature_spec, staging, verdict
from jobs.core.feast_store import apply_if_changed, get_store
from jobs.core.failpoints import failpoint
from jobs.core.online_store import open_online
from jobs.core.io import partition
from jobs.core.redact import redact_text
from jobs.rollback import check_not_pinned
from jobs.core.settings import run_cli, Paths, parse_date

FEATURE_VIEWS = {"profile_embeddings": "profile_embeddings", "title_embeddings": "title_embeddings"}


@dataclass(frozen=True)
class PublishConfig:
    date: str = ""
    require_gate: bool = True          # refuse to publish a date whose validation did not pass
    method: str = "write"              # write (Feast's rows written directly, fast) | materialize (stock Feast)
    batch_rows: int = 4096             # entities per write transaction
    keep: int = 3                      # publications kept restorable (snapshot tables + indexes)
    with_index: bool = True            # build the day's indexes into the publication (else `fmpipe index` does)
    swap: str = "auto"                 # auto | atomic | in_place (SQLite: staged tables; Redis: staged database + SWAPDB)
    force: bool = False                # publish a date older than the serving one anyway (serving moves back to it)


def check_gate(paths: Paths, day) -> dict:
    """The day's verdict, if it passed and covers exactly the bytes about to be published
    (:func:`jobs.core.verdict.check`: missing, stale, failed or changed-since data are refused)."""
    return verdict.check(paths, day)


def check_columns(store, paths: Paths, day) -> None:
    """The table must carry every field the feature view declares, or online reads would be null."""
    roots = {"profile_embeddings": paths.profile_embeddings, "title_embeddings": paths.title_embeddings}
    for fv_name, root in roots.items():
        files = sorted(partition(root, day).glob("*.parquet"))
        if not files:
            raise FileNotFoundError(f"nothing to publish for {fv_name}: no Parquet under {partition(root, day)} (run embed first)")
        cols = set(pq.read_schema(files[0]).names)
        fields = {f.name for f in store.get_feature_view(fv_name).features}
        missing = fields - cols
        if missing:
            raise ValueError(f"feature view {fv_name!r} declares {sorted(missing)} but {partition(root, day)} has "
                             f"only {sorted(cols)}: update feature_repo/definitions.py to the model's layers")


def already_published(paths: Paths, day, content: str, cur: dict) -> dict:
    """An old date asked again while a later one serves: a no-op when ``day`` was already published
    from exactly ``content`` (an Airflow clear, a re-run of an unchanged day), refused otherwise."""
    same = pubs.published_with(paths, day, content)
    if same is None:
        raise pubs.order_error(day, cur)
    return {"date": day.isoformat(), "publication": same["publication"], "action": "noop",
            "reason": f"{day} is already published with this content; serving stays at {cur['date']}",
            "serving": {"date": cur["date"], "publication": cur["publication"], "seq": cur["seq"]}}


def run(cfg: PublishConfig, paths: Paths) -> dict:
    """Publish ``cfg.date`` (see the module docstring); under the publication lock from check to commit."""
    day = parse_date(cfg.date)
    gate = check_gate(paths, day) if cfg.require_gate else {}
    t0 = time.perf_counter()
    feature_spec.record(paths, day)                # the feature view's layer columns follow the day's table
    store = get_store(paths)
    applied = apply_if_changed(store, paths)
    check_columns(store, paths, day)
    online = open_online(store, cfg.swap)
    pub_id = pubs.new_id(day)
    model_version = pq.read_table(partition(paths.profile_embeddings, day), columns=["model_version"])["model_version"][0].as_py()
    content = staging.content_digest(paths, day)
    try:
        with pubs.lock(paths):
            pubs.reconcile(paths, online)
            cur = pubs.current(paths)
            check_not_pinned(paths, day, cur, cfg.force)
            if pubs.is_behind(day, cur) and not cfg.force:
                return already_published(paths, day, content, cur)
            pubs.pub_dir(paths, pub_id).mkdir(parents=True)
            pubs.write_manifest(paths, pub_id, {"publication": pub_id, "date": day.isoformat(), "status": "staging",
                                                "method": cfg.method, "model_version": model_version, "content": content,
                                                "validated_inputs": gate.get("inputs_sha256"),
                                                "forced": bool(cfg.force and pubs.is_behind(day, cur))})
            t1 = time.perf_counter()
            staged = staging.stage_day(store, paths, online, day, pub_id, cfg.method, cfg.batch_rows)
            t2 = time.perf_counter()
            index_meta, index_dir = None, None
            if cfg.with_index:
                from jobs.index import IndexConfig, build_publication_indexes
                out = pubs.pub_dir(paths, pub_id) / "index"
                index_meta = build_publication_indexes(IndexConfig(date=day.isoformat()), paths, out)
                index_dir = str(out.relative_to(paths.home))
            failpoint("publish.index_built")        # online state staged and indexes written, nothing committed
            t3 = time.perf_counter()
            m = pubs.manifest(paths, pub_id)
            m.update({k: staged[k] for k in ("base", "rows", "carried", "seeded", "timings")})
            m.update({"index": index_meta, "online_store": store.config.online_store.type, "atomic": online.atomic})
            pubs.write_manifest(paths, pub_id, m)
            record = pubs.commit(paths, online, pub_id, day, staged["staging"] if online.atomic else {}, index_dir,
                                 model_version, "publish", backwards_ok=cfg.force)
            t4 = time.perf_counter()
            gc = pubs.collect_garbage(paths, online, cfg.keep)
    finally:
        online.close()
    from jobs.tools.sql import refresh_catalogue
    catalogue = refresh_catalogue(paths)
    write_s = sum(v["write_s"] for v in staged["timings"].values())
    prof = staged["timings"]["profile_embeddings"]
    online_s = (t2 - t1) + (t4 - t3)
    return {"date": day.isoformat(), "publication": pub_id, "seq": record["seq"], "previous": record["previous"],
            "method": cfg.method, "model_version": model_version,
            "materialized_rows": {"profile": staged["rows"]["profile_embeddings"], "title": staged["rows"]["title_embeddings"]},
            "carried_rows": staged["carried"], "seeded_rows": staged["seeded"], "base": staged["base"],
            "profile_rows_per_s": round(staged["rows"]["profile_embeddings"] / max(prof["write_s"], 1e-9), 1),
            "write_s": round(write_s, 3), "online_publish_s": round(online_s, 3), "index_s": round(t3 - t2, 3),
            "publish_s": round(time.perf_counter() - t0, 2), "timings": staged["timings"], "applied": applied,
            "index": {k: {kk: v.get(kk) for kk in ("type", "vectors", "recall_at_10", "nprobe", "build_s")}
                      for k, v in (index_meta or {}).items()},
            "dropped": gc["dropped"],
            "registry": redact_text(str(store.config.registry_config)), "online_store": store.config.online_store.type,
            "atomic_swap": online.atomic, **catalogue}


def main(argv: list[str] | None = None) -> dict:
    return run_cli(PublishConfig, run, __doc__, argv)
