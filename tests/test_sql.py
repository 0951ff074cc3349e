"""``fmpipe sql`` reads the pipeline's tables and nothing else, and writes no file (issue 14):
real DuckDB over a tiny home whose path holds a quote."""
from __future__ import annotations

import datetime as dt

import pyarrow as pa
import pytest

from jobs import sql
from jobs.io import atomic_write_table, partition
from jobs.settings import Paths

D1, D2 = dt.date(2026, 11, 1), dt.date(2026, 11, 2)


def literal(path) -> str:
    """A SQL string literal of ``path`` (quotes doubled), as an analyst would type it."""
    return "'" + str(path).replace("'", "''") + "'"


@pytest.fixture
def home(tmp_path) -> Paths:
    """Two token partitions and the catalogue file, under a home whose name holds a quote."""
    paths = Paths(tmp_path / "o'brien's var")
    for day, n in ((D1, 2), (D2, 3)):
        atomic_write_table(pa.table({"profile_id": pa.array(range(n), pa.int64())}),
                           partition(paths.tokens, day) / "part-0.parquet")
    atomic_write_table(pa.table({"title_id": ["t1", "t2"]}), paths.catalogue)
    return paths


def test_views_work_under_a_home_path_with_a_quote(home):
    per_day = sql.query("SELECT dt, count(*) AS n FROM tokens GROUP BY dt ORDER BY dt", home)
    assert [str(d)[:10] for d in per_day["dt"]] == [D1.isoformat(), D2.isoformat()] and list(per_day["n"]) == [2, 3]
    assert list(sql.query("SELECT title_id FROM catalogue ORDER BY 1", home)["title_id"]) == ["t1", "t2"]
    assert sql.query("SELECT $p AS v", home, {"p": "x'; DROP VIEW tokens; --"})["v"][0].startswith("x'")


@pytest.mark.parametrize("target", ["outside", "inside"])
def test_copy_to_a_file_fails_and_writes_nothing(home, tmp_path, target):
    dest = tmp_path / "x.csv" if target == "outside" else partition(home.tokens, D1) / "x.parquet"
    before = sorted(p.name for p in dest.parent.iterdir())
    with pytest.raises(ValueError, match="read-only SELECT queries.*COPY statement is not allowed"):
        sql.query(f"COPY (SELECT * FROM tokens) TO {literal(dest)}", home)
    assert sorted(p.name for p in dest.parent.iterdir()) == before and not dest.exists()


@pytest.mark.parametrize("q", ["SELECT * FROM read_csv('/etc/passwd')", "SELECT * FROM read_text('/etc/hostname')",
                               "SELECT * FROM glob('/etc/*')"])
def test_reading_any_other_file_fails(home, q):
    with pytest.raises(PermissionError, match="reads only the pipeline's tables.*file system operations are disabled"):
        sql.query(q, home)


def test_a_file_beside_the_tables_is_not_readable_either(home):
    (home.home / "feast").mkdir(parents=True)
    (home.home / "feast" / "secret.csv").write_text("password\nhunter2\n")
    with pytest.raises(PermissionError):
        sql.query(f"SELECT * FROM read_csv({literal(home.home / 'feast' / 'secret.csv')})", home)


@pytest.mark.parametrize("q", ["SET enable_external_access = true", "ATTACH '/tmp/fmpipe-x.db'", "INSTALL httpfs",
                               "CREATE TABLE t AS SELECT 1", "EXPORT DATABASE '/tmp/fmpipe-export'",
                               "SELECT 1; COPY (SELECT 1) TO '/tmp/fmpipe-x.csv'"])
def test_statements_other_than_select_are_refused(home, q):
    with pytest.raises(ValueError, match="not allowed"):
        sql.query(q, home)


def test_the_lock_down_cannot_be_undone_on_the_connection(home):
    import duckdb
    con = sql.connect(home)
    try:
        with pytest.raises(duckdb.InvalidInputException, match="configuration has been locked"):
            con.execute("SET enable_external_access = true")
        assert con.execute("SELECT count(*) FROM tokens").fetchone()[0] == 5
    finally:
        con.close()


def _embedded(paths: Paths, day: dt.date) -> None:
    for root, key in ((paths.profile_embeddings, "profile_id"), (paths.title_embeddings, "title_id")):
        atomic_write_table(pa.table({key: pa.array([1, 2] if key == "profile_id" else ["t1", "t2"])}),
                           partition(root, day) / "part-0.parquet")


def _moved(paths: Paths, day: dt.date, seq: int, action: str = "publish") -> None:
    from jobs import publication as pubs
    pubs.root(paths).mkdir(parents=True, exist_ok=True)
    pubs._append_history(paths, {"date": day.isoformat(), "publication": f"{day}.p{seq}", "seq": seq, "action": action})


def test_embedding_views_hold_only_published_days_and_rollbacks_withdraw_them(home):
    d3, d4 = D2 + dt.timedelta(days=1), D2 + dt.timedelta(days=2)
    for day in (D1, D2, d3, d4):                                  # d4: embedded, failed the gate, never published
        _embedded(home, day)
    with pytest.raises(ValueError, match="appear once a day is published"):
        sql.query("SELECT * FROM profile_embeddings", home)
    for seq, day in enumerate((D1, D2, d3), 1):
        _moved(home, day, seq)
    days = "SELECT DISTINCT CAST(dt AS VARCHAR) AS d FROM {} ORDER BY 1"
    assert list(sql.query(days.format("profile_embeddings"), home)["d"]) == [D1.isoformat(), D2.isoformat(), d3.isoformat()]
    _moved(home, D1, 4, "rollback")                               # D2 and d3 were bad: rolled back
    for view in ("profile_embeddings", "title_embeddings"):
        assert list(sql.query(days.format(view), home)["d"]) == [D1.isoformat()]
    _moved(home, D2, 5)                                           # D2 fixed and published again
    assert list(sql.query(days.format("profile_embeddings"), home)["d"]) == [D1.isoformat(), D2.isoformat()]
    moves = sql.query("SELECT action, seq FROM publications ORDER BY seq", home)
    assert list(moves["action"]) == ["publish"] * 3 + ["rollback", "publish"]
