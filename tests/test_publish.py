"""Publication on a synthetic FMPIPE_HOME (no Spark, no model): real Feast apply, online writes
through the provider, reads through ``get_online_features``, point-in-time historical reads, the
atomic swap, failure midway, rollback (instant and rebuilt), idempotent re-runs, and retrieval."""
from __future__ import annotations

import datetime as dt
import json
import os
import sqlite3

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fm.schema import (ACTIONS, HISTORY_SCHEMA, TITLE_VOCAB_SCHEMA, TOKEN_FIELDS, profile_embedding_schema,
                       title_embedding_schema, vocab_index)
from jobs.core import publication as pubs
from jobs import publish
from jobs import rollback as rb
from jobs.core import verdict
from jobs.embed import published_at
from jobs.core.io import atomic_write_json, atomic_write_table, partition
from jobs.core.settings import Paths

LAYERS = ("emb_layer1_last", "emb_layer2_last", "emb_layer2_mean")
D1, D2, D3 = dt.date(2026, 11, 1), dt.date(2026, 11, 2), dt.date(2026, 11, 3)
DIM, TITLES = 16, 40


def _vec(rng, n):
    v = rng.standard_normal((n, DIM)).astype(np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1)), DIM).cast(pa.list_(pa.float32())), v


def write_day(paths: Paths, day: dt.date, pids, version: str, seed: int) -> dict:
    """The embed job's outputs for one day (profile + title partitions) and a passed gate."""
    rng = np.random.default_rng(seed)
    stamp, n = published_at(day), len(pids)
    cols = {"profile_id": pa.array(pids, pa.int64()), "event_timestamp": pa.array([stamp] * n, pa.timestamp("us", tz="UTC")),
            "model_version": pa.array([version] * n)}
    vecs = {}
    for layer in LAYERS:
        cols[layer], vecs[layer] = _vec(rng, n)
    p = partition(paths.profile_embeddings, day)
    p.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(cols, schema=profile_embedding_schema(list(LAYERS))), p / "part-0.parquet")
    tarr, tv = _vec(rng, TITLES)
    t = partition(paths.title_embeddings, day)
    t.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"title_id": [f"t{i:03d}" for i in range(TITLES)], "event_timestamp": [stamp] * TITLES,
                             "model_version": [version] * TITLES, "is_new": [False] * TITLES, "title_embedding": tarr},
                            schema=title_embedding_schema()), t / "part-0.parquet")
    validated(paths, day)
    return {"pids": list(pids), "version": version, "profile": vecs, "titles": tv}


def validated(paths: Paths, day: dt.date) -> None:
    """A passed gate bound to the day's partitions as they are now (what a validate run stores)."""
    atomic_write_json(verdict.bind({"date": day.isoformat(), "success": True, "suites": []}, verdict.inputs(paths, day)),
                      verdict.summary_path(paths, day))


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    home = tmp_path_factory.mktemp("pub") / "var"
    old = os.environ.get("FMPIPE_HOME")
    os.environ["FMPIPE_HOME"] = str(home)
    paths = Paths.from_env()
    days = {D1: write_day(paths, D1, range(0, 60), "m1", 1), D2: write_day(paths, D2, range(30, 90), "m2", 2),
            D3: write_day(paths, D3, range(80, 100), "m3", 3)}
    yield {"paths": paths, "days": days}
    if old is None:
        os.environ.pop("FMPIPE_HOME", None)
    else:
        os.environ["FMPIPE_HOME"] = old


def run_publish(paths, day, **kw):
    return publish.run(publish.PublishConfig(date=day.isoformat(), **kw), paths)


def online(paths, pids, features=("emb_layer2_last", "model_version")) -> dict:
    from jobs.core.feast_store import get_store
    store = get_store(paths)
    return store.get_online_features(features=[f"profile_embeddings:{f}" for f in features],
                                     entity_rows=[{"profile_id": int(p)} for p in pids]).to_dict()


