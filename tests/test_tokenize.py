"""Tokenize job on hand-made events: fields, quarantine, dedupe, OOV, vocabulary, incremental state."""
from __future__ import annotations

import datetime as dt

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fm import schema as S
from jobs import tokenize
from jobs.core.history import HistoryGapError
from jobs.core.io import atomic_write_table, partition, raw_partition

D1, D2 = dt.date(2026, 11, 1), dt.date(2026, 11, 2)


def catalogue(extra: list[dict] | None = None) -> pa.Table:
    rows = [
        {"title_id": "a", "name": "Alpha", "kind": "movie", "genres": ["drama"], "release_date": dt.date(2020, 1, 1),
         "synopsis": "a drama", "runtime_s": 1000},
        {"title_id": "b", "name": "Beta", "kind": "show", "genres": ["comedy"], "release_date": dt.date(2020, 1, 1),
         "synopsis": "a comedy", "runtime_s": None},
        {"title_id": "c", "name": "Gamma", "kind": "movie", "genres": ["scifi"], "release_date": D2,
         "synopsis": "space", "runtime_s": 6000},
    ] + (extra or [])
    return pa.Table.from_pylist(rows, schema=S.CATALOGUE_SCHEMA)


def ev(eid, pid, ts, title="a", action="play", dur=None, device="tv", canvas="home", row=0, locale="en-US") -> dict:
    return {"event_id": eid, "profile_id": pid, "ts": ts, "title_id": title, "action": action, "duration_s": dur,
            "device": device, "canvas": canvas, "row_position": row, "locale": locale}


def write_day(paths, day: dt.date, events: list[dict]) -> None:
    atomic_write_table(pa.Table.from_pylist(events, schema=S.RAW_EVENT_SCHEMA), raw_partition(paths, day) / "part-0.parquet")


def tokens(paths, day) -> list[dict]:
    return pq.read_table(partition(paths.tokens, day)).sort_by([("profile_id", "ascending"), ("ts", "ascending")]).to_pylist()


def day1_events() -> list[dict]:
    return [
        ev("e1", 1, "2026-11-01T10:00:00Z", "a", "play", 500.0, "tv", "home", 0),
        ev("e2", 1, "2026-11-01T10:00:10Z", "b", "impression", None, "fridge", "nowhere", 7, "xx-XX"),
        ev("e3", 2, "2026-11-01T23:30:00Z", "b", "play", 64.0, "mobile", "search", 25),
        ev("e3", 2, "2026-11-01T23:30:00Z", "b", "play", 64.0, "mobile", "search", 25),   # duplicate
        ev("bad1", None, "2026-11-01T10:00:00Z"),                                            # missing profile
        ev("bad2", 3, "yesterday-ish"),                                                      # unparseable ts
        ev("bad3", 3, "2026-11-01T11:00:00Z", action="teleport"),                            # unknown action
        ev("bad4", 3, "2026-11-05T11:00:00Z"),                                               # future ts
        ev("bad5", 3, "2026-11-01T11:00:00Z", title="zzz"),                                  # unknown title
        ev("bad6", 3, "2026-11-01T11:00:00Z", dur=-5.0),                                     # negative duration
        ev(None, 3, "2026-11-01T11:00:00Z"),                                                 # missing event id
    ]


