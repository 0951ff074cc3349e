"""Diverse top-k: maximal marginal relevance (MMR) and a per-genre cap over a candidate pool.

Retrieval ranks titles by the model's score (profile . title); the top of that list is often ten
versions of one taste. MMR (Carbonell & Goldstein, 1998) re-ranks a candidate pool greedily: the
next pick maximises

    lam * relevance(i) - (1 - lam) * max_{j picked} cos(title_i, title_j)

``relevance`` is the model's score min-max scaled to [0, 1] over the pool, so ``lam`` trades two
quantities on the same scale whatever the score's units (raw dot products differ per model and
profile); ``lam = 1`` is the plain top-k. Similarity is the cosine of the *published* title
vectors, the same vectors the index scores with.

``genre_cap = N`` (alone or with MMR): a title is skipped while any of its genres already has N
picks; titles without genres are never capped. When the pool runs out before ``k`` picks, the
result is shorter rather than breaking the cap.

Pure numpy, no I/O: ``jobs.tools.retrieve`` (``diversity=mmr lambda=0.7 genre_cap=2``) and
``bench/consumers.py`` (the similarity / NDCG trade-off) both call :func:`rerank`.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def intra_list_similarity(vectors: np.ndarray) -> float:
    """Mean pairwise cosine of a list's title vectors (0.0 for fewer than two)."""
    v = unit(vectors)
    n = len(v)
    if n < 2:
        return 0.0
    s = v @ v.T
    return float((s.sum() - np.trace(s)) / (n * (n - 1)))


def rerank(scores: np.ndarray, vectors: np.ndarray, k: int, lam: float = 1.0,
           genres: Sequence[Sequence[str]] | None = None, genre_cap: int = 0) -> np.ndarray:
    """Positions (into the pool) of the ``k`` titles picked, in pick order.

    ``scores`` (n,) the model's scores of the pool, ``vectors`` (n, d) their title vectors,
    ``lam`` in [0, 1] (1: relevance only), ``genres`` per pool title (needed with ``genre_cap``)."""
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lambda must be in [0, 1], got {lam}")
    if genre_cap < 0:
        raise ValueError(f"genre_cap must be >= 0, got {genre_cap}")
    scores = np.asarray(scores, np.float64)
    n = len(scores)
    k = min(k, n)
    if genre_cap and genres is None:
        raise ValueError("genre_cap needs the pool's genres")
    lo, hi = (scores.min(), scores.max()) if n else (0.0, 0.0)
    rel = (scores - lo) / (hi - lo) if hi > lo else np.ones(n)
    v = unit(vectors) if lam < 1.0 else None
    max_sim = np.full(n, -np.inf)                 # max cosine to anything picked so far (none yet)
    open_ = np.ones(n, bool)
    used: dict[str, int] = {}
    picked: list[int] = []
    while len(picked) < k and open_.any():
        gain = rel if v is None or not picked else lam * rel - (1.0 - lam) * max_sim
        i = int(np.argmax(np.where(open_, gain, -np.inf)))
        open_[i] = False
        if genre_cap and any(used.get(g, 0) >= genre_cap for g in genres[i]):
            continue                              # its genre is full: never picked
        picked.append(i)
        if genre_cap:
            for g in set(genres[i]):
                used[g] = used.get(g, 0) + 1
        if v is not None:
            max_sim = np.maximum(max_sim, v @ v[i])
    return np.asarray(picked, np.int64)
