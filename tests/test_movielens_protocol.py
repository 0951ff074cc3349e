"""MovieLens loader and leave-one-out protocol on a hand-made ratings file (no real data needed)."""
from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch

from fm import movielens as M
from fm import protocol as P
from fm.fit import training_windows
from fm.losses import Objective, first_positions
from fm import schema as S

# UserID::MovieID::Rating::Timestamp, deliberately out of order and with equal timestamps.
# user 7: ts order 100 (m10), 200 (m30 line 1, m20 line 3 -> line order), 300 (m40), 300 (m50)
# user 3: 50 (m20), 60 (m10), 60 (m30)
RATINGS = """7::40::3::300
7::30::5::200
3::20::1::50
7::20::2::200
7::10::4::100
3::10::5::60
7::50::4::300
3::30::3::60
"""


@pytest.fixture
def data_dir(tmp_path):
    with gzip.open(tmp_path / M.RATINGS_FILE, "wb") as f:
        f.write(RATINGS.encode("latin-1"))
    (tmp_path / "movies.dat").write_bytes(
        "10::Alpha (1990)::Comedy\n20::Beta (1991)::Drama|War\n30::Gamma (1992)::Comedy|Romance\n"
        "40::Delta (1993)::Horror\n50::Epsilon (1994)::Drama\n60::Unrated (1995)::Drama\n".encode("latin-1"))
    (tmp_path / "movies_extrainfos.dat").write_text(
        "10::Alpha::1990::PG::1 Jan 1990::Comedy::Jane Doe::W::Actor One, Actor Two::A funny plot.::http://x\r\n"
        "20::Beta::1991::R::1 Jan 1991::Drama, War::John Roe::W::Actor Three::A war story.::N/A\r\n", encoding="utf-8")
    return tmp_path


def movies_of(ml: M.MovieLens, row: int) -> list[int]:
    s, e = ml.seqs.offsets[row], ml.seqs.offsets[row + 1]
    return [int(ml.movie_ids[t - S.N_SPECIAL]) for t in ml.seqs.values["title"][s:e]]


def test_sort_by_timestamp_then_line_order(data_dir, monkeypatch):
    monkeypatch.setenv("FMPIPE_ML1M", str(data_dir))
    ml = M.load()                                  # path from the environment variable
    assert list(ml.seqs.profile_id) == [3, 7]
    assert movies_of(ml, 0) == [20, 10, 30]
    assert movies_of(ml, 1) == [10, 30, 20, 40, 50]
    assert list(ml.movie_ids) == [10, 20, 30, 40, 50]           # only rated movies are titles
    assert ml.n_titles == 5 + S.N_SPECIAL
    assert list(ml.seqs.lengths) == [3, 5]


def test_ratings_map_to_actions_and_fields(data_dir):
    ml = M.load(data_dir)
    idx = S.vocab_index(S.ACTIONS)
    want = {1: "thumbs_down", 2: "thumbs_down", 3: "complete", 4: "thumbs_up", 5: "thumbs_up"}
    assert [int(a) for a in M.actions_of_ratings(np.arange(1, 6))] == [idx[want[r]] for r in range(1, 6)]
    s, e = ml.seqs.offsets[1], ml.seqs.offsets[2]
    assert list(ml.rating[s:e]) == [4, 5, 2, 3, 4]
    assert list(ml.seqs.values["action"][s:e]) == [idx[want[r]] for r in (4, 5, 2, 3, 4)]
    v = ml.seqs.values
    assert (v["duration"] == S.NO_DURATION).all()
    for f in ("device", "canvas", "locale", "row"):
        assert (v[f] == S.OOV).all()
    # gaps of user 7: first -> OOV, then 100 s, 0 s, 100 s, 0 s through the schema's own function
    assert list(v["gap"][s:e]) == [S.gap_bucket(None), S.gap_bucket(100), S.gap_bucket(0), S.gap_bucket(100), S.gap_bucket(0)]
    # 1970-01-01 was a Thursday (0 = Sunday as in the Spark tokenize job), hour 0 UTC
    assert (v["dow"][s:e] == S.N_SPECIAL + 4).all() and (v["hour"][s:e] == S.N_SPECIAL).all()


