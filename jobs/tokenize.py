"""Tokenize one day of raw events into event tokens and merge them into the per-profile history.

Input: ``raw/dt=D`` (Parquet, :data:`fm.schema.RAW_EVENT_SCHEMA`) and the title catalogue.
Outputs (each written aside, then swapped into place, so a re-run of D is idempotent and a failed
run leaves the previous state untouched):

* ``vocab/titles.parquet`` — append-only title vocabulary (new titles get new ids; ids never change),
* ``tokens/dt=D`` — one row per valid event, every field an integer id (:data:`TOKEN_SCHEMA`),
* ``quarantine/dt=D`` — malformed rows with a ``reason`` column,
* ``history/dt=D`` — the last N tokens of every profile after day D (:data:`HISTORY_SCHEMA`), files sorted
  by (``last_dt``, ``profile_id``) in bounded row groups (:data:`HISTORY_SORT`), so a reader of one day's
  active profiles skips the other days' row groups.

The daily path reads only day D plus the previous history state (cost linear in the day, not in
all history); ``full=True`` rebuilds tokens and history from every raw partition up to D. States
chain strictly day by day: an incremental run of D needs the state of D-1 and fails naming the
missing day otherwise (:func:`previous_state`), instead of building on an older state.

This file is also the ``spark-submit`` application of the DAG's ``submit`` mode (see
:func:`submit_main`): ``spark-submit --master URL jobs/tokenize.py --date D [--home DIR]
[--overrides JSON]`` runs the same step as the local task (same lock, same step record) on the
master spark-submit was given.
"""
from __future__ import annotations

if __name__ == "__main__":
    # Run as a file (spark-submit): Python put jobs/ first on sys.path, where this very file would
    # shadow the standard library's ``tokenize``. Import the package from the repo root instead and
    # run its copy of this module.
    import sys
    from pathlib import Path as _Path
    _jobs = _Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if _Path(p or ".").resolve() != _jobs]
    sys.path.insert(0, str(_jobs.parent))
    from jobs.tokenize import submit_main
    raise SystemExit(submit_main())

import datetime as dt
import itertools
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T
from pyspark.sql.window import Window

from fm import schema as S
from jobs.core.failpoints import failpoint
from jobs.core.history import gc_history, merge_history, previous_state
from jobs.core.io import atomic_write_table, latest_partition_before, partition, partition_dates
from jobs.core.settings import Paths, parse_date, run_cli
from jobs.core.spark import get_spark, write_days, write_partition
from jobs.core.vocab import read_vocab

FUTURE_TOLERANCE = dt.timedelta(hours=1)   # clock skew we accept past the end of the partition day


@dataclass(frozen=True)
class TokenizeConfig:
    """One day (or, with ``full``, every day up to ``date``) of raw events -> tokens + history."""
    date: str = ""
    history_len: int = 512
    full: bool = False
    merge_actions: bool = True           # adjacent actions on one title in one session -> one token
    session_gap_s: int = S.SESSION_GAP_S


# Events of a profile in the order they happened: time, ties by arrival (source row), then id.
ARRIVAL_ORDER = ("ts_parsed", "seq", "event_id")


# ------------------------------------------------------------------------------------------------
# Input checks
# ------------------------------------------------------------------------------------------------
_ACCEPTED_TYPES: dict[str, tuple[type, ...]] = {
    "event_id": (T.StringType,), "profile_id": (T.LongType, T.IntegerType, T.ShortType),
    "ts": (T.StringType, T.TimestampType, T.TimestampNTZType), "title_id": (T.StringType,),
    "action": (T.StringType,), "duration_s": (T.DoubleType, T.FloatType, T.LongType, T.IntegerType),
    "device": (T.StringType,), "canvas": (T.StringType,), "row_position": (T.IntegerType, T.LongType, T.ShortType),
    "locale": (T.StringType,), "seq": (T.LongType, T.IntegerType),
}
_OPTIONAL = ("seq",)     # raw partitions written before the column existed: ties fall back to event_id


