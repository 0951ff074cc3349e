"""The generic events importer: an interaction log (CSV/Parquet) plus a column mapping -> the
pipeline's raw event partitions and catalogue (``fmpipe import events ...``, see :mod:`jobs.tools.importers`).

Everything here is checked before anything is written: a missing or mistyped column fails naming
the column, the row and what was expected. The public-dataset readers (:mod:`jobs.tools.dataset_import`)
convert their files into a table and reuse :func:`events_from_table`, :func:`write_raw` and
:func:`write_dataset_meta`, so every source lands in ``raw/`` with the same schema and the same
idempotent re-import rule; this module therefore imports neither them nor the command line.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from fm import schema as S
from jobs.tools.catalogue_import import before_release, catalogue_from_table
from jobs.core.io import atomic_write_json, atomic_write_table, fsync_tree
from jobs.core.failpoints import failpoint
from jobs.core.locks import shared_lock
from jobs.core.settings import Paths


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
    catalogue: str = ""                  # optional CSV/Parquet item table (jobs.tools.catalogue_import)
    catalogue_map: str = ""              # "title_id:item,name:title,genres:genres+brand,synopsis:plot+director"
    genres_sep: str = "|"                # genres given as one string column
    date_format: str = ""                # release dates: strptime format (empty: common formats)
    before_release: str = "quarantine"   # events before a title's release: quarantine | accept (move the release back)
    dry_run: bool = False                # check everything, print what would be written, write nothing
    delimiter: str = ","
    catalogue_delimiter: str = ""        # the catalogue CSV's separator (empty: the log's delimiter)
    target_actions: str = ""             # actions that count as interactions (next-title targets), comma-separated;
                                         # default: every imported action except impression / pause / search


SEPARATORS = {",": "','", ";": "';'", "\t": "tab", "|": "'|'"}


def read_any(path: Path, delimiter: str = ",", option: str = "delimiter") -> pa.Table:
    """A CSV or Parquet table. A CSV that parses into one column whose name holds another common
    separator was read with the wrong one: say which option to set, instead of reporting every
    mapped column as missing."""
    if not path.exists():
        raise FileNotFoundError(f"source {path} does not exist")
    if path.suffix == ".parquet" or path.is_dir():
        return pq.read_table(path)
    table = pacsv.read_csv(path, parse_options=pacsv.ParseOptions(delimiter=delimiter))
    if table.num_columns == 1:
        other = [sep for sep in SEPARATORS if sep != delimiter and sep in table.column_names[0]]
        if other:
            raise ImportError_(f"{path}: read with {option}={delimiter!r} it has one column "
                               f"{table.column_names[0]!r}; it looks {SEPARATORS[other[0]]}-separated: "
                               f"set {option}={other[0]!r}")
    return table


def _column(table: pa.Table, name: str, role: str, where: str) -> pd.Series:
    if name not in table.column_names:
        raise ImportError_(f"{where}: column {name!r} (mapped as {role}) not found; columns are {table.column_names}")
    return table[name].to_pandas()


def _show(value) -> str:
    """A cell as a person reads it: strings quoted, numbers plain (no numpy type names)."""
    value = value.item() if hasattr(value, "item") else value
    return repr(value) if isinstance(value, str) else str(value)


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
        raise ImportError_(f"{where}: column {name!r} ({role}) row {row}: {_show(raw.iloc[row])} is not an integer id")
    return parsed.astype("Int64")


def _as_utc(raw: pd.Series, name: str, where: str) -> pd.Series:
    """Unix seconds / milliseconds (numbers) or ISO-8601 strings -> UTC timestamps. Every row must
    have a time: an empty, negative or unparseable value, or a column mixing seconds with
    milliseconds, fails naming the row (a wrong date would silently move the event to another day)."""
    if pd.api.types.is_datetime64_any_dtype(raw):
        parsed = pd.to_datetime(raw, utc=True)
    elif (numeric := pd.to_numeric(raw, errors="coerce")).notna().all():
        parsed = _from_unix(numeric, raw, name, where)
    else:
        parsed = pd.to_datetime(raw, utc=True, errors="coerce", format="ISO8601")
        row = _first_bad(parsed, raw)
        if row is not None:
            raise ImportError_(f"{where}: column {name!r} (timestamp) row {row}: {_show(raw.iloc[row])} is not unix "
                               "seconds/milliseconds or an ISO-8601 time")
    if parsed.isna().any():
        row = int(np.flatnonzero(parsed.isna().to_numpy())[0])
        raise ImportError_(f"{where}: column {name!r} (timestamp) row {row} is empty: every event needs a time")
    return parsed


def _from_unix(numeric: pd.Series, raw: pd.Series, name: str, where: str) -> pd.Series:
    """Seconds below 1e11 (until year 5138), milliseconds above; one unit per column."""
    if (numeric < 0).any():
        row = int(np.flatnonzero((numeric < 0).to_numpy())[0])
        raise ImportError_(f"{where}: column {name!r} (timestamp) row {row}: {_show(raw.iloc[row])} is before 1970")
    is_ms = (numeric >= 1e11).to_numpy()
    if is_ms.any() and not is_ms.all():
        s_row, ms_row = int(np.flatnonzero(~is_ms)[0]), int(np.flatnonzero(is_ms)[0])
        raise ImportError_(f"{where}: column {name!r} (timestamp) mixes unix seconds (row {s_row}: "
                           f"{_show(raw.iloc[s_row])}) and milliseconds (row {ms_row}: {_show(raw.iloc[ms_row])}); "
                           "convert the column to one unit")
    return pd.to_datetime(numeric, unit="ms" if is_ms.any() else "s", utc=True)


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
        if row is None and ((duration < 0) | ~np.isfinite(duration.astype("float64").fillna(0.0))).any():
            row = int(np.flatnonzero(((duration < 0) | ~np.isfinite(duration.astype("float64").fillna(0.0))).fillna(False).to_numpy())[0])
        if row is not None:
            raise ImportError_(f"{where}: column {cfg.duration!r} (duration) row {row}: {_show(raw.iloc[row])} is not a "
                               "finite, non-negative number of seconds")
    opt = {c: (_column(table, getattr(cfg, c), c, where).astype("string") if getattr(cfg, c) else pd.Series([None] * n, dtype="string"))
           for c in ("device", "canvas")}
    return pd.DataFrame({
        "event_id": [f"{source_name}-{i}" for i in range(n)], "profile_id": users,
        "ts": ts.dt.strftime("%Y-%m-%dT%H:%M:%SZ"), "title_id": items, "action": actions, "duration_s": duration,
        "device": opt["device"], "canvas": opt["canvas"], "row_position": pd.Series([None] * n, dtype="Int32"),
        "locale": pd.Series([None] * n, dtype="string"), "seq": np.arange(n, dtype=np.int64),
        "dt": ts.dt.strftime("%Y-%m-%d"),
    })


NOT_INTERACTIONS = ("impression", "pause", "search")


def write_dataset_meta(paths: Paths, source: str, actions, explicit: str = "") -> dict:
    """Record which actions of this dataset are interactions: ``fmpipe train`` predicts exactly those
    (a new dataset needs no code to get its targets right). Unknown names fail with the valid ones."""
    chosen = [a for a in explicit.split(",") if a] if explicit else \
        sorted({str(a) for a in actions if a is not None} - set(NOT_INTERACTIONS))
    unknown = sorted(set(chosen) - set(S.ACTIONS))
    if unknown:
        raise ImportError_(f"target_actions: unknown action(s) {unknown}; valid: {list(S.ACTIONS)}")
    meta = {"source": source, "target_actions": chosen}
    atomic_write_json(meta, paths.home / "dataset.json")
    return meta


def source_key(path: Path) -> str:
    """A stable name for one source file: its stem plus a hash of its absolute path, so two files
    with the same name never share event ids or raw files, and re-importing one file replaces only
    its own events."""
    stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in path.stem)[:40]
    return f"{stem}-{hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]}"


def write_raw(events: pd.DataFrame, paths: Paths, key: str) -> dict:
    """Write one source's events into raw/dt=... partitions as ``part-<key>-0.parquet``.

    Other sources' files in the same days stay (imports append); a re-import of the same source
    first removes its previous files, so re-running an import is idempotent."""
    for old in paths.raw.glob(f"dt=*/part-{key}-*.parquet"):
        old.unlink()
    failpoint("import.old_files_removed")               # this source's previous files gone, new ones not yet written
    events = events.sort_values("dt", kind="stable")          # one file per day: rows of a day are contiguous
    table = pa.Table.from_pandas(events, preserve_index=False)
    data = table.drop(["dt"]).cast(S.RAW_EVENT_SCHEMA).append_column("dt", table["dt"])
    pads.write_dataset(data, paths.raw, format="parquet",
                       partitioning=pads.partitioning(pa.schema([("dt", pa.string())]), flavor="hive"),
                       existing_data_behavior="overwrite_or_ignore", basename_template=f"part-{key}-{{i}}.parquet",
                       max_partitions=1_000_000)   # a long log spans years of daily partitions
    fsync_tree(paths.raw)
    failpoint("import.raw_committed")                  # raw files written and fsynced, import not yet reported
    days = sorted(events["dt"].unique())
    return {"events": len(events), "days": len(days), "first_day": days[0], "last_day": days[-1],
            "profiles": int(events["profile_id"].nunique()), "titles": int(events["title_id"].nunique())}


def minimal_catalogue(title_ids: list[str]) -> pa.Table:
    """When no catalogue is given: every item is a title with only its id as text (content is weak)."""
    n = len(title_ids)
    return pa.table({"title_id": title_ids, "name": title_ids, "kind": ["movie"] * n, "genres": [[]] * n,
                     "release_date": [None] * n, "synopsis": [""] * n, "runtime_s": [None] * n},
                    schema=S.CATALOGUE_SCHEMA)


def check_unique_titles(cat: pa.Table, where: str) -> None:
    """A title id listed twice would enter the append-only vocabulary twice, forever: refuse it."""
    ids = cat["title_id"].to_pylist()
    seen: dict[str, int] = {}
    for row, t in enumerate(ids):
        if t in seen:
            raise ImportError_(f"{where}: title_id {t!r} appears twice (rows {seen[t]} and {row}); "
                               "keep one row per title")
        seen[t] = row


def merge_catalogue(paths: Paths, new: pa.Table, keep_existing: bool) -> pa.Table:
    """The existing catalogue plus ``new``: imports add titles, they never drop other sources' ones.
    ``keep_existing``: rows already there win (a bare id-only row must not erase a real entry);
    otherwise the new rows replace them."""
    if not paths.catalogue.exists():
        return new
    old = pq.read_table(paths.catalogue).cast(S.CATALOGUE_SCHEMA)
    rows = {r["title_id"]: r for r in old.to_pylist()}
    for r in new.to_pylist():
        if not (keep_existing and r["title_id"] in rows):
            rows[r["title_id"]] = r
    return pa.Table.from_pylist(list(rows.values()), schema=S.CATALOGUE_SCHEMA)


def dry_run_report(events: pd.DataFrame, cat: pa.Table, early: dict, key: str) -> dict:
    """What an import would write: per-day counts, the catalogue, events before release."""
    per_day = events.groupby("dt").size()
    return {"dry_run": True, "written": False, "source_key": key, "events": len(events), "days": len(per_day),
            "first_day": per_day.index.min(), "last_day": per_day.index.max(),
            "events_per_day": {d: int(n) for d, n in per_day.items()} if len(per_day) <= 31 else
            {"min": int(per_day.min()), "median": int(per_day.median()), "max": int(per_day.max())},
            "profiles": int(events["profile_id"].nunique()), "titles": int(events["title_id"].nunique()),
            "titles_without_catalogue_row": int((~events["title_id"].isin(cat["title_id"].to_pylist())).sum()),
            "catalogue_titles": cat.num_rows, "before_release": early}


def run(cfg: ImportConfig, paths: Paths) -> dict:
    src = Path(cfg.source)
    key = source_key(src)
    events = events_from_table(read_any(src, cfg.delimiter), cfg, key)
    if cfg.catalogue:
        cat = catalogue_from_table(read_any(Path(cfg.catalogue), cfg.catalogue_delimiter or cfg.delimiter,
                                            "catalogue_delimiter"), cfg.catalogue_map, cfg.catalogue,
                                   cfg.genres_sep, cfg.date_format)
        check_unique_titles(cat, cfg.catalogue)
    else:
        cat = minimal_catalogue(sorted(events["title_id"].dropna().unique().tolist()))
    cat, early = before_release(cat, events, cfg.before_release)
    if cfg.dry_run:
        return dry_run_report(events, cat, early, key)
    # one import writes at a time: the catalogue is read, merged and replaced, so two overlapping
    # imports would each drop the titles the other added (the last rename wins)
    with shared_lock(paths, "state-import", "import"):
        cat = merge_catalogue(paths, cat, keep_existing=not cfg.catalogue)
        atomic_write_table(cat, paths.catalogue)
        failpoint("import.catalogue_committed")            # catalogue replaced, raw events not yet written
        meta = write_dataset_meta(paths, str(src), events["action"].dropna().unique(), cfg.target_actions)
        written = write_raw(events, paths, key)
    return {**written, "catalogue_titles": cat.num_rows, "target_actions": meta["target_actions"],
            "before_release": early}
