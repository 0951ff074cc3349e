"""``fmpipe evaluate`` on a tiny hand-built FMPIPE_HOME (no Spark): protocol metrics, heads, cold start;
``fmpipe train`` with leave_one_out / holdout_titles_frac / resume."""
from __future__ import annotations

import datetime as dt
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from fm import checkpoint
from fm import protocol as P
from fm import schema as S
from fm.data import Sequences
from fm.evaluate import content_only, head_accuracy, one_vs_rest_auc, regressed
from fm.model import FoundationModel, ModelConfig
from jobs import cli, evaluate, train
from jobs.core.io import atomic_write_table, partition

DAY = "2026-11-05"
N_TITLES, N_PROFILES = 40, 80
GENRES = ["space robot", "love wedding", "dragon magic", "war soldier", "comedy family"]


def write_home(paths) -> None:
    """Catalogue, vocabulary and one history state: profile p walks titles in steps of 1 + p % 3
    (learnable), with varied actions and devices so the heads have something to predict."""
    rng = np.random.default_rng(0)
    ids = [f"t{i:03d}" for i in range(N_TITLES)]
    atomic_write_table(pa.table({
        "title_id": ids, "name": [f"Title {i}" for i in range(N_TITLES)], "kind": ["movie"] * N_TITLES,
        "genres": [[GENRES[i % 5]] for i in range(N_TITLES)], "release_date": pa.nulls(N_TITLES, pa.date32()),
        "synopsis": [f"a story of {GENRES[i % 5]}" for i in range(N_TITLES)], "runtime_s": pa.nulls(N_TITLES, pa.int32()),
    }, schema=S.CATALOGUE_SCHEMA), paths.catalogue)
    atomic_write_table(pa.table({"title_id": ids, "idx": pa.array(range(S.N_SPECIAL, S.N_SPECIAL + N_TITLES), pa.int32()),
                                 "first_dt": pa.array([dt.date(2026, 11, 1)] * N_TITLES, pa.date32())},
                                schema=S.TITLE_VOCAB_SCHEMA), paths.title_vocab)
    actions = [S.vocab_index(S.ACTIONS)[a] for a in ("play", "complete", "thumbs_up")]
    rows = []
    for p in range(1, N_PROFILES + 1):
        n = int(rng.integers(8, 20))
        start, step = int(rng.integers(0, N_TITLES)), 1 + p % 3
        t0 = dt.datetime(2026, 11, 1, tzinfo=dt.UTC) + dt.timedelta(minutes=p)
        row = {"profile_id": p, "last_dt": dt.date(2026, 11, 5), "n_tokens": n,
               "ts": [t0 + dt.timedelta(hours=i) for i in range(n)],
               "title": [S.N_SPECIAL + (start + i * step) % N_TITLES for i in range(n)],
               "action": [actions[i % 3] for i in range(n)],
               "duration": [S.NO_DURATION + (i % 2) for i in range(n)],
               "device": [S.N_SPECIAL + p % 2] * n}
        for f in S.TOKEN_FIELDS[4:]:
            row[f] = [S.N_SPECIAL] * n
        rows.append(row)
    atomic_write_table(pa.Table.from_pylist(rows, schema=S.HISTORY_SCHEMA),
                       partition(paths.history, dt.date.fromisoformat(DAY)) / "part-0.parquet")


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest: tiny models run on one thread


TINY = {"date": DAY, "d_model": 16, "n_layers": 1, "n_heads": 2, "max_len": 32, "content_dim": 8, "max_epochs": 3,
        "time_budget_s": 30.0, "batch_size": 16, "lr": 1e-2}


@pytest.fixture
def trained(home):
    write_home(home)
    out = train.run(train.TrainJobConfig(**TINY, leave_one_out=True, holdout_titles_frac=0.2), home)
    return home, out


