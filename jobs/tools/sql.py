"""``fmpipe sql "<query>"``: analysts query the pipeline's tables with SQL, no Python needed.

DuckDB runs over the partitioned Parquet under ``$FMPIPE_HOME`` (read-only); every table is a view
and ``dt`` partitions are columns. Views: raw_events, quarantine, tokens, history, title_vocab,
catalogue, profile_embeddings, title_embeddings (published days only: not a day that failed the gate
or was rolled back), publications (every pointer move); lookups that decode the token ids (actions,
devices, canvases, locales, hours, weekdays: ``id, name``) and tokens_decoded (tokens with names and
title ids); gate_results (one row per validated date) and models (one row per checkpoint, with
``current`` from models/CURRENT.json, itself the view current_model). Example queries:
``docs/queries.sql`` (``fmpipe sql --file docs/queries.sql --name nearest_titles``).
``fmpipe sql --catalogue`` writes the same views to ``$FMPIPE_HOME/analytics/fmpipe.duckdb`` for
any DuckDB client (:func:`write_catalogue`).

It reads the pipeline's tables and nothing else, and writes no file, because an analyst's query
string is untrusted input on a machine that holds credentials and the serving state:

* views are created through DuckDB's relation API, so the table paths are values, never SQL text
  (a ``$FMPIPE_HOME`` with a quote in it neither breaks nor injects into the view DDL);
* then external access is switched off (``enable_external_access=false``) except for exactly the
  views' directories and files (``allowed_directories`` / ``allowed_paths``; the gate and model JSON
  files one by one, never their folders, which hold weights and GE's files), and the configuration
  is locked (``lock_configuration=true``), so ``read_csv('/etc/passwd')``, ``ATTACH``, ``INSTALL``
  and ``SET`` are refused by DuckDB itself;
* only ``SELECT`` statements run (checked on DuckDB's own parse of every statement): the allowed
  directories would otherwise accept ``COPY ... TO`` into the pipeline's own tables.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
from pathlib import Path
from typing import Callable

import duckdb
import pyarrow as pa

import fm.schema as S
from fm.durable import commit_file
from jobs.core.io import partition, temp_sibling
from jobs.core.settings import DIR_MODE, FILE_MODE, REPO_ROOT, Paths

EXAMPLES = REPO_ROOT / "docs" / "queries.sql"
PUBLISHED_ONLY = ("profile_embeddings", "title_embeddings")
WEEKDAYS = ("Sunday", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday")   # Spark dayofweek order
PUBLICATION_COLUMNS = ("date", "publication", "action", "seq", "committed_at", "model_version", "previous")


def views(paths: Paths) -> dict[str, Path]:
    return {
        "raw_events": paths.raw, "quarantine": paths.quarantine, "tokens": paths.tokens, "history": paths.history,
        "profile_embeddings": paths.profile_embeddings, "title_embeddings": paths.title_embeddings,
        "title_vocab": paths.title_vocab, "catalogue": paths.catalogue,
    }


def published_files(root: Path, days: list[dt.date]) -> list[str]:
    """The Parquet files of ``root``'s partitions of ``days`` (the published ones), in date order."""
    return [str(f) for d in days for f in sorted(partition(root, d).glob("*.parquet"))]


def lookups() -> dict[str, tuple[str, tuple[str, ...]]]:
    """``{view: (token field, names)}``: each categorical token field's ids decoded, in the id order
    ``jobs.tokenize`` encodes them (PAD, OOV, then the names), so analysts never need the integer ids.
    ``hour`` is the UTC hour and ``dow`` Spark's day of week (Sunday first), both offset by PAD/OOV."""
    return {"actions": ("action", S.ACTIONS), "devices": ("device", S.DEVICES), "canvases": ("canvas", S.CANVASES),
            "locales": ("locale", S.LOCALES), "hours": ("hour", tuple(f"{h:02d}" for h in range(24))),
            "weekdays": ("dow", WEEKDAYS)}


