"""Benchmark: Spark tokenize job vs a single-process DuckDB anchor doing the same transform.

Generates N raw events for one day (vectorised numpy, realistic mix of actions, watches split by
pauses, a few malformed rows), then runs (1) the project's Spark job (`jobs.tokenize.run`, local[2])
and (2) the same transform in DuckDB in this process: classify/quarantine, dedupe on event_id,
merge adjacent actions into watch tokens, token fields, per-profile history arrays. Both read the
same Parquet and write Parquet; token counts are cross-checked. A second Spark run on the next day
with the first day as history shows the daily cost tracks the day's events, not total history.

    .venv/bin/python bench/tokenize.py --quick          # 250k events, < 2 min
    .venv/bin/python bench/tokenize.py                  # 1M and 10M events

Last output line: one JSON object (spark_events_per_s, anchor_events_per_s, events, peak_rss_mb, ...).
"""
from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this file's folder would come first on sys.path and shadow the stdlib
# `tokenize` module: put the repo root there instead.
sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import datetime as dt
import os
import shutil
import tempfile
import time

import duckdb  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from bench.common import PeakRSS, emit, machine  # noqa: E402
from fm import schema as S  # noqa: E402
from jobs.core.io import atomic_write_table, raw_partition  # noqa: E402
from jobs.core.settings import Paths  # noqa: E402

DAY = dt.date(2026, 11, 1)