def test_train_records_holdout_and_trains_without_targets_or_held_titles(trained):
    paths, out = trained
    meta = checkpoint.read_meta(paths.models / out["model_version"])
    held = meta["holdout_titles"]["title_ids"]
    assert meta["evaluation_split"] == "leave_one_out" and len(held) == 8
    model, _, _ = checkpoint.load(paths.models / out["model_version"])
    idx = [int(t[1:]) + S.N_SPECIAL for t in held]
    assert torch.equal(model.title.id.weight[idx], torch.zeros(len(idx), 16))        # content-only
    seqs = Sequences.read(partition(paths.history, dt.date.fromisoformat(DAY)))
    kept, held_ids = train.training_sequences(train.TrainJobConfig(**TINY, leave_one_out=True, holdout_titles_frac=0.2), seqs)
    assert sorted(held_ids.tolist()) == sorted(idx)
    assert not np.isin(kept.values["title"], held_ids).any()
    assert meta["trained_on"] == [{"history_state": DAY, "held_out_back": 2}]       # last two events never trained
    assert out["valid"]["users"] > 0 and meta["metrics"]["history"]
    assert not (paths.models / ".train-state" / out["model_version"]).exists()    # cleaned up once complete


def test_evaluate_cli_json(trained, capsys):
    paths, out = trained
    cli.main(["evaluate", "users=1-60", f"out={paths.home / 'eval.json'}"])
    printed = json.loads(capsys.readouterr().out)
    written = json.loads((paths.home / "eval.json").read_text())
    assert printed["metrics"] == written["metrics"]
    assert printed["model_version"] == out["model_version"] and not printed["trained_on_eval_targets"]
    assert printed["data"]["users"] == 60 and printed["data"]["titles_ranked"] == N_TITLES
    m = printed["metrics"]
    assert m["users"] == 60 and set(m) == {"hr@10", "ndcg@10", "hr@50", "ndcg@50", "users"}
    assert all(0.0 <= m[k] <= 1.0 for k in ("hr@10", "ndcg@10", "hr@50", "ndcg@50"))
    assert m["hr@50"] == 1.0                                                # only 40 titles: all in the top 50
    assert set(printed["heads"]) == {"action", "duration", "device"}
    assert all(0.0 <= h["accuracy"] <= 1.0 and h["n"] == 60 for h in printed["heads"].values())
    cold = printed["cold_start"]
    assert cold["titles_held_out"] == 8 and 0 < cold["users"] < 60
    for variant in ("served", "regressed", "content", "no_content"):
        assert cold[variant]["users"] == cold["users"] and 0.0 <= cold[variant]["ndcg@10"] <= 1.0
    assert cli.main(["evaluate", "users=abc"]) == 1                       # one message, no traceback
    assert "users must be LO-HI" in capsys.readouterr().err
    with pytest.raises(ValueError, match="users must be LO-HI"):
        cli.main(["evaluate", "users=abc", "--debug"])


def test_evaluate_warns_when_the_model_saw_the_targets_and_resume_keeps_the_version(home):
    write_home(home)
    plain = train.run(train.TrainJobConfig(**{**TINY, "max_epochs": 1}), home)
    again = train.run(train.TrainJobConfig(**{**TINY, "max_epochs": 1}, resume=True), home)     # no state: starts fresh
    assert not again["resumed"] and again["model_version"] == plain["model_version"] + "-r2"   # never overwrites
    assert (home.models / plain["model_version"] / "config.json").exists()
    vocab = pq.read_table(home.title_vocab)               # two titles arrive after training
    atomic_write_table(pa.concat_tables([vocab, pa.table({
        "title_id": ["new1", "new2"], "idx": pa.array([N_TITLES + 2, N_TITLES + 3], pa.int32()),
        "first_dt": pa.nulls(2, pa.date32())}, schema=S.TITLE_VOCAB_SCHEMA)]), home.title_vocab)
    out = evaluate.run(evaluate.EvalConfig(max_users=10), home)
    # without leave_one_out each profile's last event chose the checkpoint: every test target overlaps
    assert out["trained_on_eval_targets"] and "leave_one_out=true" in out["warning"]
    assert out["overlap"] == {"targets": 10, "trained": 0, "validated": 10}
    assert out["cold_start"] is None and out["metrics"]["users"] == 10
    assert out["data"]["titles_added_since_training"] == 2 and out["data"]["titles_ranked"] == N_TITLES


