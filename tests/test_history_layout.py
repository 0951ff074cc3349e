"""History layout (issue 16): the day's active profiles are contiguous and their row groups alone are
read by embed's ``iter_history(path, day)``; whole-history readers see profile_id order regardless."""
from __future__ import annotations

import datetime as dt

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from conftest import TINY

from fm.data import Sequences
from fm.stream import history_files, history_scan, iter_history
from fm.schema import TOKEN_FIELDS
from jobs.tools import generate
from jobs import tokenize
from jobs.core.io import partition


def test_the_days_profiles_are_read_from_their_row_groups_only(spark, home, monkeypatch):
    # TINY has ~40 profiles per file: bound row groups to 8 profiles so a file has several
    monkeypatch.setattr(tokenize, "HISTORY_ROW_GROUP_ROWS", 8)
    generate.run(generate.GenerateConfig(**{**TINY, "active_prob": 0.3}), home)
    days = sorted(p.name[3:] for p in home.raw.glob("dt=*"))
    tokenize.run(tokenize.TokenizeConfig(date=days[-2], full=True), home, spark)    # every day up to D-1
    tokenize.run(tokenize.TokenizeConfig(date=days[-1]), home, spark)               # D, incrementally
    day = dt.date.fromisoformat(days[-1])
    path = partition(home.history, day)

    full = pq.read_table(path)
    assert len(set(full["last_dt"].to_pylist())) > 1                # other days' profiles are in the state
    for f in history_files(path):                                   # each file sorted by (last_dt, profile_id)
        t = pq.read_table(f, columns=["last_dt", "profile_id"]).to_pylist()
        assert t == sorted(t, key=lambda r: (r["last_dt"], r["profile_id"]))
        assert all(pq.ParquetFile(f).metadata.row_group(g).num_rows <= 8 for g in range(pq.ParquetFile(f).num_row_groups))

    scan = history_scan(path, day)
    active = full.filter(pc.equal(full["last_dt"], pa.scalar(day, pa.date32())))
    assert 0 < active.num_rows < full.num_rows
    assert scan["rows"] == full.num_rows and scan["rows_read"] >= active.num_rows
    assert scan["row_groups_read"] < scan["row_groups"]             # pruning happened
    assert scan["bytes_read"] < scan["bytes"]
    # without pruning (every row group), the same reader reads everything
    assert history_scan(path)["row_groups_read"] == scan["row_groups"]

    got = pa.Table.from_batches(list(iter_history(path, day))).sort_by("profile_id")
    want = active.select(["profile_id", *TOKEN_FIELDS]).sort_by("profile_id")
    assert got.to_pylist() == want.to_pylist()

    seqs = Sequences.read(path)                                     # whole-history reader: profile_id order
    ids = full["profile_id"].to_numpy()
    assert np.array_equal(seqs.profile_id, np.sort(ids))
    assert not np.array_equal(ids, np.sort(ids))                    # ... though the files are not in that order


def test_sequences_read_orders_rows_by_profile_id(tmp_path):
    def table(ids):
        return pa.table({"profile_id": pa.array(ids, pa.int64()),
                         **{f: pa.array([[i, i + 1][: 1 + i % 2] for i in ids], pa.list_(pa.int32())) for f in TOKEN_FIELDS}})
    shuffled, ordered = tmp_path / "shuffled", tmp_path / "ordered"
    for d in (shuffled, ordered):
        d.mkdir()
    pq.write_table(table([7, 3, 9]), shuffled / "part-0.parquet")
    pq.write_table(table([1, 8, 2]), shuffled / "part-1.parquet")
    pq.write_table(table([1, 2, 3, 7, 8, 9]), ordered / "part-0.parquet")
    a, b = Sequences.read(shuffled), Sequences.read(ordered)
    assert a.profile_id.tolist() == [1, 2, 3, 7, 8, 9]
    assert np.array_equal(a.offsets, b.offsets)
    assert all(np.array_equal(a.values[f], b.values[f]) for f in TOKEN_FIELDS)
    assert a.values["title"].tolist() == [1, 2, 2, 3, 4, 7, 8, 8, 9, 10]     # each row keeps its own tokens
