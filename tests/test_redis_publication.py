"""Atomic publication to a Redis online store (jobs.core.redis_store), against a real ``redis-server``
(Debian package; .ci/run installs it), selected by ``feature_store.yaml`` only, read back through
plain Feast ``get_online_features``: readers never see two publications mixed, a flushed Redis is
re-seeded from the offline tables, entities dropped from a publication are deleted."""
from __future__ import annotations

import datetime as dt
import shutil
import subprocess
import threading
import time

import numpy as np
import pytest

from bench.fault_redis import free_port, redis_repo, state
from jobs.core import publication as pubs
from jobs import rollback as rb
from jobs.core.online_store import open_online
from jobs.core.settings import Paths
from test_publish import D1, D2, TITLES, expect, online, run_publish, write_day

PROJECT = "fm_embeddings"


@pytest.fixture
def redis_server(tmp_path):
    """A throwaway ``redis-server`` on a free port, data dir in tmp_path, no persistence."""
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server not installed (Debian: apt-get install redis-server; .ci/run installs it)")
    redis = pytest.importorskip("redis", reason="python package redis not installed (pip install -e '.[redis]')")
    port = free_port()
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_path),
                             "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(host="127.0.0.1", port=port)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"redis-server did not start on port {port} (exit code {proc.poll()})")
                time.sleep(0.05)
        yield client, port
    finally:
        client.close()
        proc.terminate()
        proc.wait(timeout=20)


@pytest.fixture
def redis_home(redis_server, tmp_path, monkeypatch):
    """A copy of feature_repo/ whose yaml says ``type: redis`` and an empty FMPIPE_HOME."""
    client, port = redis_server
    repo = redis_repo(tmp_path, port)
    monkeypatch.setenv("FMPIPE_FEATURE_REPO", str(repo))
    monkeypatch.setenv("FMPIPE_HOME", str(tmp_path / "var"))
    return {"client": client, "repo": repo, "paths": Paths.from_env()}


def reconcile(paths: Paths):
    from jobs.core.feast_store import get_store
    online_tables = open_online(get_store(paths))
    try:
        with pubs.lock(paths):
            return pubs.reconcile(paths, online_tables)
    finally:
        online_tables.close()


def test_redis_publication_by_configuration_only(redis_home):
    """The same publish path, staged in database 1 and swapped in: reads through Feast (also a plain
    ``FeatureStore(repo_path=...)``), re-runs replace what is served, the marker names the
    publication, and a rollback serves exactly the rolled-back-to state."""
    from feast import FeatureStore
    client, paths = redis_home["client"], redis_home["paths"]
    days = {D1: write_day(paths, D1, range(0, 60), "m1", 1), D2: write_day(paths, D2, range(30, 90), "m2", 2)}
    synth = {"days": days}
    r1 = run_publish(paths, D1)
    assert r1["online_store"] == "redis" and r1["atomic_swap"] and r1["materialized_rows"]["profile"] == 60
    r2 = run_publish(paths, D2)
    assert r2["base"] == r1["publication"] and r2["carried_rows"]["profile_embeddings"] == 30
    assert not (paths.feast / "online.db").exists()                    # nothing went to SQLite
    assert client.dbsize() == 90 + TITLES + 1                          # one hash per profile / title + the marker
    assert pubs.committed_pointer(paths)["publication"] == r2["publication"] == pubs.current(paths)["publication"]
    got = online(paths, [10, 40, 70, 999])
    assert got["model_version"] == ["m1", "m2", "m2", None]            # 10 only active on D1: carried
    np.testing.assert_array_equal(got["emb_layer2_last"][0], expect(synth, D1, 10))
    np.testing.assert_array_equal(got["emb_layer2_last"][1], expect(synth, D2, 40))
    plain = FeatureStore(repo_path=str(redis_home["repo"])).get_online_features(
        features=["profile_embeddings:emb_layer2_last", "title_embeddings:title_embedding"],
        entity_rows=[{"profile_id": 40, "title_id": "t003"}]).to_dict()
    np.testing.assert_array_equal(plain["emb_layer2_last"][0], expect(synth, D2, 40))
    np.testing.assert_array_equal(plain["title_embedding"][0], days[D2]["titles"][3])

    days[D2] = write_day(paths, D2, range(30, 90), "m2b", 22)          # re-embedded: same timestamps, new vectors
    run_publish(paths, D2)
    got = online(paths, [40])
    assert got["model_version"] == ["m2b"]
    np.testing.assert_array_equal(got["emb_layer2_last"][0], expect(synth, D2, 40))

    back = rb.rollback(rb.RollbackConfig(to=D1.isoformat()), paths)    # D1's state rebuilt and swapped in
    assert back["action"] == "rollback_rebuild" and pubs.current(paths)["date"] == D1.isoformat()
    assert online(paths, [40, 70])["model_version"] == ["m1", None]    # 70 was first seen on D2: gone again
    again = rb.rollback(rb.RollbackConfig(to=D2.isoformat()), paths)   # the outgoing state was kept: one SWAPDB
    assert again["action"] == "rollback" and online(paths, [40, 70])["model_version"] == ["m2b", "m2b"]