def test_overlap_of_training_events_and_targets_is_detected(trained):
    """A leave_one_out model: its test targets are clean; the validation split is the event it chose
    its checkpoint on; and a model trained on every event overlaps the targets it trained on."""
    paths, out = trained
    model = str(paths.models / out["model_version"])
    test = evaluate.run(evaluate.EvalConfig(model=model, max_users=20), paths)
    assert test["trained_on_eval_targets"] is False and "warning" not in test
    assert test["overlap"] == {"targets": 20, "trained": 0, "validated": 0}
    valid = evaluate.run(evaluate.EvalConfig(model=model, max_users=20, split="valid"), paths)
    assert valid["trained_on_eval_targets"] and valid["overlap"]["validated"] > 0 and valid["overlap"]["trained"] == 0
    plain = train.run(train.TrainJobConfig(**{**TINY, "max_epochs": 1}), paths)       # trained up to the last event
    leak = evaluate.run(evaluate.EvalConfig(model=plain["path"], max_users=20, split="valid"), paths)
    assert leak["trained_on_eval_targets"] and leak["overlap"]["trained"] == 20


def test_head_accuracy_and_content_only_on_hand_computed_cases():
    m = FoundationModel(ModelConfig(n_titles=6, content_dim=4, d_model=8, n_layers=1, n_heads=2, max_len=8, dropout=0.0))
    with torch.no_grad():                                     # the action head always answers `play`
        m.heads["action"].weight.zero_()
        m.heads["action"].bias.zero_()
        m.heads["action"].bias[S.vocab_index(S.ACTIONS)["play"]] = 1.0
    play, done = S.vocab_index(S.ACTIONS)["play"], S.vocab_index(S.ACTIONS)["complete"]
    vals = {f: np.full(7, S.N_SPECIAL, np.int32) for f in S.TOKEN_FIELDS}
    vals["action"] = np.array([play, done, play, play, done, done, play], np.int32)
    seqs = Sequences(np.array([1, 2]), np.array([0, 4, 7]), vals)
    # targets: row 0 token 3 (play), row 0 token 1 (complete), row 1 token 2 (= flat 6, play)
    acc = head_accuracy(m, seqs, np.array([0, 0, 1]), np.array([3, 1, 2]), heads=("action",))
    assert {k: acc["action"][k] for k in ("accuracy", "majority", "n")} == {
        "accuracy": pytest.approx(2 / 3), "majority": pytest.approx(2 / 3), "n": 3}
    assert acc["action"]["auc"] == {"play": 0.5, "complete": 0.5} and acc["action"]["macro_auc"] == 0.5  # no signal
    scores = np.zeros((4, S.N_SPECIAL + 3))                   # value 3 ranked perfectly, value 2 backwards
    scores[:, 3], scores[:, 2] = [0.9, 0.8, 0.1, 0.2], [0.9, 0.8, 0.1, 0.2]
    aucs = one_vs_rest_auc(scores, np.array([3, 3, 2, 2]), S.ACTIONS)
    assert aucs == {S.ACTIONS[1]: 1.0, S.ACTIONS[0]: 0.0}
    m.title.content.copy_(torch.randn(6, 4))
    c = content_only(m, np.array([3]))
    assert torch.allclose(c.title.table()[3], c.title.proj(c.title.content[3]))
    assert torch.equal(c.title.table()[4], m.title.table()[4]) and m.title.id.weight[3].abs().sum() > 0
    assert torch.equal(content_only(m, np.array([3]), content=False).title.table()[3], torch.zeros(8))
    r = regressed(m, np.array([3]))                           # title 3 as if it arrived after training
    assert torch.equal(r.title.table()[4], m.title.table()[4])
    assert not torch.allclose(r.title.table()[3], m.title.table()[3]) and not torch.allclose(r.title.table()[3], c.title.table()[3])