def synth_day(n: int, day: dt.date, profiles: int, titles: int, seed: int) -> pa.Table:
    """n raw events: per profile a time-sorted stream of impressions and split watches (vectorised)."""
    rng = np.random.default_rng(seed)
    pid = np.sort(rng.integers(1, profiles + 1, n))
    title = (rng.zipf(1.3, n) % titles).astype(np.int64)
    # consecutive events of a profile often stay on one title (play/pause/play/complete)
    same = rng.random(n) < 0.6
    for _ in range(3):
        title = np.where(same & (np.r_[False, pid[1:] == pid[:-1]]), np.r_[title[:1], title[:-1]], title)
    base = int(dt.datetime.combine(day, dt.time(), tzinfo=dt.timezone.utc).timestamp())
    secs = np.sort(rng.integers(0, 86_000, n))
    order = np.lexsort((secs, pid))
    secs = secs[order]
    actions = np.array(S.ACTIONS)[rng.choice(len(S.ACTIONS), n, p=[.3, .3, .1, .12, .04, .06, .02, .06])]
    dur = np.where(np.isin(actions, ["play"]), rng.exponential(1500, n).round(1), np.nan)
    ts = (np.datetime64("1970-01-01T00:00:00") + (base + secs).astype("timedelta64[s]")).astype(str)
    ts = np.char.add(ts, "Z")
    bad = rng.choice(n, size=max(3, n // 100_000), replace=False)
    ts[bad[0::3]] = "garbage"
    actions[bad[1::3]] = "teleport"
    pids = pa.array(pid, pa.int64()).to_pylist() if n < 0 else pa.array(pid, pa.int64())
    return pa.table({
        "event_id": pa.array(np.char.add("e", np.arange(n).astype(str))),
        "profile_id": pids, "ts": pa.array(ts), "title_id": pa.array(np.char.add("t", title.astype(str))),
        "action": pa.array(actions), "duration_s": pa.array(dur, from_pandas=True),
        "device": pa.array(np.array(S.DEVICES)[rng.integers(0, len(S.DEVICES), n)]),
        "canvas": pa.array(np.array(S.CANVASES)[rng.integers(0, len(S.CANVASES), n)]),
        "row_position": pa.array(rng.geometric(0.3, n).astype(np.int32)),
        "locale": pa.array(np.array(S.LOCALES)[rng.integers(0, len(S.LOCALES), n)]),
    }, schema=S.RAW_EVENT_SCHEMA)


def catalogue(titles: int) -> pa.Table:
    return pa.table({
        "title_id": [f"t{i}" for i in range(titles)], "name": [f"T{i}" for i in range(titles)],
        "kind": ["movie"] * titles, "genres": [["drama"]] * titles,
        "release_date": [dt.date(2020, 1, 1)] * titles, "synopsis": [""] * titles,
        "runtime_s": [None if i % 10 == 0 else 3600 for i in range(titles)],
    }, schema=S.CATALOGUE_SCHEMA)


def _map_sql(col: str, values: tuple[str, ...]) -> str:
    cases = " ".join(f"WHEN '{v}' THEN {i}" for v, i in S.vocab_index(values).items())
    return f"CASE {col} {cases} ELSE {S.OOV} END"


def duckdb_anchor(paths: Paths, day: dt.date, out: Path, threads: int, memory: str = "12GB") -> dict:
    """The same transform as jobs/tokenize.py in one DuckDB process (the single-node anchor)."""
    con = duckdb.connect()
    # Spill instead of failing: the intermediate tables of 10M events do not all fit next to Spark's JVM.
    con.execute(f"SET threads={threads}; SET memory_limit='{memory}'; SET preserve_insertion_order=false; "
                f"SET temp_directory='{out}/duckdb_tmp'")
    raw = str(raw_partition(paths, day) / "*.parquet")
    cat = str(paths.catalogue)
    n_titles = pq.read_metadata(cat).num_rows
    strength = " ".join(f"WHEN '{k}' THEN {v}" for k, v in S.ACTION_STRENGTH.items())
    actions = ", ".join(f"'{a}'" for a in S.ACTIONS)
    day_end = f"TIMESTAMPTZ '{day + dt.timedelta(days=1)} 01:00:00+00'"
    con.execute(f"""
    CREATE TEMP TABLE vocab AS SELECT title_id, CAST(row_number() OVER (ORDER BY title_id) + 1 AS INT) AS title_idx,
        CAST(runtime_s AS DOUBLE) AS runtime_s FROM read_parquet('{cat}');
    CREATE VIEW classified AS
    SELECT r.*, TRY_CAST(r.ts AS TIMESTAMPTZ) AS ts_parsed, v.title_idx, v.runtime_s,
      CASE WHEN r.event_id IS NULL THEN 'missing_event_id' WHEN r.profile_id IS NULL THEN 'missing_profile_id'
           WHEN TRY_CAST(r.ts AS TIMESTAMPTZ) IS NULL THEN 'unparseable_ts'
           WHEN TRY_CAST(r.ts AS TIMESTAMPTZ) >= {day_end} THEN 'future_ts'
           WHEN r.action IS NULL OR r.action NOT IN ({actions}) THEN 'unknown_action'
           WHEN r.title_id IS NULL THEN 'missing_title_id' WHEN v.title_idx IS NULL THEN 'unknown_title'
           WHEN r.duration_s < 0 THEN 'negative_duration' END AS reason
    FROM read_parquet('{raw}') r LEFT JOIN vocab v USING (title_id);
    COPY (SELECT * EXCLUDE (ts_parsed, title_idx, runtime_s) FROM classified WHERE reason IS NOT NULL)
      TO '{out}/quarantine.parquet' (FORMAT parquet);
    CREATE VIEW valid AS SELECT * FROM classified WHERE reason IS NULL
      QUALIFY row_number() OVER (PARTITION BY event_id ORDER BY ts_parsed, profile_id, title_id, action) = 1;
    CREATE VIEW grouped AS SELECT *, sum(starts) OVER (PARTITION BY profile_id ORDER BY ts_parsed, event_id
        ROWS UNBOUNDED PRECEDING) AS grp FROM (
      SELECT *, CASE WHEN lag(title_id) OVER w IS NULL OR lag(title_id) OVER w <> title_id
        OR epoch_us(ts_parsed) - epoch_us(lag(ts_parsed) OVER w) > {S.SESSION_GAP_S} * 1000000 THEN 1 ELSE 0 END AS starts
      FROM valid WINDOW w AS (PARTITION BY profile_id ORDER BY ts_parsed, event_id));
    CREATE VIEW merged AS SELECT profile_id, grp, title_idx, any_value(runtime_s) AS runtime_s,
        arg_min(ts_parsed, (ts_parsed, event_id)) AS ts_parsed, arg_min(event_id, (ts_parsed, event_id)) AS event_id,
        arg_min(device, (ts_parsed, event_id)) AS device, arg_min(canvas, (ts_parsed, event_id)) AS canvas,
        arg_min(locale, (ts_parsed, event_id)) AS locale, arg_min(row_position, (ts_parsed, event_id)) AS row_position,
        arg_max(action, (CASE action {strength} END, action)) AS action, sum(duration_s) AS duration_s,
        count(*) AS n_events
      FROM grouped GROUP BY profile_id, grp, title_idx;
    CREATE TEMP TABLE tokens AS SELECT profile_id, event_id, ts_parsed AS ts, title_idx AS title,
      {_map_sql('action', S.ACTIONS)} AS action,
      CASE WHEN duration_s IS NULL OR duration_s <= 0 THEN {S.NO_DURATION}
           WHEN runtime_s > 0 THEN {S.NO_DURATION + 1} + least(ceil(least(duration_s / runtime_s, 1.0) * {S.DURATION_FRACTION_BUCKETS}) - 1, {S.DURATION_FRACTION_BUCKETS - 1})
           ELSE {S.NO_DURATION + 1 + S.DURATION_FRACTION_BUCKETS} + least(floor(log2(greatest(duration_s, 1.0))), {S.DURATION_LOG_BUCKETS - 1}) END AS duration,
      {_map_sql('device', S.DEVICES)} AS device, {_map_sql('canvas', S.CANVASES)} AS canvas,
      {_map_sql('locale', S.LOCALES)} AS locale,
      CASE WHEN row_position IS NULL OR row_position < 0 THEN {S.OOV} ELSE {S.N_SPECIAL} + {' + '.join(f'(row_position >= {e})::INT' for e in S.ROW_EDGES[1:])} END AS row,
      hour(ts_parsed) + {S.N_SPECIAL} AS hour, dayofweek(ts_parsed) + {S.N_SPECIAL} AS dow,
      CASE WHEN lag(ts_parsed) OVER w IS NULL THEN {S.OOV} ELSE {S.N_SPECIAL} + least(floor(log2(greatest(
        (epoch_us(ts_parsed) - epoch_us(lag(ts_parsed) OVER w)) / 1e6, 1.0))), {S.N_GAP - S.N_SPECIAL - 1}) END AS gap,
      n_events
      FROM merged WINDOW w AS (PARTITION BY profile_id ORDER BY ts_parsed, event_id);
    COPY (SELECT * FROM tokens ORDER BY profile_id, ts, event_id) TO '{out}/tokens.parquet' (FORMAT parquet);
    COPY (SELECT profile_id, count(*) AS n_tokens, list(ts ORDER BY ts, title) AS ts,
            {', '.join(f'list({f} ORDER BY ts, title) AS {f}' for f in S.TOKEN_FIELDS)}
          FROM (SELECT * FROM tokens QUALIFY row_number() OVER (PARTITION BY profile_id ORDER BY ts DESC, title DESC) <= 512)
          GROUP BY profile_id ORDER BY profile_id) TO '{out}/history.parquet' (FORMAT parquet);
    """)
    tokens = con.execute(f"SELECT count(*) FROM read_parquet('{out}/tokens.parquet')").fetchone()[0]
    quarantined = con.execute(f"SELECT count(*) FROM read_parquet('{out}/quarantine.parquet')").fetchone()[0]
    del n_titles
    return {"tokens": int(tokens), "quarantined": int(quarantined)}


def run_size(n: int, root: Path, spark, threads: int, anchor_memory: str = "12GB") -> dict:
    paths = Paths(root / f"n{n}")
    titles, profiles = 20_000, max(1000, n // 40)
    atomic_write_table(catalogue(titles), paths.catalogue)
    t = time.perf_counter()
    for i, day in enumerate((DAY, DAY + dt.timedelta(days=1))):
        atomic_write_table(synth_day(n, day, profiles, titles, seed=i), raw_partition(paths, day) / "part-0.parquet")
    gen_s = time.perf_counter() - t
    from jobs import tokenize
    with PeakRSS() as mem_spark:
        t = time.perf_counter()
        s1 = tokenize.run(tokenize.TokenizeConfig(date=DAY.isoformat()), paths, spark)
        spark_s = time.perf_counter() - t
    t = time.perf_counter()
    s2 = tokenize.run(tokenize.TokenizeConfig(date=(DAY + dt.timedelta(days=1)).isoformat()), paths, spark)
    spark_day2_s = time.perf_counter() - t
    print(f"spark {n} events: day 1 {spark_s:.1f} s, day 2 {spark_day2_s:.1f} s, {s1['tokens']} tokens", flush=True)
    out = root / f"duck{n}"
    out.mkdir()
    with PeakRSS() as mem_duck:
        t = time.perf_counter()
        try:
            d = duckdb_anchor(paths, DAY, out, threads, anchor_memory)
        except duckdb.OutOfMemoryException as e:      # report it; the Spark figures stand on their own
            d = {"tokens": None, "quarantined": None, "error": str(e).splitlines()[0]}
        duck_s = time.perf_counter() - t
    if "error" in d:
        return {"events": n, "spark_s": round(spark_s, 2), "spark_events_per_s": round(n / spark_s),
                "spark_day2_with_history_s": round(spark_day2_s, 2), "day2_over_day1": round(spark_day2_s / spark_s, 2),
                "anchor_events_per_s": None, "spark_over_anchor": None, "anchor_error": d["error"],
                "tokens_spark": s1["tokens"], "tokens_match": None, "peak_rss_mb_spark": mem_spark.mb,
                "peak_rss_mb_anchor": mem_duck.mb, "events_per_token": s1["events_per_token"]}
    return {"events": n, "generate_s": round(gen_s, 1), "spark_s": round(spark_s, 2), "anchor_s": round(duck_s, 2),
            "spark_events_per_s": round(n / spark_s), "anchor_events_per_s": round(n / duck_s),
            "spark_over_anchor": round(spark_s / duck_s, 2),
            "spark_day2_with_history_s": round(spark_day2_s, 2), "day2_over_day1": round(spark_day2_s / spark_s, 2),
            "tokens_spark": s1["tokens"], "tokens_anchor": d["tokens"], "tokens_match": s1["tokens"] == d["tokens"],
            "quarantined_spark": s1["quarantined"], "quarantined_anchor": d["quarantined"],
            "events_per_token": s1["events_per_token"], "history_profiles_day2": s2["history_profiles"],
            "peak_rss_mb_spark": mem_spark.mb, "peak_rss_mb_anchor": mem_duck.mb}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="250k events only (< 2 min)")
    ap.add_argument("--sizes", default="", help="comma-separated event counts (default 1M,10M; quick 250k)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--anchor-memory", default="12GB", help="DuckDB memory_limit (it spills to disk beyond it)")
    args = ap.parse_args()
    sizes = [int(float(x)) for x in args.sizes.split(",") if x] or ([250_000] if args.quick else [1_000_000, 10_000_000])
    from jobs.core.spark import get_spark
    root = Path(tempfile.mkdtemp(prefix="bench-tokenize-"))
    try:
        t = time.perf_counter()
        spark = get_spark("bench-tokenize")
        start_s = time.perf_counter() - t
        # A daily job's JVM pays code generation and JIT once; measure it apart from the steady state.
        t = time.perf_counter()
        run_size(20_000, root, spark, args.threads)
        warmup_s = time.perf_counter() - t
        rows = []
        for n in sizes:
            rows.append(run_size(n, root, spark, args.threads, args.anchor_memory))
            print(rows[-1], flush=True)
        spark.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    last = rows[-1]
    emit({"events": last["events"], "spark_events_per_s": last["spark_events_per_s"],
          "anchor_events_per_s": last["anchor_events_per_s"], "spark_over_anchor": last["spark_over_anchor"],
          "peak_rss_mb": last["peak_rss_mb_spark"], "anchor_peak_rss_mb": last["peak_rss_mb_anchor"],
          "day2_over_day1": last["day2_over_day1"], "tokens_match": all(r["tokens_match"] is not False for r in rows),
          "spark_session_start_s": round(start_s, 1), "spark_warmup_s": round(warmup_s, 1), "sizes": rows, "anchor": "duckdb " + duckdb.__version__,
          "spark_master": spark.sparkContext.master if False else os.environ.get("FMPIPE_SPARK_MASTER", "local[2]"),
          "machine": machine()})


if __name__ == "__main__":
    main()