def test_fields_quarantine_dedupe_and_oov(spark, home):
    atomic_write_table(catalogue(), home.catalogue)
    write_day(home, D1, day1_events())
    out = tokenize.run(tokenize.TokenizeConfig(date=D1.isoformat()), home, spark)
    assert out["quarantine_reasons"] == {"missing_profile_id": 1, "unparseable_ts": 1, "unknown_action": 1,
                                         "future_ts": 1, "unknown_title": 1, "negative_duration": 1,
                                         "missing_event_id": 1}
    assert out["duplicates"] == 1 and out["tokens"] == 3
    q = pq.read_table(partition(home.quarantine, D1)).to_pylist()
    assert {r["event_id"]: r["reason"] for r in q}["bad2"] == "unparseable_ts"
    assert q[0]["ts"] is not None or q[0]["reason"]            # raw columns kept for replay

    t1, t2, t3 = tokens(home, D1)
    vocab = {r["title_id"]: r["idx"] for r in pq.read_table(home.title_vocab).to_pylist()}
    assert set(vocab) == {"a", "b"}                           # c is released on D2
    assert t1["title"] == vocab["a"] and t1["action"] == S.vocab_index(S.ACTIONS)["play"]
    assert t1["duration"] == S.duration_bucket(500.0, 1000) and t1["gap"] == S.OOV
    assert t1["hour"] == S.N_SPECIAL + 10 and t1["dow"] == S.N_SPECIAL + 0      # 2026-11-01 is a Sunday
    assert t2["device"] == t2["canvas"] == t2["locale"] == S.OOV                 # unknown values -> OOV
    assert t2["gap"] == S.gap_bucket(10) and t2["duration"] == S.NO_DURATION and t2["row"] == S.row_bucket(7)
    assert t3["duration"] == S.duration_bucket(64.0, None)                       # unknown runtime -> log bucket
    assert t3["device"] == S.vocab_index(S.DEVICES)["mobile"] and t3["row"] == S.row_bucket(25)


def test_vocabulary_only_grows_and_history_merges_late_events(spark, home):
    atomic_write_table(catalogue(), home.catalogue)
    write_day(home, D1, day1_events()[:3])
    tokenize.run(tokenize.TokenizeConfig(date=D1.isoformat()), home, spark)
    v1 = pq.read_table(home.title_vocab).to_pylist()
    write_day(home, D2, [
        ev("f1", 1, "2026-11-02T09:00:00Z", "c", "play", 600.0),
        ev("f2", 1, "2026-11-01T10:00:05Z", "b", "thumbs_up"),          # late event: belongs between e1 and e2
    ])
    # the catalogue changes row order and gains a title: existing ids must not move
    atomic_write_table(catalogue([{"title_id": "0first", "name": "N", "kind": "live", "genres": [],
                                   "release_date": D2, "synopsis": "", "runtime_s": None}]).sort_by("title_id"),
                       home.catalogue)
    out = tokenize.run(tokenize.TokenizeConfig(date=D2.isoformat()), home, spark)
    assert out["mode"] == "incremental" and out["previous_state"] == D1.isoformat()
    v2 = pq.read_table(home.title_vocab).to_pylist()
    assert v2[: len(v1)] == v1 and {r["title_id"] for r in v2[len(v1):]} == {"c", "0first"}
    hist = {r["profile_id"]: r for r in pq.read_table(partition(home.history, D2)).to_pylist()}
    idx = {r["title_id"]: r["idx"] for r in v2}
    assert hist[1]["title"] == [idx["a"], idx["b"], idx["b"], idx["c"]]          # late event in time order
    assert hist[1]["last_dt"] == D2 and hist[2]["last_dt"] == D1 and hist[1]["n_tokens"] == 4


def test_incremental_equals_full_rebuild_and_reruns_are_idempotent(spark, tmp_path, monkeypatch):
    from jobs.tools import generate
    from jobs.core.settings import Paths
    homes = [Paths(tmp_path / "inc"), Paths(tmp_path / "full")]
    for p in homes:
        generate.run(generate.GenerateConfig(profiles=40, titles=30, days=3, new_titles_per_day=2, seed=1), p)
    days = sorted(p.name[3:] for p in homes[0].raw.glob("dt=*"))
    inc, full = homes
    for d in days:
        tokenize.run(tokenize.TokenizeConfig(date=d, history_len=20), inc, spark)
    before = pq.read_table(partition(inc.history, dt.date.fromisoformat(days[-1])))
    tokenize.run(tokenize.TokenizeConfig(date=days[-1], history_len=20), inc, spark)        # re-run last day
    tokenize.run(tokenize.TokenizeConfig(date=days[-1], history_len=20, full=True), full, spark)
    a = pq.read_table(partition(inc.history, dt.date.fromisoformat(days[-1]))).sort_by("profile_id")
    b = pq.read_table(partition(full.history, dt.date.fromisoformat(days[-1]))).sort_by("profile_id")
    assert a.equals(before.sort_by("profile_id"))
    assert a.to_pylist() == b.to_pylist()
    assert max(r["n_tokens"] for r in a.to_pylist()) == 20                       # truncated to the last N
    assert pq.read_table(inc.title_vocab).equals(pq.read_table(full.title_vocab))