def expect(synth, day, pid, layer="emb_layer2_last"):
    d = synth["days"][day]
    return d["profile"][layer][d["pids"].index(pid)]


def test_online_rows_are_identical_to_feasts_own_conversion(synth):
    from feast.utils import _convert_arrow_to_proto
    from jobs.core.feast_store import get_store, load_definitions, online_rows
    paths = synth["paths"]
    store = get_store(paths)
    store.apply(load_definitions(paths))
    for fv_name, root in (("profile_embeddings", paths.profile_embeddings), ("title_embeddings", paths.title_embeddings)):
        fv = store.get_feature_view(fv_name)
        batch = pq.read_table(partition(root, D1)).slice(0, 25).combine_chunks().to_batches()[0]
        ours = online_rows(fv, batch)
        theirs = _convert_arrow_to_proto(batch, fv, {c.name: c.dtype.to_value_type() for c in fv.entity_columns})
        assert len(ours) == len(theirs) == 25
        for (k1, v1, t1, c1), (k2, v2, t2, c2) in zip(ours, theirs):
            assert k1 == k2 and t1 == t2 and c1 == c2
            assert {n: v.SerializeToString() for n, v in v1.items()} == {n: v.SerializeToString() for n, v in v2.items()}
        # rows are written in the online table's primary-key order (Feast's serialized entity key)
        from feast.infra.key_encoding_utils import serialize_entity_key
        sample = pq.read_table(partition(root, D1))
        if fv_name == "profile_embeddings":
            sample = sample.set_column(0, "profile_id", pa.array([-5, 300, 2**40, 7, 256, 1] + list(range(8, 62)), pa.int64()))
        keys = [serialize_entity_key(r[0], 3) for r in online_rows(fv, pubs.in_key_order(fv, sample))]
        assert keys == sorted(keys) and len(set(keys)) == sample.num_rows


def test_direct_sqlite_rows_are_byte_identical_to_feasts_online_write_batch(synth):
    """The publisher writes SQLite rows itself (jobs.core.sqlite_rows); every stored byte equals what
    Feast's own online_write_batch stores for the same batch: odd keys, string keys, a null vector."""
    import copy
    from jobs.core import sqlite_rows
    from jobs.core.feast_store import get_store, load_definitions, online_rows
    paths = synth["paths"]
    store = get_store(paths)
    store.apply(load_definitions(paths))
    assert sqlite_rows.covers(store)
    provider = store._get_provider()
    conn = provider.online_store._get_conn(store.config)
    for fv_name, root in (("profile_embeddings", paths.profile_embeddings), ("title_embeddings", paths.title_embeddings)):
        fv = store.get_feature_view(fv_name)
        t = pq.read_table(partition(root, D1)).slice(0, 30)
        if fv_name == "profile_embeddings":
            t = t.set_column(0, "profile_id", pa.array([-5, 300, 2**40, 0] + list(range(8, 34)), pa.int64()))
            i = t.schema.get_field_index("emb_layer1_last")
            t = t.set_column(i, t.schema.field(i), pa.array([None] + t[i].to_pylist()[1:], t.schema.field(i).type))
        batch = t.combine_chunks().to_batches()[0]
        ddl = conn.execute("SELECT sql FROM sqlite_master WHERE name=?", (f"{store.project}_{fv_name}",)).fetchone()[0]
        got = {}
        for who in ("feast", "ours"):
            view = copy.copy(fv)
            view.name = f"{fv_name}_{who}"
            table = f"{store.project}_{view.name}"
            conn.execute(f'DROP TABLE IF EXISTS "{table}"')
            conn.execute(ddl.replace(f'"{store.project}_{fv_name}"', f'"{table}"', 1))
            if who == "feast":
                provider.online_write_batch(store.config, view, online_rows(view, batch), None)
            else:
                sqlite_rows.write(conn, table, view, batch, store.config.entity_key_serialization_version)
            got[who] = conn.execute(f'SELECT entity_key, feature_name, value, value_text, event_ts, created_ts '
                                    f'FROM "{table}" ORDER BY entity_key, feature_name').fetchall()
            conn.execute(f'DROP TABLE "{table}"')
        assert len(got["ours"]) == 30 * len(fv.features) and got["ours"] == got["feast"]
    conn.commit()