def read_raw(spark: SparkSession, paths: Paths, days: list[dt.date]) -> DataFrame:
    """Read raw partitions in one scan, failing with the path when one is missing and the column when mistyped."""
    for day in days:
        path = partition(paths.raw, day)
        if not path.is_dir() or not any(path.glob("*.parquet")):
            raise FileNotFoundError(f"raw partition missing for {day}: {path} (no Parquet files)")
    where = partition(paths.raw, days[0]) if len(days) == 1 else paths.raw
    df = (spark.read.option("basePath", str(paths.raw))
          .parquet(*[str(partition(paths.raw, d)) for d in days]))
    for name in _OPTIONAL:
        if name not in df.columns:
            df = df.withColumn(name, F.lit(None).cast("long"))
    check_raw_columns(df, where)
    return df.withColumn("seq", F.col("seq").cast("long")).select(*[F.col(f.name) for f in S.RAW_EVENT_SCHEMA], F.col("dt").cast("date").alias("dt"))


def check_raw_columns(df: DataFrame, where: Path) -> None:
    fields = {f.name: f.dataType for f in df.schema.fields}
    for name, accepted in _ACCEPTED_TYPES.items():
        if name not in fields:
            raise ValueError(f"{where}: missing column {name!r} (expected {accepted[0]().simpleString()})")
        if not isinstance(fields[name], accepted):
            raise TypeError(f"{where}: column {name!r} has type {fields[name].simpleString()}, "
                            f"expected one of {[a().simpleString() for a in accepted]}")


# ------------------------------------------------------------------------------------------------
# Title vocabulary (small: maintained on the driver with pyarrow)
# ------------------------------------------------------------------------------------------------
def grow_vocab(paths: Paths, day: dt.date) -> tuple[pa.Table, int]:
    """Append catalogue titles released by ``day`` that have no id yet; existing ids never change."""
    vocab = read_vocab(paths)
    cat = pq.read_table(paths.catalogue, columns=["title_id", "release_date"])
    # unknown release date (imported catalogues): available from the start
    released = cat.filter(pc.or_kleene(pc.is_null(cat["release_date"]),
                                       pc.less_equal(cat["release_date"], pa.scalar(day, pa.date32()))))
    new = released.filter(pc.invert(pc.is_in(released["title_id"], vocab["title_id"])))
    new = new.sort_by([("release_date", "ascending"), ("title_id", "ascending")])
    if new.num_rows == 0:
        return vocab, 0
    start = (pc.max(vocab["idx"]).as_py() + 1) if vocab.num_rows else S.N_SPECIAL
    added = pa.table({
        "title_id": new["title_id"], "idx": pa.array(range(start, start + new.num_rows), pa.int32()),
        "first_dt": pa.array([day] * new.num_rows, pa.date32()),
    }, schema=S.TITLE_VOCAB_SCHEMA)
    vocab = pa.concat_tables([vocab, added])
    atomic_write_table(vocab, paths.title_vocab)
    return vocab, new.num_rows


def title_lookup(spark: SparkSession, paths: Paths, vocab: pa.Table) -> DataFrame:
    cat = pq.read_table(paths.catalogue, columns=["title_id", "runtime_s"])
    joined = vocab.select(["title_id", "idx"]).join(cat, "title_id", join_type="left outer")
    return F.broadcast(spark.createDataFrame(joined.to_pandas()).select(
        "title_id", F.col("idx").cast("int").alias("title_idx"), F.col("runtime_s").cast("double")))


# ------------------------------------------------------------------------------------------------
# Column expressions (mirror the reference functions in fm.schema; tests compare them)
# ------------------------------------------------------------------------------------------------
def _lookup(col: str, values: tuple[str, ...]) -> Column:
    mapping = F.create_map(*itertools.chain.from_iterable((F.lit(k), F.lit(v)) for k, v in S.vocab_index(values).items()))
    return F.coalesce(mapping[F.col(col)], F.lit(S.OOV)).cast("int")


