"""Content-kNN: a training-free cold-start baseline. A title's score for a profile is the TF-IDF
cosine between the title's text and the mean text of the profile's history -- what a content-based
recommender with no model gives, and the floor the foundation model's content path must beat."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import scipy.sparse as sp
import torch
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.preprocessing import normalize

from fm.content import title_text
from fm.data import Batch


def title_tfidf(title_ids_by_idx: list[str | None], cat: pa.Table) -> sp.csr_matrix:
    """(n_titles, V) unit-length TF-IDF rows in vocabulary order (rows without text stay empty)."""
    texts = dict(zip(cat["title_id"].to_pylist(), title_text(cat)))
    docs = [texts.get(t, "") if t is not None else "" for t in title_ids_by_idx]
    x = TfidfVectorizer(sublinear_tf=True, dtype=np.float32).fit_transform(docs)
    return normalize(x).tocsr()


def content_knn_scores(x: sp.csr_matrix):
    """A score function (``fm.protocol.ScoreFn``) over every title: cosine to the history's mean text."""
    xt = x.T.tocsr()

    def score(b: Batch) -> torch.Tensor:
        titles, valid = b.tokens["title"].numpy(), b.valid.numpy()
        rows, cols = np.nonzero(valid)
        hist = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, titles[rows, cols])),
                             shape=(titles.shape[0], x.shape[0]))
        profile = normalize(hist @ x)
        return torch.from_numpy(np.asarray((profile @ xt).todense(), np.float32))
    return score