def lookup_table(names: tuple[str, ...]) -> pa.Table:
    """(id, name) rows: ``<pad>`` and ``<unknown>`` (a value tokenize did not know) first."""
    values = ("<pad>", "<unknown>", *names)
    assert len(values) == S.vocab_size(names)
    return pa.table({"id": pa.array(range(len(values)), pa.int32()), "name": pa.array(values, pa.string())})


GATE_COLUMNS = {"date": "DATE", "success": "BOOLEAN", "suites": "JSON", "inputs_sha256": "VARCHAR"}
GATE_PROJECTION = (
    "date, success, "
    "from_json(suites, '[{\"suite\": \"VARCHAR\", \"success\": \"BOOLEAN\"}]') AS suites, "
    "list_transform(list_filter(from_json(suites, '[{\"suite\": \"VARCHAR\", \"success\": \"BOOLEAN\"}]'), "
    "s -> NOT s.success), s -> s.suite) AS failed_suites, "
    "suites AS detail, inputs_sha256")
MODEL_COLUMNS = {"model_version": "VARCHAR", "parent": "VARCHAR", "data_range": "JSON", "metrics": "JSON",
                 "gate": "JSON", "n_params": "BIGINT", "vocab_size": "BIGINT", "model_config": "JSON"}
CURRENT_MODEL_COLUMNS = {"version": "VARCHAR", "promoted_at": "TIMESTAMPTZ"}


def model_projection(has_current: bool) -> str:
    """The ``models`` columns; ``current``: the version ``models/CURRENT.json`` serves now (embed uses it)."""
    current = "coalesce(model_version = (SELECT version FROM current_model), false)" if has_current else "false"
    return ("model_version AS version, parent, "
            "CAST(data_range->>'history_state' AS DATE) AS trained_through, "
            "CAST(data_range->>'profiles_trained' AS BIGINT) AS profiles_trained, "
            "CAST(metrics->'best'->>'ndcg@10' AS DOUBLE) AS valid_ndcg_10, "
            "CAST(metrics->'best'->>'hr@10' AS DOUBLE) AS valid_hr_10, "
            "metrics->'best' AS valid_metrics, "
            "CAST(gate->>'promote' AS BOOLEAN) AS promoted, gate->>'reason' AS promote_reason, "
            f"{current} AS current, n_params, vocab_size, "
            "CAST(model_config->>'n_layers' AS INT) AS n_layers, CAST(model_config->>'d_model' AS INT) AS d_model")


def json_objects(files: list[Path]) -> list[str]:
    """The ``files`` that hold one JSON object: a damaged file (a hand edit, a full disk) drops its
    row, rather than failing every view and so every analyst's query."""
    ok = []
    for f in files:
        try:
            if isinstance(json.loads(f.read_text()), dict):
                ok.append(str(f))
        except (OSError, ValueError):
            continue
    return ok


def model_configs(paths: Paths) -> list[str]:
    """``models/<version>/config.json`` of every finished checkpoint (hidden names are a writer's
    scratch: ``.v.tmp-*`` before its rename, ``.train-state``)."""
    root = paths.models
    return json_objects([p for p in sorted(root.glob("*/config.json")) if not p.parent.name.startswith(".")]
                        if root.is_dir() else [])


def gate_summaries(paths: Paths) -> list[str]:
    """``gx/results/dt=D/summary.json`` of every validated date (the verdict publish reads)."""
    root = paths.gx / "results"
    return json_objects(sorted(root.glob("dt=*/summary.json")) if root.is_dir() else [])