def test_missing_partition_and_bad_columns_fail_clearly(spark, home):
    atomic_write_table(catalogue(), home.catalogue)
    with pytest.raises(FileNotFoundError, match=r"raw partition missing for 2026-11-01: .*dt=2026-11-01"):
        tokenize.run(tokenize.TokenizeConfig(date=D1.isoformat()), home, spark)
    bad = pa.Table.from_pylist(day1_events()[:2], schema=S.RAW_EVENT_SCHEMA)
    bad = bad.set_column(bad.schema.get_field_index("row_position"), "row_position", pa.array(["top", "x"]))
    atomic_write_table(bad, raw_partition(home, D1) / "part-0.parquet")
    with pytest.raises(TypeError, match=r"column 'row_position' has type string"):
        tokenize.run(tokenize.TokenizeConfig(date=D1.isoformat()), home, spark)
    assert not partition(home.history, D1).exists()                              # nothing written


def test_adjacent_actions_merge_into_one_watch_token(spark, home):
    atomic_write_table(catalogue(), home.catalogue)
    write_day(home, D1, [
        ev("m1", 1, "2026-11-01T20:00:00Z", "a", "impression", None, "tv", "home", 3),
        ev("m2", 1, "2026-11-01T20:00:05Z", "a", "play", 300.0),
        ev("m3", 1, "2026-11-01T20:05:05Z", "a", "pause"),
        ev("m4", 1, "2026-11-01T20:15:00Z", "a", "play", 400.0),
        ev("m5", 1, "2026-11-01T20:21:40Z", "a", "complete"),
        ev("m6", 1, "2026-11-01T20:22:00Z", "b", "impression"),                 # another title: new token
        ev("m7", 1, "2026-11-01T23:00:00Z", "a", "play", 50.0),                 # same title, new session
    ])
    out = tokenize.run(tokenize.TokenizeConfig(date=D1.isoformat()), home, spark)
    assert out["valid_events"] == 7 and out["tokens"] == 3 and out["events_per_token"] == round(7 / 3, 3)
    watch, other, again = tokens(home, D1)
    assert watch["event_id"] == "m1" and watch["n_events"] == 5
    assert watch["action"] == S.vocab_index(S.ACTIONS)["complete"]
    assert watch["duration"] == S.duration_bucket(700.0, 1000) and watch["row"] == S.row_bucket(3)
    assert other["n_events"] == 1 and again["n_events"] == 1
    assert other["gap"] == S.gap_bucket(1320) and again["gap"] == S.gap_bucket(9480)
    plain = tokenize.run(tokenize.TokenizeConfig(date=D1.isoformat(), merge_actions=False), home, spark)
    assert plain["tokens"] == 7