def test_two_days_publish_incrementally_and_read_back_online(synth):
    paths = synth["paths"]
    r1 = run_publish(paths, D1)
    assert r1["materialized_rows"] == {"profile": 60, "title": TITLES} and r1["atomic_swap"]
    r2 = run_publish(paths, D2)
    assert r2["base"] == r1["publication"] and r2["carried_rows"]["profile_embeddings"] == 30 * 4   # pids 0..29 x 4 fields
    got = online(paths, [10, 40, 70, 999])
    assert got["model_version"] == ["m1", "m2", "m2", None]                    # 10 only active on D1: carried
    np.testing.assert_allclose(got["emb_layer2_last"][0], expect(synth, D1, 10), rtol=0, atol=0)
    np.testing.assert_allclose(got["emb_layer2_last"][1], expect(synth, D2, 40), rtol=0, atol=0)
    assert got["emb_layer2_last"][3] is None
    cur = pubs.current(paths)
    assert cur["date"] == D2.isoformat() and cur["publication"] == r2["publication"]
    from jobs.index import ProfileIndex, TitleIndex
    ix = TitleIndex.current(paths)
    assert ix.meta["date"] == D2.isoformat() and ix.meta["model_version"] == "m2" and ix.similar_titles("t005", 3)[0][0] == "t005"
    assert ProfileIndex.current(paths).similar_profiles(40, 5)[0][0] == 40


def test_without_a_retained_base_the_state_is_seeded_from_offline_identically(synth, tmp_path, live_state):
    """Publishing D2 into an empty store seeds D1's still-valid rows from Parquet: the same state as
    publishing D1 then D2 (what a lost snapshot or a first run after an upgrade relies on)."""
    paths = synth["paths"]
    run_publish(paths, D1)
    run_publish(paths, D2)
    incremental = live_state(paths)
    fresh = Paths(tmp_path / "var")
    write_day(fresh, D1, range(0, 60), "m1", 1)
    write_day(fresh, D2, range(30, 90), "m2", 2)
    os.environ["FMPIPE_HOME"] = str(fresh.home)
    try:
        r = run_publish(fresh, D2)
        assert r["base"] is None and r["seeded_rows"]["profile_embeddings"] == 30
        assert live_state(fresh) == incremental
    finally:
        os.environ["FMPIPE_HOME"] = str(paths.home)


def test_point_in_time_historical_features_pick_each_dates_vectors(synth):
    from jobs.core.feast_store import get_store
    paths = synth["paths"]
    store = get_store(paths)
    entity_df = pd.DataFrame({"profile_id": [40, 40, 10],
                              "event_timestamp": [published_at(D1) + dt.timedelta(hours=3),
                                                  published_at(D2) + dt.timedelta(hours=3),
                                                  published_at(D2) + dt.timedelta(hours=3)]})
    df = store.get_historical_features(entity_df=entity_df, features=["profile_embeddings:emb_layer2_last",
                                                                      "profile_embeddings:model_version"]).to_df()
    df = df.sort_values("event_timestamp", kind="stable").reset_index(drop=True)
    rows = {(r.profile_id, r.event_timestamp.date()): r for r in df.itertuples()}
    a, b, c = rows[(40, D2)], rows[(40, D3)], rows[(10, D3)]
    assert (a.model_version, b.model_version, c.model_version) == ("m1", "m2", "m1")
    np.testing.assert_allclose(a.emb_layer2_last, expect(synth, D1, 40))
    np.testing.assert_allclose(b.emb_layer2_last, expect(synth, D2, 40))


