"""Diverse retrieval (issue 15, item 6): MMR and the genre cap on a fixed hand-made case, and
``fmpipe retrieve diversity=mmr lambda=... genre_cap=...`` over published title vectors."""
from __future__ import annotations

import datetime as dt

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fm.diversity import intra_list_similarity, rerank
from jobs.tools import retrieve
from jobs.cli import main as cli
from jobs.core.io import partition
from jobs.core.settings import Paths

DAY = dt.date(2026, 11, 2)


def hand_made() -> tuple[np.ndarray, np.ndarray, list[list[str]]]:
    """Eight titles: 0-4 near-copies of one direction (scored highest), 5-7 three other directions."""
    v = np.array([[1.0, 0.00, 0, 0], [1.0, 0.05, 0, 0], [1.0, 0.0, 0.05, 0], [1.0, 0.05, 0.05, 0], [1.0, 0, 0, 0.05],
                  [0.0, 1.0, 0, 0], [0.0, 0, 1.0, 0], [0.0, 0, 0, 1.0]], np.float32)
    scores = np.array([1.0, 0.99, 0.98, 0.97, 0.96, 0.8, 0.7, 0.6])
    genres = [["drama"]] * 5 + [["comedy"], ["drama", "kids"], []]
    return scores, v, genres


def test_mmr_returns_k_distinct_titles_and_lowers_intra_list_similarity():
    scores, v, _ = hand_made()
    plain = rerank(scores, v, 4, lam=1.0)
    assert plain.tolist() == [0, 1, 2, 3]                          # lam=1: the plain top-k
    assert rerank(scores, v, 4, lam=0.9).tolist() == [0, 1, 2, 3]   # relevance still wins at 0.9 here
    mmr = rerank(scores, v, 4, lam=0.5)
    assert len(set(mmr.tolist())) == 4 and mmr[0] == 0            # distinct, starts at the most relevant
    assert mmr.tolist() == [0, 5, 6, 7]
    assert intra_list_similarity(v[mmr]) < 0.5 * intra_list_similarity(v[plain])
    every = rerank(scores, v, 20, lam=0.5)
    assert sorted(every.tolist()) == list(range(8))               # k above the pool: every title once


def test_genre_cap_alone_and_with_mmr():
    scores, v, genres = hand_made()
    got = rerank(scores, v, 5, lam=1.0, genres=genres, genre_cap=2)
    assert got.tolist() == [0, 1, 5, 7]                           # 2 dramas, then only non-drama titles fit
    assert rerank(scores, v, 3, lam=0.5, genres=genres, genre_cap=1).tolist() == [0, 5, 7]
    with pytest.raises(ValueError, match="lambda"):
        rerank(scores, v, 3, lam=1.5)
    with pytest.raises(ValueError, match="genres"):
        rerank(scores, v, 3, genre_cap=1)


class _Store:
    def __init__(self, q: np.ndarray):
        self.q = q

    def get_online_features(self, features, entity_rows):
        return _Dict({"emb_layer2_last": [self.q.tolist()], "model_version": ["m1"]})


class _Dict(dict):
    def to_dict(self):
        return dict(self)


class _Index:
    """The raw-score index over the hand-made titles (what TitleIndex.score answers)."""

    def __init__(self, titles: np.ndarray, ids: list[str]):
        self.meta, self.titles, self.ids = {"date": DAY.isoformat(), "model_version": "m1"}, titles, ids

    def score(self, q, k, exclude):
        s = self.titles @ q
        return [(self.ids[i], float(s[i])) for i in np.argsort(-s, kind="stable") if self.ids[i] not in exclude][:k]


@pytest.fixture()
def published(tmp_path):
    """A home with the hand-made title vectors published for DAY and their genres in the catalogue."""
    _, v, genres = hand_made()
    paths = Paths(tmp_path / "var")
    ids = [f"t{i}" for i in range(len(v))]
    # a query whose raw scores order the titles as hand_made() does
    q = np.array([1.0, 0.8, 0.7, 0.6], np.float32)
    titles = v * (np.array([1.0, 0.99, 0.98, 0.97, 0.96, 0.8, 0.7, 0.6]) / (v @ q))[:, None]
    partition(paths.title_embeddings, DAY).mkdir(parents=True)
    pq.write_table(pa.table({"title_id": ids[::-1], "title_embedding": titles[::-1].tolist()}),
                   partition(paths.title_embeddings, DAY) / "part-0.parquet")
    paths.catalogue.parent.mkdir(parents=True)
    pq.write_table(pa.table({"title_id": ids, "genres": genres}), paths.catalogue)
    return paths, _Store(q), _Index(titles, ids)


def test_retrieve_with_mmr_and_genre_cap(published):
    paths, store, index = published
    kw = dict(exclude_finished=False, store=store, index=index)
    plain = retrieve.retrieve(paths, 1, k=4, **kw)
    assert [t["title_id"] for t in plain["titles"]] == ["t0", "t1", "t2", "t3"] and "diversity" not in plain
    got = retrieve.retrieve(paths, 1, k=4, diversity="mmr", mmr_lambda=0.5, **kw)
    assert [t["title_id"] for t in got["titles"]] == ["t0", "t5", "t6", "t7"]
    d = got["diversity"]
    assert d["pool"] == 8 and d["intra_list_similarity"] < 0.5 * d["plain_intra_list_similarity"]
    capped = retrieve.retrieve(paths, 1, k=4, genre_cap=2, **kw)
    assert [t["title_id"] for t in capped["titles"]] == ["t0", "t1", "t5", "t7"]
    assert capped["diversity"]["lambda"] == 1.0
    small_pool = retrieve.retrieve(paths, 1, k=4, diversity="mmr", mmr_lambda=0.5, pool=3, **kw)
    assert small_pool["diversity"]["pool"] == 4                    # never fewer candidates than k


def test_retrieve_cli_rejects_bad_diversity_options(capsys):
    assert cli(["retrieve", "profile_id=1", "diversity=dpp"]) == 1
    assert "diversity='dpp': expected one of none, mmr" in capsys.readouterr().err
    assert cli(["retrieve", "profile_id=1", "diversity=mmr", "lambda=1.5"]) == 1
    err = capsys.readouterr().err
    assert "lambda=1.5: expected a value in [0, 1]" in err and "Traceback" not in err
    assert cli(["retrieve", "profile_id=1", "genre_cap=-1"]) == 1