DECODED = """
SELECT t.profile_id, t.event_id, t.ts, t.seq, t.dt, t.title AS title_idx, {title_id} AS title_id, {name} AS title_name,
       a.name AS action, d.name AS device, c.name AS canvas, l.name AS locale, h.name AS hour_utc, w.name AS weekday,
       t.duration AS duration_bucket, t."row" AS row_bucket, t.gap AS gap_bucket, t.n_events
FROM tokens t {joins}
LEFT JOIN actions a ON a.id = t.action LEFT JOIN devices d ON d.id = t.device LEFT JOIN canvases c ON c.id = t.canvas
LEFT JOIN locales l ON l.id = t.locale LEFT JOIN hours h ON h.id = t.hour LEFT JOIN weekdays w ON w.id = t.dow
"""


DECODED_FIELDS = ("profile_id", "event_id", "ts", "seq", "dt", "n_events", *S.TOKEN_FIELDS)


def decoded_sql(names: dict | set) -> str:
    """``tokens_decoded``: tokens with every id as its name; title columns are NULL until the title
    vocabulary (and the catalogue, for names) exist, so the view's columns never change."""
    joins, title_id, name = "", "CAST(NULL AS VARCHAR)", "CAST(NULL AS VARCHAR)"
    if "title_vocab" in names:
        joins, title_id = "LEFT JOIN title_vocab v ON v.idx = t.title", "v.title_id"
        if "catalogue" in names:
            joins, name = joins + " LEFT JOIN catalogue k ON k.title_id = v.title_id", "k.name"
    return DECODED.format(joins=joins, title_id=title_id, name=name)


Define = Callable[[str, duckdb.DuckDBPyRelation, bool], None]


def define_views(con: duckdb.DuckDBPyConnection, paths: Paths, define: Define) -> tuple[list[str], list[str]]:
    """Build every view of :func:`connect` on ``con`` and hand each to ``define(name, relation, data)``
    (``data``: the rows live in memory, not in files); returns the (directories, files) they read.

    One definition for the in-memory connection and the catalogue file, so the two cannot drift.
    Paths go in as values (relation API); the SQL text used here holds no path."""
    from jobs.core.publication import history
    from jobs.rollback import published_dates
    dirs, files, names = [], [], {}

    def add(name: str, rel: duckdb.DuckDBPyRelation, data: bool = False) -> None:
        define(name, rel, data)
        names[name] = rel.columns

    days = published_dates(paths)
    moves = history(paths)
    if moves:
        add("publications", con.from_arrow(pa.Table.from_pylist([{k: r.get(k) for k in PUBLICATION_COLUMNS}
                                                                  for r in moves])), True)
    for name, path in views(paths).items():
        if name in PUBLISHED_ONLY:
            chosen = published_files(path, days) if path.is_dir() else []
            if chosen:
                add(name, con.read_parquet(chosen, hive_partitioning=True, union_by_name=True))
                # the same rows under the name that says what they are (issue 17's published_* views)
                add(f"published_{name}", con.read_parquet(chosen, hive_partitioning=True, union_by_name=True))
                dirs.append(f"{path}/")
        elif path.is_file():
            add(name, con.read_parquet(str(path)))
            files.append(str(path))
        elif path.is_dir() and any(path.glob("dt=*/*.parquet")):
            add(name, con.read_parquet(str(path / "dt=*" / "*.parquet"), hive_partitioning=True, union_by_name=True))
            dirs.append(f"{path}/")                 # trailing slash: tokens/ must not allow tokens2/
    for name, (_, values) in lookups().items():
        add(name, con.from_arrow(lookup_table(values)), True)
    if set(DECODED_FIELDS) <= set(names.get("tokens", ())):   # a tokens table of this schema version
        add("tokens_decoded", con.sql(decoded_sql(names)))
    if summaries := gate_summaries(paths):          # exact files: the folders hold GE's suites and data docs too
        gates = con.read_json(summaries, columns=GATE_COLUMNS, format="auto")  # type: ignore[arg-type]  # lists work
        add("gate_results", gates.project(GATE_PROJECTION))
        files += summaries
    pointer = paths.models / "CURRENT.json"
    if json_objects([pointer]):
        add("current_model", con.read_json(str(pointer), columns=CURRENT_MODEL_COLUMNS, format="auto"))
        files.append(str(pointer))
    if configs := model_configs(paths):             # exact files: never the weights beside them
        add("models", con.read_json(configs, columns=MODEL_COLUMNS, format="auto")  # type: ignore[arg-type]
            .project(model_projection("current_model" in names)))
        files += configs
    return dirs, files


