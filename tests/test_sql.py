"""``fmpipe sql`` reads the pipeline's tables and nothing else, and writes no file (issue 14):
real DuckDB over a tiny home whose path holds a quote."""
from __future__ import annotations

import datetime as dt

import pyarrow as pa
import pytest

from jobs.tools import sql
from jobs.core.io import atomic_write_table, partition
from jobs.core.settings import Paths

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
    from jobs.core import publication as pubs
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
    for view in ("profile_embeddings", "title_embeddings", "published_profile_embeddings", "published_title_embeddings"):
        assert list(sql.query(days.format(view), home)["d"]) == [D1.isoformat()]
    _moved(home, D2, 5)                                           # D2 fixed and published again
    assert list(sql.query(days.format("profile_embeddings"), home)["d"]) == [D1.isoformat(), D2.isoformat()]
    moves = sql.query("SELECT action, seq FROM publications ORDER BY seq", home)
    assert list(moves["action"]) == ["publish"] * 3 + ["rollback", "publish"]


# ---------------------------------------------------------------------------------------------
# Analysts' views (issue 17): decoded tokens, gate results, model versions, the catalogue file
# ---------------------------------------------------------------------------------------------
import json  # noqa: E402

import fm.schema as S  # noqa: E402


def _tokens(paths: Paths, day: dt.date) -> None:
    """Two tokens in tokenize's encoding: a play of t2 on the kids canvas on a TV, 13:00 UTC on a
    Sunday, and an action tokenize did not know (OOV) with an unknown locale."""
    ids = lambda values, v: S.vocab_index(values)[v]  # noqa: E731
    atomic_write_table(pa.table({
        "profile_id": pa.array([1, 2], pa.int64()), "event_id": ["e1", "e2"],
        "ts": pa.array([dt.datetime(2026, 11, 1, 13, tzinfo=dt.timezone.utc)] * 2, pa.timestamp("us", tz="UTC")),
        "seq": pa.array([1, 2], pa.int64()),
        "title": pa.array([3, 2], pa.int32()), "action": pa.array([ids(S.ACTIONS, "play"), S.OOV], pa.int32()),
        "duration": pa.array([5, 2], pa.int32()), "device": pa.array([ids(S.DEVICES, "tv")] * 2, pa.int32()),
        "canvas": pa.array([ids(S.CANVASES, "kids")] * 2, pa.int32()),
        "locale": pa.array([ids(S.LOCALES, "fr-FR"), S.OOV], pa.int32()), "row": pa.array([2, 2], pa.int32()),
        "hour": pa.array([S.N_SPECIAL + 13] * 2, pa.int32()), "dow": pa.array([S.N_SPECIAL + 0] * 2, pa.int32()),
        "gap": pa.array([1, 1], pa.int32()), "n_events": pa.array([3, 1], pa.int32())}),
        partition(paths.tokens, day) / "part-0.parquet")


@pytest.fixture
def analyst_home(home) -> Paths:
    """``home`` plus decodable tokens, a title vocabulary and named catalogue, gate results for two
    dates (one failed), two model checkpoints (v2 serving) and a writer's half-saved checkpoint."""
    import shutil
    shutil.rmtree(partition(home.tokens, D2))
    _tokens(home, D1)
    atomic_write_table(pa.table({"title_id": ["t1", "t2"], "idx": pa.array([2, 3], pa.int32())}), home.title_vocab)
    atomic_write_table(pa.table({"title_id": ["t1", "t2"], "name": ["Alpha", "Beta"]}), home.catalogue)
    for day, ok in ((D1, True), (D2, False)):
        suites = [{"suite": "tokens", "success": True, "failures": [], "params": {"max__title": 3}},
                  {"suite": "profile_embeddings", "success": ok, "failures": [] if ok else ["norm"], "context": {}}]
        (partition(home.gx / "results", day)).mkdir(parents=True)
        (partition(home.gx / "results", day) / "summary.json").write_text(json.dumps(
            {"date": day.isoformat(), "success": ok, "suites": suites, "inputs_sha256": "abc", "inputs": {}}))
        (partition(home.gx / "results", day) / "tokens.json").write_text("{}")     # GE's full result: not a view
    for version, parent, ndcg, promote in (("v1", None, 0.4, True), ("v2", "v1", 0.5, True), (".v3.tmp-1", "v2", 0.9, True)):
        (home.models / version).mkdir(parents=True)
        (home.models / version / "config.json").write_text(json.dumps({
            "model_version": version, "parent": parent, "model_config": {"n_layers": 2, "d_model": 32},
            "data_range": {"history_state": D1.isoformat(), "profiles_trained": 10},
            "metrics": {"best": {"ndcg@10": ndcg, "hr@10": 0.8}, "history": [1, 2]},
            "gate": {"promote": promote, "reason": "promote=always"}, "n_params": 100, "vocab_size": 2}))
        (home.models / version / "model.safetensors").write_bytes(b"weights")
    (home.models / "CURRENT.json").write_text(json.dumps({"version": "v2", "promoted_at": "2026-11-01T10:00:00+00:00"}))
    return home


