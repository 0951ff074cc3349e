"""Benchmark: publishing embeddings to the Feast online store (SQLite) and reading them back.

Synthetic profile embeddings (written with ``fm.schema.profile_embedding_schema``: 3 layer columns
of ``--dim`` floats + model_version, i.e. the 4 fields of the ``profile_embeddings`` view) for two
days in a temporary FMPIPE_HOME; day 2 re-activates half of day 1's profiles, so its publication
carries the other half forward (the steady state). Measured, per entity (one profile = 4 fields):

* ``rows_per_s``: our path (``jobs.publish``, method=write): the day's rows written as Feast's row
  bytes (``jobs.core.sqlite_rows``) into the staging table; ``publish_rows_per_s`` adds everything else of the
  online publication (title view, copy-forward of the carried state, the swap).
* ``feast_materialize_rows_per_s``: stock ``store.materialize`` of one day (fresh store, a subset of
  the rows: it is slow); ``feast_write_to_online_store_rows_per_s``: stock
  ``store.write_to_online_store`` with a pandas frame, same subset.
* ``sqlite_raw_rows_per_s``: the same bytes (Feast's serialized keys and values, read back from
  the published table) inserted with plain ``sqlite3.executemany`` in one transaction: the floor.
* reads: ``get_online_features`` p50/p99 for 1 and 100 random entities (4 features), and the raw
  SQLite SELECT of the same rows (``sqlite_read_p99_ms_*``) as the anchor.

    .venv/bin/python bench/publish.py --quick      # 20k profiles x 3 x 64-d, < 3 min
    .venv/bin/python bench/publish.py              # 100k profiles x 3 x 64-d

Last output line: one JSON object.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse  # noqa: E402
import datetime as dt  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import sqlite3  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from bench.common import PeakRSS, emit, machine, provenance  # noqa: E402
from fm.schema import profile_embedding_schema, title_embedding_schema  # noqa: E402
from jobs.embed import published_at  # noqa: E402
from jobs.core.io import partition  # noqa: E402
from jobs.core.settings import Paths  # noqa: E402

LAYERS = ["emb_layer1_last", "emb_layer2_last", "emb_layer2_mean"]
D1, D2 = dt.date(2026, 11, 1), dt.date(2026, 11, 2)
TITLES = 2_000


def _list(v: np.ndarray) -> pa.Array:
    return pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1)), v.shape[1]).cast(pa.list_(pa.float32()))


def write_day(paths: Paths, day: dt.date, pids: np.ndarray, dim: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    stamp, n = published_at(day), len(pids)
    cols = {"profile_id": pa.array(pids, pa.int64()), "event_timestamp": pa.array([stamp] * n, pa.timestamp("us", tz="UTC")),
            "model_version": pa.array([f"bench-{day}"] * n)}
    for layer in LAYERS:
        cols[layer] = _list(rng.standard_normal((n, dim)).astype(np.float32))
    out = partition(paths.profile_embeddings, day)
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(cols, schema=profile_embedding_schema(LAYERS)), out / "part-0.parquet", row_group_size=65536)
    t = partition(paths.title_embeddings, day)
    t.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"title_id": [f"t{i}" for i in range(TITLES)], "event_timestamp": [stamp] * TITLES,
                             "model_version": [f"bench-{day}"] * TITLES, "is_new": [False] * TITLES,
                             "title_embedding": _list(rng.standard_normal((TITLES, dim)).astype(np.float32))},
                            schema=title_embedding_schema()), t / "part-0.parquet")


def pct(xs: list[float], q: float) -> float:
    return round(float(np.percentile(np.asarray(xs) * 1000, q)), 3)


def ours(home: Path, n: int, dim: int) -> dict:
    from jobs import publish
    paths = Paths(home)
    write_day(paths, D1, np.arange(n), dim, 1)
    write_day(paths, D2, np.arange(n // 2, n + n // 2), dim, 2)
    cfg = dict(require_gate=False, with_index=False)
    r1 = publish.run(publish.PublishConfig(date=D1.isoformat(), **cfg), paths)
    c0 = time.process_time()
    r2 = publish.run(publish.PublishConfig(date=D2.isoformat(), **cfg), paths)
    cpu = time.process_time() - c0
    prof = r2["timings"]["profile_embeddings"]
    return {"rows": n, "day1_rows_per_s": r1["profile_rows_per_s"], "rows_per_s": r2["profile_rows_per_s"],
            "publish_rows_per_s": round(n / r2["online_publish_s"], 1), "online_publish_s": r2["online_publish_s"],
            "copy_forward_s": prof["copy_s"], "carried_entities": r2["carried_rows"]["profile_embeddings"] // 4,
            "publish_cpu_s": round(cpu, 2), "write_s": prof["write_s"],
            "rows_per_cpu_s": round(n / max(prof["write_cpu_s"], 1e-9), 1)}


def stock(home: Path, n: int, dim: int) -> dict:
    """Stock Feast: materialize one day into a fresh store; then write_to_online_store the same rows."""
    from jobs.core.feast_store import get_store, load_definitions
    from jobs.core.online_store import materialize_rows
    paths = Paths(home)
    write_day(paths, D1, np.arange(n), dim, 1)
    store = get_store(paths)
    store.apply(load_definitions(paths))
    t0, c0 = time.perf_counter(), time.process_time()
    # the offline sources expose published dates only (jobs.core.published): Feast's own engine is
    # pointed at the unpublished day as ``publish method=materialize`` does
    materialize_rows(store, store.get_feature_view("profile_embeddings"), D1, paths.profile_embeddings)
    mat, mat_cpu = time.perf_counter() - t0, time.process_time() - c0
    df = pq.read_table(partition(paths.profile_embeddings, D1)).to_pandas()
    t0, c0 = time.perf_counter(), time.process_time()
    for s in range(0, n, 4096):
        store.write_to_online_store("profile_embeddings", df.iloc[s:s + 4096])
    w, w_cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"feast_materialize_rows_per_s": round(n / mat, 1), "feast_write_to_online_store_rows_per_s": round(n / w, 1),
            "feast_materialize_rows_per_cpu_s": round(n / mat_cpu, 1),
            "feast_write_to_online_store_rows_per_cpu_s": round(n / w_cpu, 1), "stock_rows": n}


def raw_sqlite(db: Path, scratch: Path) -> dict:
    """The same bytes as the published profile table, inserted with plain sqlite3 (no Feast, no protobuf)."""
    src = sqlite3.connect(db)
    ddl = src.execute("SELECT sql FROM sqlite_master WHERE name='fm_embeddings_profile_embeddings'").fetchone()[0]
    rows = src.execute("SELECT entity_key, feature_name, value, value_text, event_ts, created_ts "
                       "FROM fm_embeddings_profile_embeddings").fetchall()
    src.close()
    dst = sqlite3.connect(scratch / "raw.db", isolation_level=None)
    dst.execute(ddl.replace('"fm_embeddings_profile_embeddings"', '"raw"', 1))
    t0 = time.perf_counter()
    dst.execute("BEGIN")
    dst.executemany("INSERT INTO raw (entity_key, feature_name, value, value_text, event_ts, created_ts) "
                    "VALUES (?, ?, ?, ?, ?, ?)", rows)
    dst.execute("COMMIT")
    secs = time.perf_counter() - t0
    dst.close()
    entities = len({r[0] for r in rows})
    return {"sqlite_raw_rows_per_s": round(entities / secs, 1), "sqlite_raw_entities": entities}


def reads(home: Path, n: int, reps_1: int, reps_100: int) -> dict:
    from feast.infra.key_encoding_utils import serialize_entity_key
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Value
    from jobs.core.feast_store import get_store
    paths = Paths(home)
    store = get_store(paths)
    feats = [f"profile_embeddings:{f}" for f in LAYERS + ["model_version"]]
    rng = np.random.default_rng(0)
    live = range(n // 2, n + n // 2)
    store.get_online_features(features=feats, entity_rows=[{"profile_id": int(live[0])}]).to_dict()   # warm
    out, check = {}, None
    con = sqlite3.connect(paths.feast / "online.db")
    for size, reps in ((1, reps_1), (100, reps_100)):
        feast_t, raw_t = [], []
        for _ in range(reps):
            pids = [int(live[i]) for i in rng.choice(len(live), size, replace=False)]
            t0 = time.perf_counter()
            got = store.get_online_features(features=feats, entity_rows=[{"profile_id": p} for p in pids]).to_dict()
            feast_t.append(time.perf_counter() - t0)
            keys = [serialize_entity_key(EntityKey(join_keys=["profile_id"], entity_values=[Value(int64_val=p)]), 3) for p in pids]
            t0 = time.perf_counter()
            rows = con.execute(f"SELECT entity_key, feature_name, value, event_ts FROM fm_embeddings_profile_embeddings "
                               f"WHERE entity_key IN ({','.join('?' * len(keys))})", keys).fetchall()
            raw_t.append(time.perf_counter() - t0)
            check = (len(rows) == 4 * size) and all(v is not None for v in got["emb_layer2_last"])
        out.update({f"online_p50_ms_{size}": pct(feast_t, 50), f"online_p99_ms_{size}": pct(feast_t, 99),
                    f"sqlite_read_p50_ms_{size}": pct(raw_t, 50), f"sqlite_read_p99_ms_{size}": pct(raw_t, 99)})
        assert check, "online read returned missing values"
    con.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rows", type=int, default=0, help="profiles per day (default 20k quick, 100k full)")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--stock-rows", type=int, default=0, help="rows for the stock Feast paths (default rows/4, <= 20k)")
    args = ap.parse_args()
    n = args.rows or (20_000 if args.quick else 100_000)
    m = args.stock_rows or min(n // 4, 20_000)
    scratch = Path(tempfile.mkdtemp(prefix="fmpipe-bench-publish-"))
    os.environ["FMPIPE_HOME"] = str(scratch / "ours")
    t0, prov = time.perf_counter(), provenance("bench/publish.py", None)
    try:
        with PeakRSS() as rss:
            result = ours(scratch / "ours", n, args.dim)
            print(f"ours: {result}", flush=True)
            st = stock(scratch / "stock", m, args.dim)
            print(f"stock: {st}", flush=True)
            os.environ["FMPIPE_HOME"] = str(scratch / "ours")
            raw = raw_sqlite(scratch / "ours" / "feast" / "online.db", scratch)
            rd = reads(scratch / "ours", n, 300 if args.quick else 1000, 100 if args.quick else 300)
        result.update(st)
        result.update(raw)
        result.update(rd)
        result.update({"speedup_vs_materialize": round(result["rows_per_s"] / st["feast_materialize_rows_per_s"], 2),
                       "speedup_vs_write_to_online_store": round(result["rows_per_s"] / st["feast_write_to_online_store_rows_per_s"], 2),
                       "speedup_vs_materialize_cpu": round(result["rows_per_cpu_s"] / st["feast_materialize_rows_per_cpu_s"], 2),
                       "load_avg_1m_at_end": round(os.getloadavg()[0], 2),
                       "fraction_of_raw_sqlite": round(result["rows_per_s"] / raw["sqlite_raw_rows_per_s"], 3),
                       "dim": args.dim, "layers": len(LAYERS), "fields_per_entity": len(LAYERS) + 1,
                       "data": "synthetic Gaussian vectors (fm.schema.profile_embedding_schema)",
                       "quick": args.quick, "peak_rss_mb": rss.mb, "bench_s": round(time.perf_counter() - t0, 1),
                       **prov, "machine": prov["machine"], "host": machine()})
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    emit(result)


if __name__ == "__main__":
    main()
