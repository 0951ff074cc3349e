"""Report trends: next-day retrieval quality computed from what was published, on a hand-built home
whose ranks are known."""
from __future__ import annotations

import datetime as dt

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fm.schema import ACTIONS, TITLE_VOCAB_SCHEMA, TOKEN_FIELDS, vocab_index
from jobs.core import published
from jobs import report_trends
from jobs.core.io import atomic_write_json, partition, partition_dates
from jobs.core.settings import Paths

P, D = dt.date(2026, 11, 2), dt.date(2026, 11, 3)
PLAY, IMPRESSION = vocab_index(ACTIONS)["play"], vocab_index(ACTIONS)["impression"]


def _write(table: pa.Table, folder) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, folder / "part-0.parquet")


def build_home(tmp_path) -> Paths:
    """Titles t2..t6 (vocab ids 2..6) on the axes of R^5; profile 1 points at t3, profile 2 at t5.
    Day D: profile 1 plays t3 (rank 0), profile 2 first has an impression of t2 (not a target),
    then plays t6 (rank: t5 and everything scoring above t6... only t5 > 0); profile 3 has no vector."""
    paths = Paths(tmp_path / "home")
    ids = [f"t{i}" for i in range(2, 7)]
    pq.write_table(pa.table({"title_id": ids, "idx": pa.array(range(2, 7), pa.int32()),
                             "first_dt": pa.array([P] * 5, pa.date32())}, schema=TITLE_VOCAB_SCHEMA),
                   _mk(paths.title_vocab))
    eye = np.eye(5, dtype=np.float32)
    _write(pa.table({"title_id": ids, "title_embedding": [list(r) for r in eye]}),
           partition(published.view_root(paths, "title"), P))
    q1, q2 = eye[1] * 2, eye[3] * 2 + eye[4]                       # t3 best for 1; t5 then t6 for 2
    _write(pa.table({"profile_id": pa.array([1, 2], pa.int64()), "emb_layer1_last": [list(-q1), list(-q2)],
                     "emb_layer2_last": [list(q1), list(q2)]}), partition(published.view_root(paths, "profile"), P))
    tok = {"profile_id": pa.array([1, 2, 2, 3], pa.int64()),
           "ts": pa.array([dt.datetime(2026, 11, 3, h) for h in (1, 1, 2, 3)], pa.timestamp("us", tz="UTC")),
           "seq": pa.array([0, 1, 2, 3], pa.int64()),
           "title": pa.array([3, 2, 6, 4], pa.int32()), "action": pa.array([PLAY, IMPRESSION, PLAY, PLAY], pa.int32())}
    _write(pa.table(tok), partition(paths.tokens, D))
    # history at P: profile 2 already had t5, so t5 is removed and t6 ranks first
    hist = {f: pa.array([[2], [5]], pa.list_(pa.int32())) if f == "title" else pa.array([[0], [0]], pa.list_(pa.int32()))
            for f in TOKEN_FIELDS}
    _write(pa.table({"profile_id": pa.array([1, 2], pa.int64()), **{f: hist[f] for f in ("title",)}}),
           partition(paths.history, P))
    atomic_write_json({"raw_events": 10, "quarantined": 1, "events_per_token": 1.25, "profiles_active": 3},
                      partition(paths.reports, D) / "steps" / "tokenize.json")
    return paths


def _mk(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def test_next_day_retrieval_quality_from_the_previous_publication(tmp_path):
    paths = build_home(tmp_path)
    assert report_trends.first_targets(paths, D) == {1: 3, 2: 6, 3: 4}      # the impression is not a target
    q = report_trends.retrieval_quality(paths, D, P)
    # profile 1: t3 rank 0; profile 2: t5 (seen at P) removed, t6 rank 0; profile 3: no published vector
    assert q == {"ndcg@10": 1.0, "hr@10": 1.0, "profiles": 2, "publication_date": P.isoformat()}
    (partition(paths.history, P) / "part-0.parquet").unlink()              # without history t5 outranks t6
    q = report_trends.retrieval_quality(paths, D, P)
    assert q["ndcg@10"] == round((1.0 + 1.0 / np.log2(3)) / 2, 4) and q["hr@10"] == 1.0
    rows = report_trends.trends(paths, D)
    assert [r["date"] for r in rows] == [D.isoformat()]
    assert rows[0]["quarantine_rate"] == 0.1 and rows[0]["events_per_token"] == 1.25
    assert rows[0]["retrieval"]["publication_date"] == P.isoformat()
    assert report_trends.retrieval_quality(paths, P, P - dt.timedelta(days=1)) is None   # nothing published before


def test_query_column_and_partition_dates(tmp_path):
    assert report_trends.query_column(["profile_id", "emb_layer1_last", "emb_layer3_last", "emb_layer2_mean"]) == "emb_layer3_last"
    assert report_trends.query_column(["profile_id", "emb_layer2_mean"]) is None
    root = tmp_path / "t"
    for name in ("dt=2026-11-02", "dt=2026-11-01", "dt=staging-x"):
        (root / name).mkdir(parents=True)
    (root / "dt=2026-11-02" / "_manifest.json").write_text("{}")
    assert partition_dates(root) == [dt.date(2026, 11, 1), dt.date(2026, 11, 2)]
    assert partition_dates(root, until=dt.date(2026, 11, 1)) == [dt.date(2026, 11, 1)]
    assert partition_dates(root, marker="_manifest.json") == [dt.date(2026, 11, 2)]
    assert partition_dates(tmp_path / "missing") == []