def duration_bucket_col(dur: Column, runtime: Column) -> Column:
    frac_b = F.least(F.ceil(F.least(dur / runtime, F.lit(1.0)) * S.DURATION_FRACTION_BUCKETS) - 1,
                     F.lit(S.DURATION_FRACTION_BUCKETS - 1))
    log_b = F.least(F.floor(F.log2(F.greatest(dur, F.lit(1.0)))), F.lit(S.DURATION_LOG_BUCKETS - 1))
    return (F.when(dur.isNull() | (dur <= 0), F.lit(S.NO_DURATION))
            .when(runtime > 0, S.NO_DURATION + 1 + frac_b)
            .otherwise(S.NO_DURATION + 1 + S.DURATION_FRACTION_BUCKETS + log_b)).cast("int")


def gap_bucket_col(gap_s: Column) -> Column:
    b = F.least(F.floor(F.log2(F.greatest(gap_s, F.lit(1.0)))), F.lit(S.N_GAP - S.N_SPECIAL - 1))
    return F.when(gap_s.isNull(), F.lit(S.OOV)).otherwise(S.N_SPECIAL + b).cast("int")


def row_bucket_col(row: Column) -> Column:
    b = sum((F.when(row >= e, 1).otherwise(0) for e in S.ROW_EDGES[1:]), F.lit(0))
    return F.when(row.isNull() | (row < 0), F.lit(S.OOV)).otherwise(S.N_SPECIAL + b).cast("int")


def _parsed_ts(df: DataFrame) -> Column:
    if isinstance(df.schema["ts"].dataType, T.StringType):
        return F.try_to_timestamp(F.col("ts"))
    return F.col("ts").cast("timestamp")


def classify(df: DataFrame, lookup: DataFrame) -> DataFrame:
    """Attach ``ts_parsed``, title ids and a ``reason`` (null for a valid row) to raw events."""
    day_end = F.date_add(F.col("dt"), 1).cast("timestamp") + F.expr(f"INTERVAL {int(FUTURE_TOLERANCE.total_seconds())} SECONDS")
    df = df.withColumn("ts_parsed", _parsed_ts(df)).join(lookup, "title_id", how="left")
    reason = (
        F.when(F.col("event_id").isNull(), "missing_event_id")
        .when(F.col("profile_id").isNull(), "missing_profile_id")
        .when(F.col("ts_parsed").isNull(), "unparseable_ts")
        .when(F.col("ts_parsed") >= day_end, "future_ts")
        .when(~F.col("action").isin(*S.ACTIONS) | F.col("action").isNull(), "unknown_action")
        .when(F.col("title_id").isNull(), "missing_title_id")
        .when(F.col("title_idx").isNull(), "unknown_title")
        .when(F.col("duration_s") < 0, "negative_duration")
    )
    return df.withColumn("reason", reason)


def dedupe(valid: DataFrame) -> DataFrame:
    """Keep one row per event_id (the earliest; ties broken by the row's content, deterministically)."""
    w = Window.partitionBy("event_id").orderBy("ts_parsed", "seq", "profile_id", "title_id", "action")
    return valid.withColumn("_rn", F.row_number().over(w)).filter(F.col("_rn") == 1).drop("_rn")