def test_lookup_views_follow_the_tokenizer_encoding(analyst_home):
    for view, (field, values) in sql.lookups().items():
        rows = sql.query(f"SELECT id, name FROM {view} ORDER BY id", analyst_home)
        assert dict(zip(rows["name"][2:], rows["id"][2:])) == S.vocab_index(values), view
        assert list(rows["name"][:2]) == ["<pad>", "<unknown>"] and len(rows) == S.vocab_size(values)
    assert sql.query("SELECT name FROM weekdays WHERE id = $i", analyst_home, {"i": S.N_SPECIAL})["name"][0] == "Sunday"


def test_tokens_decoded_names_every_id(analyst_home):
    rows = sql.query("SELECT * FROM tokens_decoded ORDER BY seq", analyst_home).to_dict("records")
    assert [(r["title_id"], r["title_name"], r["action"], r["device"], r["canvas"], r["locale"], r["hour_utc"],
             r["weekday"]) for r in rows] == [("t2", "Beta", "play", "tv", "kids", "fr-FR", "13", "Sunday"),
                                              ("t1", "Alpha", "<unknown>", "tv", "kids", "<unknown>", "13", "Sunday")]
    assert [r["n_events"] for r in rows] == [3, 1] and str(rows[0]["dt"])[:10] == D1.isoformat()


def test_tokens_decoded_exists_before_the_title_vocabulary(home):
    _tokens(home, D2)
    rows = sql.query("SELECT title_id, title_name, action FROM tokens_decoded WHERE event_id IS NOT NULL ORDER BY seq", home)
    assert rows["title_id"].isna().all() and list(rows["action"]) == ["play", "<unknown>"]


def test_gate_results_view(analyst_home):
    g = sql.query("SELECT CAST(date AS VARCHAR) AS d, success, suites, failed_suites, detail FROM gate_results "
                  "ORDER BY date", analyst_home).to_dict("records")
    assert [(r["d"], r["success"], list(r["failed_suites"])) for r in g] == \
        [(D1.isoformat(), True, []), (D2.isoformat(), False, ["profile_embeddings"])]
    assert [s["suite"] for s in g[0]["suites"]] == ["tokens", "profile_embeddings"]
    assert json.loads(g[1]["detail"])[1]["failures"] == ["norm"]


def test_models_view_shows_versions_lineage_metrics_and_the_serving_one(analyst_home):
    m = sql.query("SELECT version, parent, CAST(trained_through AS VARCHAR) AS t, valid_ndcg_10, promoted, current, "
                  "n_layers FROM models ORDER BY version", analyst_home).to_dict("records")
    assert [(r["version"], r["parent"], r["t"], r["valid_ndcg_10"], r["promoted"], r["current"], r["n_layers"])
            for r in m] == [("v1", None, D1.isoformat(), 0.4, True, False, 2), ("v2", "v1", D1.isoformat(), 0.5, True, True, 2)]
    assert sql.query("SELECT version FROM current_model", analyst_home)["version"][0] == "v2"


def test_a_damaged_model_or_gate_file_drops_its_row_not_the_views(analyst_home):
    (analyst_home.models / "v1" / "config.json").write_text('{"model_version": "v1", "par')
    (partition(analyst_home.gx / "results", D2) / "summary.json").write_text("[]")
    (analyst_home.models / "CURRENT.json").write_text("")
    assert sql.query("SELECT version, current FROM models", analyst_home).to_dict("records") == \
        [{"version": "v2", "current": False}]
    assert len(sql.query("SELECT * FROM gate_results", analyst_home)) == 1


@pytest.mark.parametrize("rel", ["models/v1/model.safetensors", "models/.v3.tmp-1/config.json",
                                 "gx/results/dt=2026-11-01/tokens.json"])