def test_vectorised_gap_bucket_matches_schema():
    gaps = np.array([0, 0.5, 1, 2, 3, 4, 1023, 1024, 3600, 86400, 1e9, 1e15])
    got = M.gap_buckets(gaps, np.zeros(len(gaps), bool))
    assert list(got) == [S.gap_bucket(g) for g in gaps]
    assert M.gap_buckets(np.array([5.0]), np.array([True]))[0] == S.OOV


def test_leave_one_out_targets_and_inputs(data_dir):
    ml = M.load(data_dir)
    sp = P.leave_one_out(ml.seqs)
    t = ml.title_index()
    # test target = last event, validation = second-last; inputs = everything before the target
    assert list(sp.test.targets) == [t[30], t[50]]
    assert list(sp.valid.targets) == [t[10], t[40]]
    assert list(sp.test.ends) == [2, 4] and list(sp.valid.ends) == [1, 3]
    # training sees everything before the validation target, nothing after
    assert list(sp.train.lengths) == [1, 3]
    tr = sp.train.values["title"]
    assert list(tr) == [t[20], t[10], t[30], t[20]]
    # the test input of user 7 includes its validation event (m40)
    b = sp.seqs.batch(sp.test.rows[1:], max_len=10, ends=sp.test.ends[1:])
    assert list(b.tokens["title"][0]) == [t[10], t[30], t[20], t[40]]


def test_ranking_removes_whole_history_and_ranks_all_titles(data_dir):
    ml = M.load(data_dir)
    sp = P.leave_one_out(ml.seqs)
    t = ml.title_index()
    # a scorer that loves history titles: 10 > 20 > 30 > 40 > 50; PAD/OOV would win if not removed
    base = torch.tensor([100.0, 100.0, 5.0, 4.0, 3.0, 2.0, 1.0])
    score = lambda b: base.expand(len(b.rows), -1)
    # max_len=1: the model only sees the last event, but the whole history is still removed
    ranks = P.rank_targets(score, sp.seqs, sp.test, max_len=1)
    # user 3 (history 20, 10): target 30 is first among {30, 40, 50}; user 7 (history 10,30,20,40): 50 alone
    assert list(ranks) == [0, 0]
    no_removal = P.rank_targets(score, sp.seqs, sp.test, max_len=1, exclude_history=False)
    assert list(no_removal) == [2, 4]
    m = P.evaluate(score, sp.seqs, sp.test, max_len=1)
    assert m["hr@10"] == 1.0 and m["ndcg@10"] == 1.0 and m["users"] == 2
    # validation of user 7: target 40, history (10, 30, 20) removed -> 40 first, 50 second
    ranks_v = P.rank_targets(score, sp.seqs, sp.valid, max_len=200)
    assert list(ranks_v) == [0, 0]
    assert t[50] - S.N_SPECIAL == 4


def test_catalogue_text_for_content(data_dir):
    cat = M.movie_catalogue(data_dir)
    rows = {r["title_id"]: r for r in cat.to_pylist()}
    assert "War" in rows["20"]["genres"] and "Drama" in rows["20"]["genres"]
    assert "John Roe" in rows["20"]["synopsis"] and "war story" in rows["20"]["synopsis"]
    assert rows["30"]["synopsis"] == "" and rows["30"]["name"] == "Gamma (1992)"
    ml = M.load(data_dir)
    c = M.content_vectors(ml, data_dir, dim=4)
    assert c.shape == (ml.n_titles, 4)
    assert (c[: S.N_SPECIAL] == 0).all()
    assert np.allclose(np.linalg.norm(c[S.N_SPECIAL:], axis=1), 1.0, atol=1e-5)


def _tiny_tokens(n_titles: int = 20):
    from fm.model import ModelConfig
    fields = ModelConfig(n_titles).field_sizes
    tok = {f: torch.full((2, 6), S.OOV) for f in fields}
    tok["action"] = torch.full((2, 6), S.vocab_index(S.ACTIONS)["thumbs_up"])
    tok["title"] = torch.tensor([[2, 3, 4, 3, 6, 7], [8, 9, 10, 11, 8, 0]])
    valid = tok["title"] != S.PAD
    return tok, valid


def test_first_positions():
    titles = torch.tensor([[2, 3, 2, 4, 0]])
    first = first_positions(titles, titles != 0, 6)
    assert first.tolist() == [[5, 5, 0, 1, 3, 5]]        # absent (and PAD) -> L