def merge_adjacent(events: DataFrame, session_gap_s: int) -> DataFrame:
    """Merge consecutive events of one profile on one title within one session into one token.

    play -> pause -> play -> complete becomes a single event with the summed duration, the strongest
    action (:data:`fm.schema.ACTION_STRENGTH`), the first event's id, time and context, and
    ``n_events`` = how many raw events it stands for.
    """
    w = Window.partitionBy("profile_id").orderBy(*ARRIVAL_ORDER)
    gap = F.unix_micros(F.col("ts_parsed")) - F.unix_micros(F.lag("ts_parsed").over(w))
    starts = (F.lag("title_id").over(w).isNull() | (F.lag("title_id").over(w) != F.col("title_id"))
              | (gap > session_gap_s * 1_000_000))
    strength = F.create_map(*itertools.chain.from_iterable((F.lit(k), F.lit(v)) for k, v in S.ACTION_STRENGTH.items()))
    grouped = (events.withColumn("_start", starts.cast("int"))
               .withColumn("_group", F.sum("_start").over(w.rowsBetween(Window.unboundedPreceding, 0))))
    first = F.min(F.struct("ts_parsed", "seq", "event_id", "device", "canvas", "locale", "row_position", "dt"))
    agg = grouped.groupBy("profile_id", "_group", "title_id", "title_idx", "runtime_s").agg(
        first.alias("f"),
        F.max(F.struct(strength[F.col("action")], F.col("action"))).alias("strongest"),
        F.sum("duration_s").alias("duration_s"),
        F.count(F.lit(1)).cast("int").alias("n_events"),
    )
    return agg.select("profile_id", "title_id", "title_idx", "runtime_s", "duration_s", "n_events",
                      F.col("strongest.action").alias("action"),
                      *[F.col(f"f.{c}").alias(c) for c in ("ts_parsed", "seq", "event_id", "device", "canvas", "locale",
                                                            "row_position", "dt")])


def to_tokens(valid: DataFrame, prev_last_ts: DataFrame | None) -> DataFrame:
    """Raw valid events -> token rows. ``prev_last_ts`` seeds the gap of each profile's first event."""
    w = Window.partitionBy("profile_id").orderBy(*ARRIVAL_ORDER)
    prev = F.lag("ts_parsed").over(w)
    if prev_last_ts is not None:
        valid = valid.join(prev_last_ts, "profile_id", how="left")
        prev = F.coalesce(prev, F.col("prev_last_ts"))
    # greatest() skips nulls, so keep the first event's missing gap null explicitly (-> OOV bucket)
    gap = F.when(prev.isNull(), F.lit(None)).otherwise(
        F.greatest(F.unix_micros(F.col("ts_parsed")) - F.unix_micros(prev), F.lit(0)) / 1e6)
    return valid.select(
        F.col("profile_id").cast("long").alias("profile_id"), "event_id",
        F.col("ts_parsed").alias("ts"), F.col("seq").cast("long").alias("seq"),
        F.col("title_idx").alias("title"),
        _lookup("action", S.ACTIONS).alias("action"),
        duration_bucket_col(F.col("duration_s").cast("double"), F.col("runtime_s")).alias("duration"),
        _lookup("device", S.DEVICES).alias("device"),
        _lookup("canvas", S.CANVASES).alias("canvas"),
        _lookup("locale", S.LOCALES).alias("locale"),
        row_bucket_col(F.col("row_position")).alias("row"),
        (F.hour("ts_parsed") + S.N_SPECIAL).cast("int").alias("hour"),
        (F.dayofweek("ts_parsed") - 1 + S.N_SPECIAL).cast("int").alias("dow"),
        gap_bucket_col(gap).alias("gap"),
        (F.col("n_events") if "n_events" in valid.columns else F.lit(1)).cast("int").alias("n_events"),
        "dt",
    )


# ------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------
# The history state's layout. Each file is sorted by (last_dt, profile_id), so the profiles active on
# a day (last_dt == that day; always the newest) are one contiguous run at the end of every file, and
# row groups are kept small so the ``last_dt`` statistics let a reader of the day's profiles
# (fm.stream.iter_history, i.e. embed) skip the row groups of every other day: its cost follows
# the day's active profiles, not the whole history. Both bounds apply (parquet-mr 1.17, Spark
# passes write options to its Hadoop conf): bytes bound long histories, rows bound short ones.
HISTORY_SORT = ("last_dt", "profile_id")
HISTORY_ROW_GROUP_BYTES = 16 << 20      # parquet.block.size (default 128 MiB: one group per file)
HISTORY_ROW_GROUP_ROWS = 2048           # parquet.block.row.count.limit: profiles per row group