def _reader(repo, stop: threading.Event, seen: list, errors: list) -> None:
    """Poll Feast until ``stop``: each read's model versions across both views, as one set."""
    from feast import FeatureStore
    try:
        store = FeatureStore(repo_path=str(repo))
        while not stop.is_set():
            got = store.get_online_features(
                features=["profile_embeddings:model_version", "title_embeddings:model_version"],
                entity_rows=[{"profile_id": p, "title_id": f"t{p % TITLES:03d}"} for p in (31, 45, 59)],
                full_feature_names=True).to_dict()
            seen.append(frozenset(got["profile_embeddings__model_version"] + got["title_embeddings__model_version"]))
    except Exception as e:                                            # surfaced by the test thread
        errors.append(e)


def _publish_under_reader(redis_home, swap: str, rounds: int) -> list[frozenset]:
    paths = redis_home["paths"]
    stop, seen, errors = threading.Event(), [], []
    reader = threading.Thread(target=_reader, args=(redis_home["repo"], stop, seen, errors), daemon=True)
    reader.start()
    try:
        while not seen and not errors:
            time.sleep(0.01)
        for i in range(rounds):
            write_day(paths, D2, range(30, 90), f"m2-{swap}-{i}", 100 + i)
            run_publish(paths, D2, swap=swap, batch_rows=1, with_index=False)
        time.sleep(0.05)
    finally:
        stop.set()
        reader.join(timeout=60)
    assert not errors, errors
    return seen


def test_a_feast_reader_never_sees_two_publications_mixed(redis_home):
    """A reader thread polls ``get_online_features`` over both views while D2 is re-published (rows
    written one per pipeline, to widen any window): with the atomic swap every read holds one
    publication's version; the in-place control shows the reader does catch mixes."""
    paths = redis_home["paths"]
    write_day(paths, D1, range(0, 60), "m1", 1)
    run_publish(paths, D1, with_index=False)
    seen = _publish_under_reader(redis_home, "auto", rounds=4)
    assert len(seen) > 20 and {len(s) for s in seen} == {1}, [s for s in seen if len(s) > 1][:3]
    assert len(set(seen)) >= 3                                         # it did read across the swaps
    control = _publish_under_reader(redis_home, "in_place", rounds=6)
    assert any(len(s) > 1 for s in control), "the in-place control never showed a mixed read"


def test_a_flushed_redis_is_reseeded_from_the_offline_tables(redis_home):
    """FLUSHALL (or a restart without persistence): reconcile rebuilds the serving publication whole,
    byte for byte; a publish after a flush first re-seeds, then builds on it."""
    client, paths = redis_home["client"], redis_home["paths"]
    write_day(paths, D1, range(0, 60), "m1", 1)
    write_day(paths, D2, range(30, 90), "m2", 2)
    run_publish(paths, D1, with_index=False)
    run_publish(paths, D2, with_index=False)
    served, pointer = state(client), pubs.current(paths)
    client.flushall()
    assert online(paths, [10])["model_version"] == [None]
    assert reconcile(paths) == pointer["publication"]
    assert state(client) == served and pubs.committed_pointer(paths)["publication"] == pointer["publication"]
    assert reconcile(paths) is None                                    # marker present: nothing to do
    client.flushall()
    run_publish(paths, D2, with_index=False, force=True)               # re-seed, then the re-run builds on it
    assert state(client) == served


def test_an_entity_dropped_from_a_publication_is_deleted(redis_home):
    """An entity whose last row fell out of the view's TTL (30 days) is not carried into the next
    publication: after the swap its key is gone, not lingering forever."""
    from jobs.core.feast_store import get_store
    from feast.infra.key_encoding_utils import serialize_entity_key
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Value
    client, paths = redis_home["client"], redis_home["paths"]
    late = D1 + dt.timedelta(days=31)
    write_day(paths, D1, range(0, 60), "m1", 1)
    write_day(paths, late, range(30, 90), "m9", 9)
    run_publish(paths, D1, with_index=False)
    r = run_publish(paths, late, with_index=False)
    assert r["carried_rows"]["profile_embeddings"] == 0
    assert online(paths, [10, 40])["model_version"] == [None, "m9"]
    key = serialize_entity_key(EntityKey(join_keys=["profile_id"], entity_values=[Value(int64_val=10)]), 3)
    assert client.exists(key + PROJECT.encode()) == 0
    assert get_store(paths).project == PROJECT and client.dbsize() == 60 + TITLES + 1


def test_an_unreachable_redis_fails_publish_in_one_clear_message(tmp_path, monkeypatch, capsys):
    """Redis down (nothing listens on the port): ``fmpipe publish`` exits 1 saying the online store is
    unreachable and that nothing was committed, no traceback; the pointer does not move."""
    pytest.importorskip("redis", reason="python package redis not installed (pip install -e '.[redis]')")
    from jobs import cli
    repo = redis_repo(tmp_path, free_port())             # nothing listens there
    monkeypatch.setenv("FMPIPE_FEATURE_REPO", str(repo))
    monkeypatch.setenv("FMPIPE_HOME", str(tmp_path / "var"))
    paths = Paths.from_env()
    write_day(paths, D1, range(0, 20), "m1", 1)
    assert cli.main(["publish", f"date={D1}", "require_gate=false", "with_index=false"]) == 1
    err = capsys.readouterr().err
    assert "online store is unreachable" in err and "Nothing was committed" in err and "Traceback" not in err
    assert pubs.current(paths) is None