def test_republishing_a_date_is_idempotent(synth, live_state):
    paths = synth["paths"]
    before = live_state(paths)
    again = run_publish(paths, D2)
    assert again["base"] is not None and again["base"].startswith(D1.isoformat())
    assert live_state(paths) == before
    mat = run_publish(paths, D2, method="materialize")                   # stock Feast path: same values
    assert live_state(paths) == before and mat["method"] == "materialize"


def test_stock_materialize_publishes_a_new_day_as_the_direct_writer_does(tmp_path, monkeypatch, live_state):
    """``method=materialize`` (Feast's own engine) on days never published before serves the same
    bytes as the default writer: Feast 0.67 reads the view's ``source``/``data_source``, not only
    ``batch_source``, and pointing only the latter at the unpublished day read nothing."""
    states = {}
    for method in ("write", "materialize"):
        paths = Paths(tmp_path / method)
        monkeypatch.setenv("FMPIPE_HOME", str(paths.home))
        write_day(paths, D1, range(0, 60), "m1", 1)
        write_day(paths, D2, range(30, 90), "m2", 2)
        for day in (D1, D2):
            assert run_publish(paths, day, method=method)["method"] == method
        states[method] = live_state(paths)
        assert online(paths, [85])["model_version"] == ["m2"]
    assert states["write"] == states["materialize"]


def test_an_older_date_never_moves_serving_backwards(tmp_path, monkeypatch, live_state):
    """Serving D2: re-publishing D1 unchanged is a no-op; a changed D1 is refused naming both dates
    and the ways forward, also when ``commit`` is called directly; ``force`` then D2 brings it forward."""
    from jobs.core.feast_store import get_store
    paths = Paths(tmp_path / "var")
    monkeypatch.setenv("FMPIPE_HOME", str(paths.home))
    write_day(paths, D1, range(0, 60), "m1", 1)
    write_day(paths, D2, range(30, 90), "m2", 2)
    run_publish(paths, D1)
    r2 = run_publish(paths, D2)
    d2_state, d2_pointer = live_state(paths), pubs.current(paths)
    same = run_publish(paths, D1)                                  # an Airflow clear of an unchanged day
    assert same["action"] == "noop" and same["serving"]["publication"] == r2["publication"]
    assert pubs.current(paths) == d2_pointer and live_state(paths) == d2_state
    fixed = write_day(paths, D1, range(0, 60), "m1", 7)            # D1 re-embedded: new content
    with pytest.raises(pubs.PublishOrderError) as err:
        run_publish(paths, D1)
    msg = str(err.value)
    assert "refusing to publish 2026-11-01: serving is already at the later date 2026-11-02" in msg
    assert "fmpipe backfill --start 2026-11-01 --end 2026-11-02 publish.force=true" in msg
    assert "fmpipe rollback --to 2026-11-01" in msg and "force=true" in msg
    assert pubs.current(paths) == d2_pointer and live_state(paths) == d2_state
    assert pubs.current(paths)["date"] == D2.isoformat() and online(paths, [10])["model_version"] == ["m1"]
    tables = pubs.OnlineTables(get_store(paths))                   # no caller can bypass the check
    try:
        with pytest.raises(pubs.PublishOrderError, match="serving is already at the later date 2026-11-02"):
            pubs.commit(paths, tables, pubs.new_id(D1), D1, {}, None, "m1", "publish")
    finally:
        tables.close()
    assert pubs.current(paths) == d2_pointer and live_state(paths) == d2_state
    # the way forward the message names: D1 forced, then D2 re-run on top of it
    assert run_publish(paths, D1, force=True)["date"] == D1.isoformat()
    assert pubs.manifest(paths, pubs.current(paths)["publication"])["forced"] is True
    again = run_publish(paths, D2)
    assert pubs.current(paths)["publication"] == again["publication"] and again["base"].startswith(D1.isoformat())
    got = online(paths, [10, 40])
    assert got["model_version"] == ["m1", "m2"]
    np.testing.assert_allclose(got["emb_layer2_last"][0], fixed["profile"]["emb_layer2_last"][10], rtol=0, atol=0)


