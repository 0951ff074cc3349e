"""The Feast offline store exposes only published data (issue 14): ``get_historical_features``
never returns a day that failed the gate or that a rollback withdrew; a published day is there,
and a withdrawn day returns when it is published again. Real Feast, file offline store."""
from __future__ import annotations

import datetime as dt
import json

import numpy as np
import pandas as pd
import pytest

from jobs.core import publication as pubs
from jobs.core import published
from jobs import rollback as rb
from jobs.core import verdict
from jobs.embed import published_at
from jobs.core.io import atomic_write_json, partition
from jobs.core.settings import Paths
from test_publish import D1, D2, D3, expect, run_publish, write_day


def historical(paths: Paths, pid: int, days) -> list:
    """``(model_version, emb_layer2_last)`` as of 3 h after each day's publication time."""
    from jobs.core.feast_store import get_store
    entity_df = pd.DataFrame({"profile_id": [pid] * len(days),
                              "event_timestamp": [published_at(d) + dt.timedelta(hours=3) for d in days]})
    df = get_store(paths).get_historical_features(
        entity_df=entity_df, features=["profile_embeddings:model_version", "profile_embeddings:emb_layer2_last"]).to_df()
    df = df.sort_values("event_timestamp", kind="stable")
    return list(zip(df["model_version"], df["emb_layer2_last"]))


def test_only_published_not_rolled_back_days_reach_get_historical_features(tmp_path, monkeypatch):
    paths = Paths(tmp_path / "var")
    monkeypatch.setenv("FMPIPE_HOME", str(paths.home))
    synth = {"days": {D1: write_day(paths, D1, range(0, 20), "m1", 1), D2: write_day(paths, D2, range(0, 20), "m2", 2),
                      D3: write_day(paths, D3, range(0, 20), "m3", 3)}}
    failed = json.loads(verdict.summary_path(paths, D2).read_text()) | {"success": False}
    atomic_write_json(failed, verdict.summary_path(paths, D2))        # D2 failed the gate
    run_publish(paths, D1, with_index=False)
    with pytest.raises(verdict.GateFailed):
        run_publish(paths, D2, with_index=False)
    run_publish(paths, D3, with_index=False)
    got = historical(paths, 5, (D1, D2, D3))
    assert [v for v, _ in got] == ["m1", "m1", "m3"]                  # D2's rows never appear
    np.testing.assert_array_equal(got[2][1], expect(synth, D3, 5))
    assert published.held(paths) == {D1.isoformat(): pubs.history(paths)[0]["publication"],
                                     D3.isoformat(): pubs.current(paths)["publication"]}
    linked = next(partition(published.view_root(paths, "profile"), D3).glob("*.parquet"))
    source = partition(paths.profile_embeddings, D3) / linked.name
    assert linked.stat().st_ino == source.stat().st_ino                # a hard link, no copy

    rb.rollback(rb.RollbackConfig(to=D1.isoformat()), paths)          # D3 was bad: withdrawn offline too
    assert [v for v, _ in historical(paths, 5, (D1, D2, D3))] == ["m1", "m1", "m1"]
    assert not partition(published.view_root(paths, "title"), D3).exists()

    rb.release(paths)
    write_day(paths, D3, range(0, 20), "m3b", 33)                     # fixed, re-embedded, published again
    run_publish(paths, D3, with_index=False)
    assert [v for v, _ in historical(paths, 5, (D1, D3))] == ["m1", "m3b"]
    assert linked.stat().st_ino == source.stat().st_ino and published.held(paths)[D3.isoformat()] == pubs.current(paths)["publication"]


def test_the_tree_is_rebuilt_from_the_history_when_lost(tmp_path, monkeypatch):
    """``published/`` lost or damaged (a hand edit, a restore): the next pointer move rebuilds it."""
    import shutil
    paths = Paths(tmp_path / "var")
    monkeypatch.setenv("FMPIPE_HOME", str(paths.home))
    write_day(paths, D1, range(0, 10), "m1", 1)
    run_publish(paths, D1, with_index=False)
    shutil.rmtree(published.root(paths))
    with pubs.lock(paths):
        pubs.reconcile(paths)
    assert list(published.held(paths)) == [D1.isoformat()]
    assert [v for v, _ in historical(paths, 3, (D1,))] == ["m1"]