def test_only_the_gate_and_model_json_files_are_readable_beside_them(analyst_home, rel):
    with pytest.raises(PermissionError, match="reads only the pipeline's tables"):
        sql.query(f"SELECT * FROM read_blob({literal(analyst_home.home / rel)})", analyst_home)


def _published(paths: Paths) -> None:
    for day in (D1, D2):
        atomic_write_table(pa.table({"profile_id": pa.array([1, 2], pa.int64()),
                                     "emb_layer2_last": [[1.0, 0.0], [0.0, 1.0] if day == D1 else [1.0, 0.0]]}),
                           partition(paths.profile_embeddings, day) / "part-0.parquet")
        atomic_write_table(pa.table({"title_id": ["t1", "t2"], "title_embedding": [[1.0, 0.0], [0.0, 1.0]]}),
                           partition(paths.title_embeddings, day) / "part-0.parquet")
    _moved(paths, D1, 1)
    _moved(paths, D2, 2)


def test_the_catalogue_file_opens_in_a_plain_duckdb_client_with_the_same_views(analyst_home, monkeypatch, capsys):
    import duckdb
    _published(analyst_home)
    monkeypatch.setenv("FMPIPE_HOME", str(analyst_home.home))
    sql.main(["--catalogue"])
    path = sql.catalogue_path(analyst_home)
    assert capsys.readouterr().out.strip() == str(path)
    assert oct(path.stat().st_mode & 0o777) == oct(0o640) and [p.name for p in path.parent.iterdir()] == [path.name]
    con = duckdb.connect(str(path), read_only=True)                     # no fmpipe code from here on
    try:
        names = {r[0] for r in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()} | \
            {r[0] for r in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
        assert names == set(_view_names_of(analyst_home))
        assert con.execute("SELECT count(*), count(DISTINCT dt) FROM profile_embeddings").fetchone() == (4, 2)
        assert con.execute("SELECT name FROM actions WHERE id = 3").fetchone()[0] == "play"
        assert con.execute("SELECT title_name, canvas FROM tokens_decoded ORDER BY seq").fetchall() == \
            [("Beta", "kids"), ("Alpha", "kids")]
        assert con.execute("SELECT version FROM models WHERE current").fetchall() == [("v2",)]
        assert con.execute("SELECT list_sort(list(success)) FROM gate_results").fetchone()[0] == [False, True]
        assert con.execute("SELECT count(*) FROM publications").fetchone()[0] == 2
    finally:
        con.close()
    _moved(analyst_home, D1, 3, "rollback")                               # rewritten after a rollback
    sql.write_catalogue(analyst_home)
    with duckdb.connect(str(path), read_only=True) as con:
        assert con.execute("SELECT DISTINCT CAST(dt AS VARCHAR) FROM profile_embeddings").fetchall() == [(D1.isoformat(),)]


def _view_names_of(paths: Paths) -> list[str]:
    con = sql.connect(paths)
    try:
        return sql._view_names(con)
    finally:
        con.close()


def test_the_catalogue_refuses_a_query_and_a_failed_write_leaves_the_old_file(analyst_home, monkeypatch):
    monkeypatch.setenv("FMPIPE_HOME", str(analyst_home.home))
    with pytest.raises(SystemExit):
        sql.main(["--catalogue", "SELECT 1"])
    out = sql.write_catalogue(analyst_home)
    before = out.read_bytes()
    monkeypatch.setattr(sql, "gate_summaries", lambda paths: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        sql.write_catalogue(analyst_home)
    assert out.read_bytes() == before and [p.name for p in out.parent.iterdir()] == [out.name]


def test_the_new_example_queries_run(analyst_home):
    _published(analyst_home)
    queries = sql.named_queries(sql.EXAMPLES.read_text())
    canvas = sql.query(queries["actions_per_canvas"], analyst_home)
    assert set(zip(canvas["canvas"], canvas["action"])) == {("kids", "play"), ("kids", "<unknown>")}
    audit = sql.query(queries["publication_audit"], analyst_home)
    assert list(audit["gate_passed"]) == [True, False] and list(audit["failed_suites"][1]) == ["profile_embeddings"]
    moved = sql.query(queries["taste_moved_most"], analyst_home)
    assert list(moved["profile_id"]) == [2, 1] and list(moved["cosine"]) == [0.0, 1.0]
    assert moved["most_seen_title"].isna().all()          # their tokens are on D1, before the window's days