def test_evaluate_reads_the_movielens_file_in_protocol_order(home, tmp_path):
    """data=movielens: ratings in (timestamp, line) order, movie ids mapped onto the pipeline vocabulary
    (whatever its order), only rated movies ranked."""
    import gzip

    from fm import movielens as M
    from fm.content import ContentEncoder
    ml_dir = tmp_path / "ml"
    ml_dir.mkdir()
    with gzip.open(ml_dir / M.RATINGS_FILE, "wb") as f:     # user 7 rates 30 and 20 at the same second
        f.write(b"7::40::3::300\n7::30::5::200\n3::20::1::50\n7::20::2::200\n7::10::4::100\n3::10::5::60\n3::30::3::60\n")
    ids = ["60", "30", "10", "40", "20"]                     # vocabulary order differs from movie order
    atomic_write_table(pa.table({"title_id": ids, "idx": pa.array(range(2, 7), pa.int32()),
                                 "first_dt": pa.nulls(5, pa.date32())}, schema=S.TITLE_VOCAB_SCHEMA), home.title_vocab)
    seqs, source = evaluate.movielens_data(evaluate.EvalConfig(path=str(ml_dir)), [None, None, *ids])
    idx = {t: i + 2 for i, t in enumerate(ids)}
    assert source["source"] == "movielens"
    assert seqs.values["title"].tolist() == [idx[m] for m in ("20", "10", "30", "10", "30", "20", "40")]
    m = FoundationModel(ModelConfig(n_titles=7, content_dim=4, d_model=8, n_layers=1, n_heads=2, max_len=8))
    enc = ContentEncoder.fit(["space robot", "love wedding", "dragon magic", "war soldier"], dim=4)
    d = checkpoint.save(m, enc, home.models / "v", {"model_version": "v", "vocab_size": 5,
                                                     "vocab_fingerprint": checkpoint.vocab_fingerprint(ids)})
    out = evaluate.run(evaluate.EvalConfig(model=str(d), data="movielens", path=str(ml_dir)), home)
    assert out["data"]["titles_ranked"] == 4 and out["metrics"]["users"] == 2     # "60" was never rated
    # user 3: history {20, 10} removed, target 30 among {30, 40}; user 7: history {10, 30, 20} removed, 40 alone
    assert out["metrics"]["hr@10"] == 1.0 and out["data"]["users"] == 2


def test_count_baseline_answers_each_users_most_frequent_action_and_ranks_by_its_share():
    from bench.quality import count_baseline
    play, buy = S.vocab_index(S.ACTIONS)["play"], S.vocab_index(S.ACTIONS)["complete"]
    vals = {f: np.full(8, S.N_SPECIAL, np.int32) for f in S.TOKEN_FIELDS}
    # user 0 mostly buys and buys next; user 1 only plays and plays next; user 2 mostly plays, then buys
    vals["action"] = np.array([buy, buy, buy, play, play, play, play, buy], np.int32)
    seqs = Sequences(np.array([1, 2, 3]), np.array([0, 3, 5, 8]), vals)
    es = P.EvalSet(np.array([0, 1, 2]), np.array([2, 1, 2]), np.zeros(3, np.int64), "test")
    got = count_baseline(seqs, es)
    assert got["accuracy"] == pytest.approx(2 / 3)                    # user 2's buy is missed
    assert got["auc"] == {"complete": 0.75, "play": 0.75}              # shares 1, 0, 0 for buy vs truths buy, play, buy
