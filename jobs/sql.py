"""``fmpipe sql "<query>"``: analysts query the pipeline's tables with SQL, no Python needed.

DuckDB runs over the partitioned Parquet under ``$FMPIPE_HOME`` (read-only); every table is a view
and ``dt`` partitions are columns. Views: raw_events, quarantine, tokens, history, title_vocab,
catalogue, profile_embeddings, title_embeddings (published days only: not a day that failed the gate
or was rolled back), publications (every pointer move). Example queries: ``docs/queries.sql``
(``fmpipe sql --file docs/queries.sql --name nearest_titles``).

It reads the pipeline's tables and nothing else, and writes no file, because an analyst's query
string is untrusted input on a machine that holds credentials and the serving state:

* views are created through DuckDB's relation API, so the table paths are values, never SQL text
  (a ``$FMPIPE_HOME`` with a quote in it neither breaks nor injects into the view DDL);
* then external access is switched off (``enable_external_access=false``) except for exactly the
  views' directories and files (``allowed_directories`` / ``allowed_paths``), and the configuration
  is locked (``lock_configuration=true``), so ``read_csv('/etc/passwd')``, ``ATTACH``, ``INSTALL``
  and ``SET`` are refused by DuckDB itself;
* only ``SELECT`` statements run (checked on DuckDB's own parse of every statement): the allowed
  directories would otherwise accept ``COPY ... TO`` into the pipeline's own tables.
"""
from __future__ import annotations

import argparse
import datetime as dt
import re
from pathlib import Path

import duckdb
import pyarrow as pa

from jobs.io import partition
from jobs.settings import REPO_ROOT, Paths

EXAMPLES = REPO_ROOT / "docs" / "queries.sql"
PUBLISHED_ONLY = ("profile_embeddings", "title_embeddings")
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


def connect(paths: Paths) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB with one view per table that exists (partitioned dirs read with
    hive_partitioning), locked down to reading exactly those tables (see the module docstring).

    The embedding views hold published days only (:data:`PUBLISHED_ONLY`): a day that failed the
    gate or that a rollback withdrew must not reach a ranker trained offline; ``publications``
    lists every pointer move."""
    from jobs.publication import history
    from jobs.rollback import published_dates
    con = duckdb.connect()
    dirs, files = [], []
    days = published_dates(paths)
    moves = history(paths)
    if moves:
        con.from_arrow(pa.Table.from_pylist([{k: r.get(k) for k in PUBLICATION_COLUMNS} for r in moves])) \
            .create_view("publications")
    for name, path in views(paths).items():
        if name in PUBLISHED_ONLY:
            chosen = published_files(path, days) if path.is_dir() else []
            if chosen:
                con.read_parquet(chosen, hive_partitioning=True, union_by_name=True).create_view(name)
                dirs.append(f"{path}/")
        elif path.is_file():
            con.read_parquet(str(path)).create_view(name)
            files.append(str(path))
        elif path.is_dir() and any(path.glob("dt=*/*.parquet")):
            con.read_parquet(str(path / "dt=*" / "*.parquet"), hive_partitioning=True,
                             union_by_name=True).create_view(name)
            dirs.append(f"{path}/")                 # trailing slash: tokens/ must not allow tokens2/
    lock_down(con, dirs, files)
    return con


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
                         f"appear once a day is published)") from e
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
    args = ap.parse_args(argv)
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