def history_write_options() -> dict[str, str]:
    return {"parquet.block.size": str(HISTORY_ROW_GROUP_BYTES),
            "parquet.block.row.count.limit": str(HISTORY_ROW_GROUP_ROWS)}


def _read_back_tokens(spark: SparkSession, paths: Paths, days: list[dt.date], computed: DataFrame) -> DataFrame:
    """The tokens just written, read back from Parquet (cheaper than caching the whole lineage);
    ``computed`` (the lineage itself) stands in when no day produced a token file."""
    parts = [str(partition(paths.tokens, d)) for d in days if any(partition(paths.tokens, d).glob("*.parquet"))]
    if not parts:
        return computed
    df = spark.read.option("basePath", str(paths.tokens)).parquet(*parts)
    return df if len(days) > 1 else df.withColumn("dt", F.lit(days[0]))


def _day_table(root: Path, day: dt.date, columns: list[str]) -> pa.Table | None:
    files = sorted(partition(root, day).glob("*.parquet"))
    return pa.concat_tables([pq.read_table(f, columns=columns) for f in files]) if files else None


def _counts(paths: Paths, day: dt.date, days: list[dt.date]) -> dict:
    """Report counts from the written outputs and Parquet footers: no extra Spark passes.

    Each output partition is read once; ``day``'s token table also gives the active profiles."""
    raw = sum(pq.read_metadata(f).num_rows for d in days for f in partition(paths.raw, d).glob("*.parquet"))
    q = [t for d in days if (t := _day_table(paths.quarantine, d, ["reason"])) is not None]
    by_reason = {r["values"]: r["counts"] for r in pc.value_counts(pa.concat_tables(q)["reason"]).to_pylist()} if q else {}
    tok = {d: _day_table(paths.tokens, d, ["profile_id", "n_events"]) for d in days}
    present = [t for t in tok.values() if t is not None]
    valid = sum(int(pc.sum(t["n_events"]).as_py() or 0) for t in present)
    quarantined = sum(by_reason.values())
    today = tok.get(day)
    return {"raw_events": raw, "tokens": sum(t.num_rows for t in present), "duplicates": raw - quarantined - valid,
            "quarantined": quarantined, "valid_events": valid, "quarantine_reasons": by_reason,
            "profiles_active": 0 if today is None else pc.count_distinct(today["profile_id"]).as_py()}