def test_online_store_is_in_wal_mode_so_a_writer_never_blocks_feast_readers(tmp_path, monkeypatch):
    """The store a publish opened reports journal_mode=wal (persistent, for every process); while
    the publisher holds an exclusive write transaction (a large copy-forward), a Feast reader still
    reads the committed day instead of failing with "database is locked"."""
    from jobs.core.feast_store import get_store
    paths = Paths(tmp_path / "var")
    monkeypatch.setenv("FMPIPE_HOME", str(paths.home))
    day = write_day(paths, D1, range(0, 20), "m1", 1)
    run_publish(paths, D1)
    with sqlite3.connect(paths.feast / "online.db") as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    tables = pubs.OnlineTables(get_store(paths))
    try:
        assert tables.conn().execute("PRAGMA synchronous").fetchone()[0] == 2            # FULL: commits fsynced
        tables.conn().execute("BEGIN EXCLUSIVE")
        tables.conn().execute(f'DELETE FROM "{tables.live("profile_embeddings")}"')      # uncommitted
        got = online(paths, [10])                    # Feast's own reader, its own connection
        assert got["model_version"] == ["m1"]
        np.testing.assert_allclose(got["emb_layer2_last"][0], day["profile"]["emb_layer2_last"][10], rtol=0, atol=0)
        tables.conn().execute("ROLLBACK")
    finally:
        tables.close()


def test_failure_midway_leaves_yesterdays_publication_serving(synth, monkeypatch, live_state):
    from jobs.index import TitleIndex
    paths = synth["paths"]
    run_publish(paths, D2)
    before, pointer = live_state(paths), pubs.current(paths)
    from jobs.core import sqlite_rows
    real, calls = sqlite_rows.write, []

    def flaky(conn, table, fv, batch, version):
        calls.append(batch.num_rows)
        if len(calls) > 1:
            raise OSError("disk full (injected)")
        return real(conn, table, fv, batch, version)
    monkeypatch.setattr(sqlite_rows, "write", flaky)
    with pytest.raises(OSError, match="injected"):
        run_publish(paths, D3, batch_rows=5)
    monkeypatch.undo()
    assert calls[0] == 5                                       # the first batch really was written (to staging)
    assert pubs.current(paths) == pointer and live_state(paths) == before
    got = online(paths, [40, 85])
    assert got["model_version"] == ["m2", "m2"]
    np.testing.assert_allclose(got["emb_layer2_last"][0], expect(synth, D2, 40))
    assert TitleIndex.current(paths).meta["date"] == D2.isoformat()
    # the next successful run cleans the leftovers
    run_publish(paths, D3)
    con = sqlite3.connect(paths.feast / "online.db")
    names = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")]
    con.close()
    assert not [n for n in names if "__stage_" in n]
    assert all(json.loads((d / "manifest.json").read_text())["status"] == "committed"
               for d in pubs.root(paths).iterdir() if d.is_dir() and not d.name.startswith("."))


def publish_crashing_before_current_json(paths, day, monkeypatch) -> None:
    """Publish ``day`` but die where CURRENT.json would be written: after the swap transaction."""
    real = pubs.atomic_write_json

    def crash_on_pointer(obj, path):
        if path == pubs.pointer_path(paths):
            raise KeyboardInterrupt("killed before CURRENT.json (injected)")
        return real(obj, path)
    monkeypatch.setattr(pubs, "atomic_write_json", crash_on_pointer)
    with pytest.raises(KeyboardInterrupt):
        run_publish(paths, day)
    monkeypatch.undo()