def test_objective_is_the_full_softmax_cross_entropy_and_history_mask_lowers_it():
    from fm.model import FoundationModel, ModelConfig
    torch.manual_seed(0)
    model = FoundationModel(ModelConfig(20, max_len=8, target_actions=("thumbs_up",), emb_norm=True, mtp_k=1,
                                        w_action=0.0, w_duration=0.0, w_device=0.0)).eval()
    tok, valid = _tiny_tokens()
    plain, parts = Objective(model)(tok, valid)
    h = model.encode(tok)[-1]
    m = (valid & model.target_action[tok["action"]])[:, 1:] & valid[:, :-1]
    ref = torch.nn.functional.cross_entropy(model.title_logits(h[:, :-1][m].unsqueeze(0), 0)[0], tok["title"][:, 1:][m])
    assert torch.allclose(plain, ref) and set(parts) == {"title_1"}
    masked, _ = Objective(model, mask_history=True)(tok, valid)
    assert float(masked.detach()) < float(plain.detach())                 # seen titles left the softmax (repeats kept as targets)
    sampled, sparts = Objective(model, np.arange(20), n_negatives=16, mask_history=True)(tok, valid)
    assert torch.isfinite(sampled) and "title_1" in sparts


def test_detached_heads_train_without_touching_the_shared_state():
    """detach_heads: the side heads get gradients, the transformer gets none from them."""
    from fm.model import FoundationModel, ModelConfig
    torch.manual_seed(0)
    model = FoundationModel(ModelConfig(20, max_len=8, target_actions=("thumbs_up",), w_title=0.0, mtp_k=1,
                                        detach_heads=True))
    tok, valid = _tiny_tokens()
    loss, parts = Objective(model)(tok, valid)
    loss.backward()
    assert {"action", "duration", "device"} <= set(parts)
    assert model.heads["action"].weight.grad.abs().sum() > 0
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.blocks.parameters())


def test_sasrec_scores_ignore_padding_and_train():
    from fm.sasrec import SASRec, SASRecConfig
    torch.manual_seed(0)
    m = SASRec(SASRecConfig(20, max_len=8)).eval()
    tok, valid = _tiny_tokens()
    loss, _ = m(tok, valid)
    assert torch.isfinite(loss)
    seqs = M.to_sequences(__import__("pandas").DataFrame(
        {"user": [1, 1, 1], "movie": [5, 6, 7], "rating": [4, 4, 4], "ts": [1, 2, 3], "line": [0, 1, 2]})).seqs
    short = seqs.batch(np.array([0]), max_len=8, ends=np.array([2]))
    s1 = m.scores(short)
    padded = short._replace(tokens={k: torch.nn.functional.pad(v, (0, 3)) for k, v in short.tokens.items()})
    assert torch.allclose(s1, m.scores(padded), atol=1e-6)
    assert s1.shape == (1, 20) and torch.isinf(s1[0, : S.N_SPECIAL]).all()


def test_training_windows_cover_rows():
    rng = np.random.default_rng(0)
    lengths = np.array([1, 5, 450])
    rows, ends = training_windows(lengths, 200, rng, "tokens")
    assert list(np.bincount(rows, minlength=3)) == [0, 1, 3]           # ceil(len / max_len) windows
    assert (ends[rows == 1] == 5).all() and ((ends[rows == 2] >= 200) & (ends[rows == 2] <= 450)).all()
    rows, ends = training_windows(lengths, 200, rng, "last")
    assert list(rows) == [1, 2] and list(ends) == [5, 450]


def test_a_selection_can_never_read_the_test_targets():
    """Sweeps and checkpoint choice run inside protocol.selecting(): test targets raise there."""
    seqs = M.to_sequences(__import__("pandas").DataFrame(
        {"user": [1] * 4 + [2] * 4, "movie": [5, 6, 7, 8, 6, 7, 8, 5], "rating": [4] * 8, "ts": list(range(8)),
         "line": list(range(8))})).seqs
    split = P.leave_one_out(seqs)
    score = P.popularity_scores(split.train, 10)
    with P.selecting():
        assert P.evaluate(score, seqs, split.valid, 8)["users"] == 2
        with pytest.raises(P.SelectionReadTest, match="choose on Split.valid only"):
            P.evaluate(score, seqs, split.test, 8)
    assert P.evaluate(score, seqs, split.test, 8)["users"] == 2              # after the selection: allowed
