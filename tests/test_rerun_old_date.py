"""Re-running yesterday after today (an Airflow clear, a fix-and-rerun of an unchanged day) is a
no-op that leaves today serving: yesterday's tables come out byte-identical even though today
added new titles to the append-only vocabulary."""
from __future__ import annotations

import datetime as dt
import hashlib

import pyarrow.parquet as pq

from jobs import pipeline
from jobs.core import publication
from jobs.core.io import partition
from conftest import two_days_left

WORLD = {"profiles": 80, "titles": 60, "days": 4, "new_titles_per_day": 4, "malformed_per_day": 0,
         "start": "2026-11-01", "seed": 11}


def _digest(root) -> str:
    h = hashlib.sha256()
    for f in sorted(root.glob("*.parquet")):
        h.update(f.read_bytes())
    return h.hexdigest()


def test_rerunning_yesterday_after_today_is_a_noop(tmp_path, monkeypatch, spark, one_thread, live_state):
    monkeypatch.setenv("FMPIPE_HOME", str((tmp_path / "var").resolve()))
    paths, days = two_days_left(tmp_path, spark, WORLD)
    yesterday, today = days[-2], days[-1]
    pipeline.run_all(yesterday)
    y = dt.date.fromisoformat(yesterday)
    before = {root.name: _digest(partition(root, y)) for root in (paths.profile_embeddings, paths.title_embeddings)}
    titles_y = pq.read_table(partition(paths.title_embeddings, y)).num_rows

    out = {r["step"]: r for r in pipeline.run_all(today)}
    assert out["embed"]["titles"] == titles_y + WORLD["new_titles_per_day"]   # today brought new titles
    serving, state = publication.current(paths), live_state(paths)

    again = {r["step"]: r for r in pipeline.run_all(yesterday)}            # the clear of yesterday's run
    assert again["publish"]["action"] == "noop", again["publish"]
    assert again["embed"]["titles"] == titles_y
    assert {root.name: _digest(partition(root, y)) for root in (paths.profile_embeddings, paths.title_embeddings)} == before
    assert publication.current(paths) == serving and live_state(paths) == state