def run(cfg: TokenizeConfig, paths: Paths, spark: SparkSession | None = None) -> dict:
    """Tokenize ``cfg.date`` (or rebuild everything up to it) and return counts for the report.

    Three Spark jobs, each one pass: quarantine (scan + classify), tokens (scan + classify + dedupe
    + merge + fields), history (old state + the tokens read back). Counts come from the outputs.
    """
    day = parse_date(cfg.date)
    spark = spark or get_spark("fmpipe-tokenize")
    today = partition(paths.raw, day)
    if not today.is_dir() or not any(today.glob("*.parquet")):
        raise FileNotFoundError(f"raw partition missing for {day}: {today} (no Parquet files)")
    full = cfg.full or _needs_full(paths, day)
    prev_day = None if full else previous_state(paths, day)     # before any write: a gap changes nothing
    days = _all_raw_days(paths, day) if full else [day]
    raw = read_raw(spark, paths, days)       # fails first, before any state changes, if D is missing
    new_titles = 0
    for d in days:
        vocab, added = grow_vocab(paths, d)
        new_titles += added
    failpoint("tokenize.vocab_grown")                   # vocabulary appended and committed, no tokens written yet
    classified = classify(raw, title_lookup(spark, paths, vocab))
    bad = classified.filter(F.col("reason").isNotNull())
    deduped = dedupe(classified.filter(F.col("reason").isNull()))

    old = spark.read.parquet(str(partition(paths.history, prev_day))) if prev_day else None
    if old is not None and "seq" not in old.columns:      # a state written before arrival order was kept
        old = old.withColumn("seq", F.transform("ts", lambda _: F.lit(None).cast("long")))
    seed = old.select("profile_id", F.element_at("ts", -1).alias("prev_last_ts")) if old is not None else None
    events = merge_adjacent(deduped, cfg.session_gap_s) if cfg.merge_actions else deduped
    tokens = to_tokens(events, seed)

    quarantine = bad.select(*[f.name for f in S.RAW_EVENT_SCHEMA], "reason", "dt")
    if len(days) == 1:
        write_partition(tokens.drop("dt"), partition(paths.tokens, day), sort_by=("profile_id", "ts", "seq", "event_id"))
        write_partition(quarantine.drop("dt"), partition(paths.quarantine, day))
    else:
        write_days(tokens, paths.tokens, days, sort_by=("profile_id", "ts", "seq", "event_id"))
        write_days(quarantine, paths.quarantine, days)
    failpoint("tokenize.tokens_committed")               # tokens and quarantine in place, history state not yet
    history = merge_history(old, _read_back_tokens(spark, paths, days, tokens), cfg.history_len)
    write_partition(history, partition(paths.history, day), sort_by=HISTORY_SORT, options=history_write_options())
    failpoint("tokenize.history_committed")              # the day's history state in place, old states not yet collected
    gc_history(paths, day)
    failpoint("tokenize.history_gc_done")                # old history states collected, step record not yet written

    stats = {"date": day.isoformat(), "mode": "full" if full else "incremental", "days": len(days),
             **_counts(paths, day, days), "new_titles": new_titles, "vocab_titles": vocab.num_rows,
             "history_profiles": sum(pq.read_metadata(f).num_rows for f in partition(paths.history, day).glob("*.parquet")),
             "previous_state": prev_day.isoformat() if prev_day else None}
    stats["events_per_token"] = round(stats["valid_events"] / max(stats["tokens"], 1), 3)
    return stats


def _needs_full(paths: Paths, day: dt.date) -> bool:
    """No history state before ``day`` but earlier raw days exist: only a rebuild keeps them."""
    if latest_partition_before(paths.history, day) is not None:
        return False
    return any(d < day for d in _all_raw_days(paths, day))


def _all_raw_days(paths: Paths, until: dt.date) -> list[dt.date]:
    days = partition_dates(paths.raw, until)
    if not days:
        raise FileNotFoundError(f"no raw partitions up to {until} under {paths.raw}")
    return days


def main(argv: list[str] | None = None) -> dict:
    return run_cli(TokenizeConfig, run, __doc__, argv)


def submit_main(argv: list[str] | None = None) -> int:
    """The spark-submit entry point: the DAG's tokenize step for one date, on spark-submit's master.

    Goes through :func:`jobs.pipeline.tokenize`, so the submitted job takes the same date lock and
    writes the same step record as the local task; :func:`jobs.core.spark.get_spark` keeps the master.
    ``--home`` (empty: ``$FMPIPE_HOME``) and ``--overrides`` (JSON object of TokenizeConfig fields,
    the DAG's ``tokenize`` Param) come from the DAG's application args.
    """
    import argparse
    import json
    import os
    ap = argparse.ArgumentParser(prog="spark-submit jobs/tokenize.py", description=submit_main.__doc__)
    ap.add_argument("--date", required=True, help="the day to tokenize, YYYY-MM-DD")
    ap.add_argument("--home", default="", help="FMPIPE_HOME of the pipeline's state (empty: the environment's)")
    ap.add_argument("--overrides", default="{}", help="JSON object of TokenizeConfig options")
    args = ap.parse_args(argv)
    overrides = json.loads(args.overrides or "{}")
    if not isinstance(overrides, dict):
        raise TypeError(f"--overrides must be a JSON object, got {args.overrides!r}")
    if args.home:
        os.environ["FMPIPE_HOME"] = args.home
    from jobs import pipeline
    print(json.dumps(pipeline.tokenize(args.date, overrides), default=str))
    return 0
