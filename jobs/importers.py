"""Bring your own data: turn an interaction log into the pipeline's raw event partitions.

* ``fmpipe import events source=log.csv user=uid item=sku timestamp=time [action=... duration=...
  device=... canvas=... action_map=click:play,buy:complete catalogue=items.csv]`` — a generic
  CSV/Parquet log with a column mapping. Missing or mistyped columns fail with the column, the row
  and what was expected; nothing is written until the whole file has been checked.
* ``fmpipe import movielens [path=.../ml-1m] [users=N]`` — MovieLens ``ratings.dat`` (+ movies and
  extra infos as the catalogue): each rating is an event; 4-5 -> thumbs_up, 1-2 -> thumbs_down,
  3 -> complete; device/canvas/locale are unknown (OOV tokens).

Events land in ``raw/dt=YYYY-MM-DD/`` by their UTC date (re-importing replaces those partitions),
with deterministic ``event_id`` = ``<source>-<row>``; then ``fmpipe tokenize date=<last> full=true``.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from fm import schema as S
from jobs.io import atomic_write_table
from jobs.settings import Paths, parse_overrides


class ImportError_(ValueError):
    """The source does not match the mapping: names the column, the row and what was expected."""


@dataclass(frozen=True)
class ImportConfig:
    """Column mapping of a generic interaction log (empty = column not present)."""
    source: str = ""
    user: str = "user_id"
    item: str = "item_id"
    timestamp: str = "timestamp"
    action: str = ""
    duration: str = ""
    device: str = ""
    canvas: str = ""
    action_map: str = ""                 # "click:play,buy:complete": source value -> pipeline action
    default_action: str = "play"         # when there is no action column
    catalogue: str = ""                  # optional CSV/Parquet in the catalogue schema (title_id required)
    delimiter: str = ","


def read_any(path: Path, delimiter: str = ",") -> pa.Table:
    if not path.exists():
        raise FileNotFoundError(f"source {path} does not exist")
    if path.suffix == ".parquet" or path.is_dir():
        return pq.read_table(path)
    return pacsv.read_csv(path, parse_options=pacsv.ParseOptions(delimiter=delimiter))


def _column(table: pa.Table, name: str, role: str, where: str) -> pd.Series:
    if name not in table.column_names:
        raise ImportError_(f"{where}: column {name!r} (mapped as {role}) not found; columns are {table.column_names}")
    return table[name].to_pandas()


def _first_bad(parsed: pd.Series, raw: pd.Series) -> int | None:
    """First row whose value was present (not null, not an empty string) but did not parse."""
    present = raw.notna() & (raw.astype("string").str.strip() != "")
    bad = parsed.isna() & present
    return int(np.flatnonzero(bad.to_numpy())[0]) if bad.any() else None


def _as_int(raw: pd.Series, name: str, role: str, where: str) -> pd.Series:
    parsed = pd.to_numeric(raw, errors="coerce")
    row = _first_bad(parsed, raw)
    if row is None and parsed.notna().any() and (parsed.dropna() % 1 != 0).any():
        row = int(np.flatnonzero(((parsed % 1) != 0).to_numpy())[0])
    if row is not None:
        raise ImportError_(f"{where}: column {name!r} ({role}) row {row}: {raw.iloc[row]!r} is not an integer id")
    return parsed.astype("Int64")


def _as_utc(raw: pd.Series, name: str, where: str) -> pd.Series:
    """Unix seconds / milliseconds (numbers) or ISO-8601 strings -> UTC timestamps."""
    if pd.api.types.is_datetime64_any_dtype(raw):
        return pd.to_datetime(raw, utc=True)
    numeric = pd.to_numeric(raw, errors="coerce")
    if numeric.notna().all():
        unit = "ms" if numeric.abs().max() > 1e11 else "s"
        return pd.to_datetime(numeric, unit=unit, utc=True)
    parsed = pd.to_datetime(raw, utc=True, errors="coerce", format="ISO8601")
    row = _first_bad(parsed, raw)
    if row is not None:
        raise ImportError_(f"{where}: column {name!r} (timestamp) row {row}: {raw.iloc[row]!r} is not unix "
                           "seconds/milliseconds or an ISO-8601 time")
    return parsed


def events_from_table(table: pa.Table, cfg: ImportConfig, source_name: str) -> pd.DataFrame:
    """Check and convert a mapped log into raw-event rows (pandas, RAW_EVENT_SCHEMA columns + dt)."""
    where = source_name
    users = _as_int(_column(table, cfg.user, "user", where), cfg.user, "user", where)
    items = _column(table, cfg.item, "item", where).astype("string")
    ts = _as_utc(_column(table, cfg.timestamp, "timestamp", where), cfg.timestamp, where)
    n = table.num_rows
    if cfg.action:
        mapping = dict(kv.split(":", 1) for kv in cfg.action_map.split(",") if kv)
        actions = _column(table, cfg.action, "action", where).astype("string").map(lambda v: mapping.get(v, v))
    else:
        actions = pd.Series([cfg.default_action] * n, dtype="string")
    duration = pd.Series([None] * n, dtype="Float64")
    if cfg.duration:
        raw = _column(table, cfg.duration, "duration", where)
        duration = pd.to_numeric(raw, errors="coerce").astype("Float64")
        row = _first_bad(duration, raw)
        if row is not None:
            raise ImportError_(f"{where}: column {cfg.duration!r} (duration) row {row}: {raw.iloc[row]!r} is not a number of seconds")
    opt = {c: (_column(table, getattr(cfg, c), c, where).astype("string") if getattr(cfg, c) else pd.Series([None] * n, dtype="string"))
           for c in ("device", "canvas")}
    return pd.DataFrame({
        "event_id": [f"{source_name}-{i}" for i in range(n)], "profile_id": users,
        "ts": ts.dt.strftime("%Y-%m-%dT%H:%M:%SZ"), "title_id": items, "action": actions, "duration_s": duration,
        "device": opt["device"], "canvas": opt["canvas"], "row_position": pd.Series([None] * n, dtype="Int32"),
        "locale": pd.Series([None] * n, dtype="string"), "dt": ts.dt.strftime("%Y-%m-%d"),
    })


def write_raw(events: pd.DataFrame, paths: Paths) -> dict:
    """Write events into raw/dt=... partitions (replacing the partitions they touch)."""
    table = pa.Table.from_pandas(events, preserve_index=False)
    data = table.drop(["dt"]).cast(S.RAW_EVENT_SCHEMA).append_column("dt", table["dt"])
    pads.write_dataset(data, paths.raw, format="parquet",
                       partitioning=pads.partitioning(pa.schema([("dt", pa.string())]), flavor="hive"),
                       existing_data_behavior="delete_matching", basename_template="part-{i}.parquet")
    days = sorted(events["dt"].unique())
    return {"events": len(events), "days": len(days), "first_day": days[0], "last_day": days[-1],
            "profiles": int(events["profile_id"].nunique()), "titles": int(events["title_id"].nunique())}


def minimal_catalogue(title_ids: list[str]) -> pa.Table:
    """When no catalogue is given: every item is a title with only its id as text (content is weak)."""
    n = len(title_ids)
    return pa.table({"title_id": title_ids, "name": title_ids, "kind": ["movie"] * n, "genres": [[]] * n,
                     "release_date": [None] * n, "synopsis": [""] * n, "runtime_s": [None] * n},
                    schema=S.CATALOGUE_SCHEMA)


def run(cfg: ImportConfig, paths: Paths) -> dict:
    src = Path(cfg.source)
    events = events_from_table(read_any(src, cfg.delimiter), cfg, src.stem)
    if cfg.catalogue:
        cat = read_any(Path(cfg.catalogue), cfg.delimiter)
        if "title_id" not in cat.column_names:
            raise ImportError_(f"{cfg.catalogue}: catalogue needs a 'title_id' column; has {cat.column_names}")
        cat = pa.Table.from_pylist([{f.name: r.get(f.name) for f in S.CATALOGUE_SCHEMA} for r in cat.to_pylist()],
                                   schema=S.CATALOGUE_SCHEMA)
    else:
        cat = minimal_catalogue(sorted(events["title_id"].dropna().unique().tolist()))
    atomic_write_table(cat, paths.catalogue)
    return {**write_raw(events, paths), "catalogue_titles": cat.num_rows}


def import_movielens(paths: Paths, path: str | None = None, users: int = 0, ratings_file: str | None = None) -> dict:
    """MovieLens ratings -> raw events, movies (+ extra infos) -> catalogue."""
    from fm import movielens
    ratings = movielens.sort_events(movielens.read_ratings(path, file=ratings_file or movielens.RATINGS_FILE))
    if users:
        ratings = ratings[ratings["user"] <= users]
    table = pa.table({
        "user": ratings["user"].to_numpy(), "item": ratings["movie"].astype(str).to_numpy(),
        "timestamp": ratings["ts"].to_numpy(),
        "action": np.array([movielens.ACTION_OF_RATING[int(r)] for r in ratings["rating"]]),
    })
    events = events_from_table(table, ImportConfig(user="user", item="item", timestamp="timestamp", action="action"),
                               "ml")
    events["event_id"] = [f"ml-{line}" for line in ratings["line"]]
    atomic_write_table(movielens.movie_catalogue(path), paths.catalogue)
    return write_raw(events, paths)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("kind", choices=["events", "movielens"])
    ap.add_argument("overrides", nargs="*", help="key=value (events: ImportConfig fields; movielens: path=, users=)")
    args = ap.parse_args(argv)
    paths = Paths.from_env()
    if args.kind == "movielens":
        opts = dict(o.split("=", 1) for o in args.overrides)
        unknown = set(opts) - {"path", "users", "ratings_file"}
        if unknown:
            raise SystemExit(f"unknown option(s) {sorted(unknown)} for movielens; valid: path, users, ratings_file")
        out = import_movielens(paths, opts.get("path"), int(opts.get("users", 0)), opts.get("ratings_file"))
    else:
        out = run(parse_overrides(ImportConfig, args.overrides), paths)
    print(out)
    return out