def test_a_crash_after_the_swap_has_published_whole_and_the_next_run_finishes_the_files(synth, monkeypatch, live_state):
    from jobs.index import TitleIndex
    paths = synth["paths"]
    run_publish(paths, D2, force=True)                  # serve D2 again (D3 served before)
    d2_pointer = pubs.current(paths)
    publish_crashing_before_current_json(paths, D3, monkeypatch)
    # the swap transaction is the commit point: features, pointer and index all say D3 already
    on_disk = json.loads(pubs.pointer_path(paths).read_text())
    assert on_disk == d2_pointer
    cur = pubs.current(paths)
    assert cur["date"] == D3.isoformat() and cur["seq"] == d2_pointer["seq"] + 1 and cur["previous"] == d2_pointer["publication"]
    assert online(paths, [85])["model_version"] == ["m3"]
    assert TitleIndex.current(paths).meta["date"] == D3.isoformat()
    d3_state = live_state(paths)
    # the next pointer move (here an index build for D3) first finishes the files, state untouched
    from jobs import index as ix
    assert ix.run(ix.IndexConfig(date=D3.isoformat()), paths)["reused"]
    assert json.loads(pubs.pointer_path(paths).read_text()) == cur == pubs.current(paths)
    assert pubs.manifest(paths, cur["publication"])["status"] == "committed"
    seqs = [r["seq"] for r in pubs.history(paths)]
    assert seqs == sorted(set(seqs)) and pubs.history(paths)[-1] == cur and live_state(paths) == d3_state
    # and a re-run of D3 builds on D2 (not on the crashed attempt) and serves the same values
    again = run_publish(paths, D3)
    assert again["previous"] == cur["publication"] and live_state(paths) == d3_state


def test_live_tables_that_disagree_with_the_pointer_are_put_back(synth, monkeypatch, live_state):
    """A store whose swap stored no pointer record (written by a version before the record existed,
    or edited by hand) and a publisher killed after that swap: the next run serves the pointer's day
    again instead of filing the stray state under the wrong publication."""
    from jobs.core.feast_store import get_store
    paths = synth["paths"]
    run_publish(paths, D2, force=True)
    d2_state, d2_pointer = live_state(paths), pubs.current(paths)
    publish_crashing_before_current_json(paths, D3, monkeypatch)
    with sqlite3.connect(paths.feast / "online.db") as con:
        con.execute(f"DELETE FROM {pubs.POINTER_TABLE}")
    assert pubs.current(paths) == d2_pointer and live_state(paths) != d2_state
    tables = pubs.OnlineTables(get_store(paths))
    try:
        assert pubs.reconcile(paths, tables) == d2_pointer["publication"]
    finally:
        tables.close()
    assert live_state(paths) == d2_state and online(paths, [85])["model_version"] == ["m2"]


@pytest.mark.parametrize("point, serves", [("publish.staged_view", D2), ("publish.swapped", D3)],
                         ids=["before_the_commit", "after_the_commit"])
def test_kill_9_mid_publish_serves_one_whole_day_and_the_rerun_equals_the_undisturbed_run(synth, live_state, point, serves):
    """A real ``kill -9`` of a publisher process at a failpoint: before the commit (one view staged)
    yesterday stays served whole, after it (swapped, CURRENT.json not written) today is served
    whole; either way the re-run publishes exactly what an undisturbed run publishes."""
    import signal
    import subprocess
    import sys
    import time
    from jobs.core.feast_store import get_store
    from jobs.index import TitleIndex
    from jobs.core.settings import REPO_ROOT
    paths = synth["paths"]
    run_publish(paths, D2, force=True)
    d2_state = live_state(paths)
    run_publish(paths, D3)
    d3_state = live_state(paths)
    rb.rollback(rb.RollbackConfig(to=D2.isoformat()), paths)
    assert live_state(paths) == d2_state
    rb.release(paths)                                                # the rollback pin, released: D3 may go again
    marker = paths.home / f"reached-{point}"
    env = {**os.environ, "FMPIPE_HOME": str(paths.home), "FMPIPE_FAILPOINT": point, "FMPIPE_FAILPOINT_MARKER": str(marker)}
    code = f"from jobs import publish; from jobs.core.settings import Paths; publish.run(publish.PublishConfig(date={D3.isoformat()!r}), Paths.from_env())"
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    _, err = proc.communicate()
    assert marker.exists(), err.decode(errors="replace")[-2000:]
    assert live_state(paths) == (d2_state if serves == D2 else d3_state)
    assert pubs.current(paths)["date"] == serves.isoformat() == TitleIndex.current(paths).meta["date"]
    assert online(paths, [85])["model_version"] == (["m2"] if serves == D2 else ["m3"])
    run_publish(paths, D3)
    assert live_state(paths) == d3_state and pubs.current(paths)["date"] == D3.isoformat()
    tables = pubs.OnlineTables(get_store(paths))
    try:
        assert tables.tables("fm_embeddings__stage_") == []          # the killed attempt's staging is gone
    finally:
        tables.close()