def connect(paths: Paths) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB with one view per table that exists (partitioned dirs read with
    hive_partitioning), locked down to reading exactly those tables (see the module docstring).

    The embedding views hold published days only (:data:`PUBLISHED_ONLY`): a day that failed the
    gate or that a rollback withdrew must not reach a ranker trained offline; ``publications``
    lists every pointer move."""
    con = duckdb.connect()
    def define(name: str, rel: duckdb.DuckDBPyRelation, data: bool) -> None:
        rel.create_view(name)
    dirs, files = define_views(con, paths, define)
    lock_down(con, dirs, files)
    return con


def catalogue_path(paths: Paths) -> Path:
    return paths.home / "analytics" / "fmpipe.duckdb"


def write_catalogue(paths: Paths, out: Path | None = None) -> Path:
    """A DuckDB database file holding the same views as :func:`connect`, for any DuckDB client
    (``duckdb.connect(path, read_only=True)``, the DuckDB CLI, a BI tool), without fmpipe installed.

    Views over the Parquet and JSON files by absolute path: ``tokens`` and the other partitioned
    tables glob their ``dt=*`` folders, so new days appear without rewriting the file; the published
    embedding days, the model and gate files, the publications and the lookups are fixed when the
    file is written, so publish, rollback and training rewrite it (:func:`refresh_catalogue`). The SQL of each view is DuckDB's own rendering of the relation (``sql_query``), so
    paths are quoted by DuckDB, not by us. Written aside and renamed: a reader that has the old file
    open keeps it, a new reader sees the new one, and a crash leaves the old file whole.
    The file is not locked down: whoever may read it may read the tables it points at anyway."""
    out = out or catalogue_path(paths)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(out.parent, DIR_MODE)
    tmp = temp_sibling(out)
    con = duckdb.connect(str(tmp))

    def define(name: str, rel: duckdb.DuckDBPyRelation, data: bool) -> None:
        if data:                                    # rows held in this process: store them as a table
            rel.create(name)
        else:
            con.execute(f"CREATE VIEW {_identifier(name)} AS {rel.sql_query()}")
    try:
        define_views(con, paths, define)
        con.execute("CHECKPOINT")
    except BaseException:
        con.close()
        tmp.unlink(missing_ok=True)
        raise
    con.close()
    os.chmod(tmp, FILE_MODE)
    commit_file(tmp, out)
    return out


def refresh_catalogue(paths: Paths) -> dict:
    """Rewrite the analysts' catalogue file after a serving move (publish, rollback, promotion),
    if one was ever made with ``fmpipe sql --catalogue``: its published days, publications and
    models are fixed when written, so without this a BI tool would keep showing yesterday's
    serving state. Why a failure is only reported: the serving move has committed and must not be
    undone by a convenience file; the old file stays whole (written aside) and the next move or
    ``fmpipe sql --catalogue`` rewrites it."""
    out = catalogue_path(paths)
    if not out.exists():
        return {"catalogue": None}
    try:
        write_catalogue(paths, out)
    except (OSError, duckdb.Error, ValueError) as e:
        return {"catalogue": str(out), "catalogue_error": f"not rewritten ({type(e).__name__}: {e}); "
                f"run `fmpipe sql --catalogue` to retry"}
    return {"catalogue": str(out)}


def _identifier(name: str) -> str:
    if not re.fullmatch(r"[a-z_]+", name):          # our own view names only; never user input
        raise ValueError(f"not a view name: {name!r}")
    return name


def lock_down(con: duckdb.DuckDBPyConnection, dirs: list[str], files: list[str]) -> None:
    """No file access beyond ``dirs`` and ``files``, no extensions, and no way to undo either.

    The lists go in as bound parameters; ``allowed_*`` must be set before external access is off."""
    con.execute("SET allowed_directories = ?", [dirs])
    con.execute("SET allowed_paths = ?", [files])
    con.execute("SET enable_external_access = false")
    con.execute("SET autoinstall_known_extensions = false")
    con.execute("SET autoload_known_extensions = false")
    con.execute("SET lock_configuration = true")


def check_read_only(con: duckdb.DuckDBPyConnection, sql: str) -> None:
    """Refuse anything but SELECT (COPY, EXPORT, ATTACH, CREATE, SET, CALL, EXPLAIN ANALYZE ...)."""
    for stmt in con.extract_statements(sql):
        if stmt.type != duckdb.StatementType.SELECT:
            kind = str(stmt.type).rsplit(".", 1)[-1]
            raise ValueError(f"fmpipe sql runs read-only SELECT queries over the pipeline's views; a {kind} "
                             f"statement is not allowed (export results with the shell: fmpipe sql \"...\" > out.txt)")


def named_queries(text: str) -> dict[str, str]:
    """Split a .sql file on ``-- name: <id>`` markers."""
    parts = re.split(r"^--\s*name:\s*(\S+)\s*$", text, flags=re.M)
    return {parts[i]: parts[i + 1].strip().rstrip(";") for i in range(1, len(parts) - 1, 2)}


def query(sql: str, paths: Paths, params: dict | None = None):
    """Run one query; returns a pandas DataFrame."""
    con = connect(paths)
    try:
        check_read_only(con, sql)
        return con.execute(sql, params or {}).df()
    except duckdb.CatalogException as e:
        raise ValueError(f"{e}; available views: {_view_names(con)} (profile_embeddings and title_embeddings "
                         f"appear once a day is published, gate_results once one is validated, models once "
                         f"one is trained)") from e
    except duckdb.ParserException as e:
        raise ValueError(f"fmpipe sql: the query does not parse: {e}") from e
    except duckdb.PermissionException as e:
        raise PermissionError(f"fmpipe sql reads only the pipeline's tables under {paths.home} "
                              f"(views {_view_names(con)}): {e}") from e
    finally:
        con.close()


def _view_names(con) -> list[str]:
    return sorted(r[0] for r in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sql", nargs="?", help="a SQL query (or use --file/--name)")
    ap.add_argument("--file", type=Path, default=EXAMPLES)
    ap.add_argument("--name", help="run the named query from --file")
    ap.add_argument("--param", action="append", default=[], help="key=value bound to $key in the query")
    ap.add_argument("--list", action="store_true", help="list the named queries in --file")
    ap.add_argument("--catalogue", action="store_true",
                    help="write the views to $FMPIPE_HOME/analytics/fmpipe.duckdb, a file any DuckDB client "
                         "can open, and print its path")
    args = ap.parse_args(argv)
    if args.catalogue:
        if args.sql or args.name:
            ap.error("--catalogue writes the views' file and runs no query; query it with any DuckDB client")
        print(write_catalogue(Paths.from_env()))
        return
    named = named_queries(args.file.read_text()) if args.file.exists() else {}
    if args.list:
        print("\n".join(named))
        return
    sql = named[args.name] if args.name else args.sql
    if not sql:
        ap.error("give a query, or --name NAME (see --list)")
    given = dict(p.split("=", 1) for p in args.param)
    # every $name in the query is bound: to the given value, else NULL (queries coalesce to a default)
    used = {k: given.get(k) for k in set(re.findall(r"\$(\w+)", sql))}
    import pandas as pd
    with pd.option_context("display.max_rows", 200, "display.width", 200, "display.max_colwidth", 60):
        print(query(sql, Paths.from_env(), used).to_string(index=False))
