"""The history state: each profile's last N tokens, one Parquet state per day, chained day by day.

Why a module of its own: the tokenize job (:mod:`jobs.tokenize`) turns a day's raw events into
tokens; this is the state those tokens fold into, with its own rules — sorted by time with ties in
arrival order, cut to the last N, a state builds only on the day before's (a gap is an error naming
the missing day), and only the newest few states are kept (plus the one just written).
"""
from __future__ import annotations

import datetime as dt
import shutil

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from fm import schema as S
from jobs.core.io import latest_partition_before, partition
from jobs.core.settings import Paths

KEEP_HISTORY_STATES = 3

_HIST_COLS = ("ts", "seq", *S.TOKEN_FIELDS)   # struct order = sort order: time, then arrival


def _zip(prefix: str = "") -> Column:
    """The per-field history arrays of one profile as one array of token structs (sortable by ts)."""
    return F.arrays_zip(*[F.col(f"{prefix}{c}").alias(c) for c in _HIST_COLS])


def history_from_tokens(tokens: DataFrame) -> DataFrame:
    """Per-profile array of token structs (unsorted) plus the last day the profile was active."""
    return tokens.groupBy("profile_id").agg(
        F.collect_list(F.struct(*[F.col(c) for c in _HIST_COLS])).alias("toks"), F.max("dt").alias("last_dt"))


def _sorted_tail(toks: Column, n: int) -> Column:
    """Sort tokens by time, ties by arrival (``seq``; late events land in order), keep the last ``n``."""
    toks = F.array_sort(toks)
    return F.slice(toks, F.greatest(F.size(toks) - n + 1, F.lit(1)), n)


def _history_columns(toks: Column) -> list[Column]:
    return [F.size(toks).cast("int").alias("n_tokens"), *[toks[c].alias(c) for c in _HIST_COLS]]


def merge_history(old: DataFrame | None, day_tokens: DataFrame, n: int) -> DataFrame:
    """New history state = old state + the day's tokens, per profile.

    Profiles without tokens today pass through untouched (their arrays are already sorted and cut),
    so the sort cost follows the day's active profiles, not the size of the whole state.
    """
    new = history_from_tokens(day_tokens)
    if old is None:
        kept = new.select("profile_id", F.col("last_dt").cast("date").alias("last_dt"),
                          _sorted_tail(F.col("toks"), n).alias("toks"))
        return kept.select("profile_id", "last_dt", *_history_columns(F.col("toks")))
    o = old.select("profile_id", "last_dt", *[F.col(c).alias(f"o_{c}") for c in ("n_tokens", *_HIST_COLS)])
    joined = o.join(new, "profile_id", how="full_outer")
    # Only active profiles get zipped, merged and sorted (CaseWhen evaluates a branch only when taken).
    active = F.col("toks").isNotNull()
    merged = joined.select(
        "profile_id",
        F.coalesce(new["last_dt"], o["last_dt"]).cast("date").alias("last_dt"),
        F.when(active, _sorted_tail(F.concat(F.coalesce(_zip("o_"), F.array()), F.col("toks")), n)).alias("m"),
        *[F.col(f"o_{c}") for c in ("n_tokens", *_HIST_COLS)],
    )
    m = F.col("m")
    return merged.select(
        "profile_id", "last_dt",
        F.when(m.isNull(), F.col("o_n_tokens")).otherwise(F.size(m)).cast("int").alias("n_tokens"),
        *[F.when(m.isNull(), F.col(f"o_{c}")).otherwise(m[c]).alias(c) for c in _HIST_COLS],
    )


def gc_history(paths: Paths, written: dt.date) -> None:
    """Keep the newest ``KEEP_HISTORY_STATES`` states and the one just written.

    Why the second: re-running (or backfilling) a date older than every kept state rebuilds it
    from the raw days; counting only the newest states would delete that state at once, and the
    date's embed would find no history. It goes at the next day's run, once its date is done."""
    keep = partition(paths.history, written)
    states = sorted(paths.history.glob("dt=*"))
    for old in states[:-KEEP_HISTORY_STATES]:
        if old != keep:
            shutil.rmtree(old, ignore_errors=True)


class HistoryGapError(RuntimeError):
    """The history state an incremental tokenize must build on (the previous day's) is missing."""


def previous_state(paths: Paths, day: dt.date) -> dt.date | None:
    """The history state ``day`` builds on: the state of the day before, strictly.

    Why strictly: building on an older state silently drops the events of every day in between
    from history (and so from every later profile embedding). Days in the gap with no raw partition
    at all hold no events, so chaining over them loses nothing and is allowed. Returns None when
    there is no earlier state at all (the first day; :func:`_needs_full` covers earlier raw days)."""
    prev = latest_partition_before(paths.history, day)
    if prev is None:
        return None
    gap = [prev + dt.timedelta(days=i) for i in range(1, (day - prev).days)]
    missing = [d for d in gap if any(partition(paths.raw, d).glob("*.parquet"))]
    if missing:
        raise HistoryGapError(
            f"cannot tokenize {day} incrementally: the history state of {missing[-1]} is missing "
            f"({partition(paths.history, missing[-1])}); the latest state before {day} is {prev}, so the events of "
            f"{', '.join(d.isoformat() for d in missing)} would never reach history. Run the missing day(s) first "
            f"(`fmpipe backfill --start {missing[0]} --end {day}`, or `fmpipe tokenize date=...` for each day in "
            f"order), or rebuild from every raw day: `fmpipe tokenize date={day} full=true`.")
    return prev