def test_rollback_restores_features_and_index_then_rolls_forward(synth, live_state):
    from jobs.index import TitleIndex
    paths = synth["paths"]
    run_publish(paths, D2, force=True)
    d2_state = live_state(paths)
    r3 = run_publish(paths, D3)
    assert online(paths, [95])["model_version"] == ["m3"]
    back = rb.main(["--to", D2.isoformat()])
    assert back["action"] == "rollback" and back["previous"] == r3["publication"]
    assert live_state(paths) == d2_state                                   # exact, including deletions
    assert online(paths, [95, 40])["model_version"] == [None, "m2"]
    assert TitleIndex.current(paths).meta["date"] == D2.isoformat()
    fwd = rb.rollback(rb.RollbackConfig(to=D3.isoformat()), paths)
    assert fwd["rolled_back_to"] == r3["publication"] and online(paths, [95])["model_version"] == ["m3"]
    # D1's snapshot is long gone (keep=3): its state is rebuilt from the offline tables
    old = rb.rollback(rb.RollbackConfig(to=D1.isoformat()), paths)
    assert old["action"] == "rollback_rebuild"
    got = online(paths, [10, 40, 70, 95])
    assert got["model_version"] == ["m1", "m1", None, None]
    np.testing.assert_allclose(got["emb_layer2_last"][1], expect(synth, D1, 40))
    assert TitleIndex.current(paths).meta["date"] == D1.isoformat()
    # publishing D2 after rolling back to D1 (and releasing the pin) builds on D1 again: same state as the first D2
    with pytest.raises(rb.RollbackPinned):
        run_publish(paths, D2)
    assert rb.main(["--release"])["action"] == "released"
    run_publish(paths, D2)
    assert live_state(paths) == d2_state


def write_history(paths: Paths, day: dt.date, pid: int, finished: list[str]) -> None:
    vocab = pa.table({"title_id": [f"t{i:03d}" for i in range(TITLES)], "idx": pa.array(range(2, TITLES + 2), pa.int32()),
                      "first_dt": pa.array([D1] * TITLES, pa.date32())}, schema=TITLE_VOCAB_SCHEMA)
    atomic_write_table(vocab, paths.title_vocab)
    complete, play = vocab_index(ACTIONS)["complete"], vocab_index(ACTIONS)["play"]
    titles = [2 + int(t[1:]) for t in finished] + [2 + 39]
    actions = [complete] * len(finished) + [play]
    n = len(titles)
    cols = {"profile_id": [pid], "last_dt": [day], "n_tokens": [n],
            "ts": [[dt.datetime(2026, 11, 2, 12, tzinfo=dt.timezone.utc)] * n], "seq": [list(range(n))]}
    for f in TOKEN_FIELDS:
        cols[f] = [titles if f == "title" else actions if f == "action" else [2] * n]
    atomic_write_table(pa.table(cols, schema=HISTORY_SCHEMA), partition(paths.history, day) / "part-0.parquet")