def test_history_states_chain_day_by_day_and_a_gap_names_the_missing_day(spark, home):
    """D1 tokenized, D2 skipped, D3 asked incrementally: refused before anything is written, naming
    D2 and both fixes; after D2 the chain continues. A gap day with no raw events at all is allowed."""
    D3, D4, D5 = dt.date(2026, 11, 3), dt.date(2026, 11, 4), dt.date(2026, 11, 5)
    atomic_write_table(catalogue(), home.catalogue)
    write_day(home, D1, day1_events()[:3])
    write_day(home, D2, [ev("g1", 1, "2026-11-02T09:00:00Z", "c", "play", 600.0)])
    write_day(home, D3, [ev("h1", 2, "2026-11-03T09:00:00Z", "a", "play", 60.0)])
    tokenize.run(tokenize.TokenizeConfig(date=D1.isoformat()), home, spark)
    vocab = pq.read_table(home.title_vocab)
    with pytest.raises(HistoryGapError) as err:
        tokenize.run(tokenize.TokenizeConfig(date=D3.isoformat()), home, spark)
    msg = str(err.value)
    assert "cannot tokenize 2026-11-03 incrementally: the history state of 2026-11-02 is missing" in msg
    assert "the latest state before 2026-11-03 is 2026-11-01" in msg
    assert "fmpipe backfill --start 2026-11-02 --end 2026-11-03" in msg
    assert "fmpipe tokenize date=2026-11-03 full=true" in msg
    assert not partition(home.history, D3).exists() and not partition(home.tokens, D3).exists()
    assert pq.read_table(home.title_vocab).equals(vocab)                       # nothing written, not even vocab
    tokenize.run(tokenize.TokenizeConfig(date=D2.isoformat()), home, spark)
    out = tokenize.run(tokenize.TokenizeConfig(date=D3.isoformat()), home, spark)
    assert out["mode"] == "incremental" and out["previous_state"] == D2.isoformat()
    hist = {r["profile_id"]: r for r in pq.read_table(partition(home.history, D3)).to_pylist()}
    assert hist[1]["last_dt"] == D2 and hist[2]["last_dt"] == D3          # D2's event reached history
    write_day(home, D5, [ev("k1", 1, "2026-11-05T09:00:00Z", "a", "play", 60.0)])    # D4: no raw at all
    assert not raw_partition(home, D4).exists()
    assert tokenize.run(tokenize.TokenizeConfig(date=D5.isoformat()), home, spark)["previous_state"] == D3.isoformat()


def test_rerun_of_a_date_older_than_every_kept_state_rebuilds_it_and_keeps_it(spark, tmp_path):
    """Five days tokenized keep the states of days 3-5; re-running day 1 (an Airflow clear, a
    fix-and-rerun) rebuilds day 1 from the raw days, equal to the daily run's state, and the history
    GC keeps it (it used to delete the state it had just written, so embed found no history) while
    leaving the newer states untouched. The next daily run collects it. Day 2 is re-run: it has an
    earlier raw day and no earlier state, so only a rebuild from every raw day keeps day 1's events."""
    from jobs.tools import generate
    from jobs.core.settings import Paths
    home = Paths(tmp_path / "w")
    generate.run(generate.GenerateConfig(profiles=30, titles=20, days=6, new_titles_per_day=1, seed=3), home)
    days = sorted(dt.date.fromisoformat(p.name[3:]) for p in home.raw.glob("dt=*"))
    for d in days[:5]:
        tokenize.run(tokenize.TokenizeConfig(date=d.isoformat(), history_len=20), home, spark)
        if d == days[1]:
            first = pq.read_table(partition(home.history, d)).sort_by("profile_id")
    newer = {d: pq.read_table(partition(home.history, d)) for d in days[2:5]}
    assert sorted(p.name for p in home.history.glob("dt=*")) == [f"dt={d}" for d in days[2:5]]
    out = tokenize.run(tokenize.TokenizeConfig(date=days[1].isoformat(), history_len=20), home, spark)
    assert out["mode"] == "full" and out["days"] == 2
    assert pq.read_table(partition(home.history, days[1])).sort_by("profile_id").to_pylist() == first.to_pylist()
    assert all(pq.read_table(partition(home.history, d)).equals(t) for d, t in newer.items())
    tokenize.run(tokenize.TokenizeConfig(date=days[5].isoformat(), history_len=20), home, spark)
    assert sorted(p.name for p in home.history.glob("dt=*")) == [f"dt={d}" for d in days[3:6]]


def test_the_generators_cached_draw_is_numpys_choice_bit_for_bit():
    """jobs.tools.generate draws titles from day-cached cumulative distributions; the world it writes must
    stay the one numpy's ``choice`` gives for the same seed (every generated benchmark depends on it)."""
    import numpy as np
    from jobs.tools import generate
    world = generate._World.__new__(generate._World)
    world.cdfs, world.rng = {}, np.random.default_rng(5)
    ref = np.random.default_rng(5)
    dists = [w / w.sum() for w in np.random.default_rng(0).random((3, 20_000)) ** 4]
    got = [world.draw(dists[i % 3], ("k", i % 3) if i % 2 else None) for i in range(3000)]
    want = [int(ref.choice(20_000, p=dists[i % 3])) for i in range(3000)]
    assert got == want and len(world.cdfs) == 3 and world.rng.random() == ref.random()