def test_retrieve_ranks_by_raw_dot_product_and_skips_finished_titles(synth):
    from jobs.tools import retrieve
    paths = synth["paths"]
    run_publish(paths, D2)
    q = expect(synth, D2, 40)
    scores = synth["days"][D2]["titles"] @ q
    order = [f"t{i:03d}" for i in np.argsort(-scores)]
    plain = retrieve.retrieve(paths, 40, k=5, exclude_finished=False)
    assert [t["title_id"] for t in plain["titles"]] == order[:5] and not plain["model_version_mismatch"]
    np.testing.assert_allclose([t["score"] for t in plain["titles"]], np.sort(scores)[::-1][:5], rtol=1e-5)
    write_history(paths, D2, 40, finished=order[:2])
    got = retrieve.main(["profile_id=40", "k=5"])
    assert got["excluded_finished"] == sorted(order[:2])
    assert [t["title_id"] for t in got["titles"]] == order[2:7]
    with pytest.raises(KeyError, match="profile 12345"):
        retrieve.retrieve(paths, 12345)


def test_a_torn_history_line_and_an_empty_current_json_recover_from_the_commit_record(tmp_path, monkeypatch, live_state):
    """Power loss damage: the last history line torn, CURRENT.json empty. Readers follow the SQLite
    commit record (with warnings), the next pointer move rewrites the pointer and appends its line
    cleanly, and rollback and publish keep working."""
    paths = Paths(tmp_path / "var")
    monkeypatch.setenv("FMPIPE_HOME", str(paths.home))
    write_day(paths, D1, range(0, 20), "m1", 1)
    write_day(paths, D2, range(10, 30), "m2", 2)
    run_publish(paths, D1)
    run_publish(paths, D2)
    served, d2_state = pubs.current(paths), live_state(paths)
    journal = pubs.root(paths) / "history.jsonl"
    with open(journal, "a") as f:
        f.write('{"date": "2026-11-0')                                    # torn: no closing, no newline
    pubs.pointer_path(paths).write_text("")
    with pytest.warns(RuntimeWarning, match=r"history.jsonl line 3 is torn or corrupt"):
        assert [r["date"] for r in pubs.history(paths)] == [D1.isoformat(), D2.isoformat()]
    with pytest.warns(RuntimeWarning, match="CURRENT.json is empty or corrupt"):
        assert pubs.current(paths) == served
    with pytest.warns(RuntimeWarning):
        back = rb.rollback(rb.RollbackConfig(to=D1.isoformat()), paths)   # reconcile rewrites the pointer first
    assert json.loads(pubs.pointer_path(paths).read_text())["publication"] == back["rolled_back_to"]
    lines = journal.read_text().splitlines()
    assert lines[2] == '{"date": "2026-11-0' and json.loads(lines[3])["action"] == "rollback"   # not fused
    with pytest.warns(RuntimeWarning, match="line 3 is torn"):
        rb.release(paths)
        run_publish(paths, D2)
    assert live_state(paths) == d2_state and pubs.current(paths)["date"] == D2.isoformat()


def test_the_analysts_catalogue_file_follows_publish_and_rollback(tmp_path, monkeypatch):
    """Once an analyst has made the DuckDB catalogue file, every serving move rewrites it, so a BI
    tool never shows a day that is no longer (or not yet) served; without the file nothing is written."""
    import duckdb
    from jobs.tools import sql
    monkeypatch.setenv("FMPIPE_HOME", str(tmp_path / "var"))
    paths = Paths.from_env()
    write_day(paths, D1, range(0, 20), "m1", 1)
    write_day(paths, D2, range(10, 30), "m2", 2)
    assert run_publish(paths, D1)["catalogue"] is None and not sql.catalogue_path(paths).exists()
    sql.write_catalogue(paths)

    def served() -> list[str]:
        with duckdb.connect(str(sql.catalogue_path(paths)), read_only=True) as con:
            return sorted(r[0] for r in con.execute("SELECT DISTINCT CAST(dt AS VARCHAR) FROM profile_embeddings").fetchall())
    assert served() == [D1.isoformat()]
    assert run_publish(paths, D2)["catalogue"] == str(sql.catalogue_path(paths))
    assert served() == [D1.isoformat(), D2.isoformat()]
    assert rb.rollback(rb.RollbackConfig(to=D1.isoformat()), paths)["catalogue"] == str(sql.catalogue_path(paths))
    assert served() == [D1.isoformat()]
