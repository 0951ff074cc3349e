"""Top-k titles for a profile: its query vector from Feast online, scored against the current titles.

1. ``get_online_features`` reads the profile's ``emb_layer2_last`` (and ``model_version``) from the
   Feast online store, as a serving system would.
2. The current publication's raw inner-product title index (``titles_ip.faiss``) ranks titles by
   the model's score, the dot product profile·title (not cosine: the title norm is part of it).
3. Titles the profile already finished (action ``complete`` in its history window,
   ``history/dt=D`` of the publication's date D, the last 512 events) are excluded.

A profile whose vector came from another model version than the index's titles is flagged
(``model_version_mismatch``): its vector lives in the previous model's space until it is active
again (or until the embed job re-embeds it).

With ``surface=kids`` the query is the profile's ``emb_surface_kids`` vector (the model's "what
next on the kids canvas", published by embed for a model trained with ``surfaces=...``); a surface
the publication does not carry is an error that names the ones it does. With ``prompt=buy`` the
query is the profile's view under that soft prompt (``emb_prompt_buy``, published by ``fmpipe embed
prompts=buy``), and the answer adds the task's probability (``head_prompt_buy``): the same model,
another task, no retrain.

Diversity (``fm.diversity``): ``diversity=mmr lambda=0.7`` re-ranks a candidate pool (``pool``
titles from the raw-score index, default 5000) by maximal marginal relevance over the published
title vectors of the index's date; ``genre_cap=N`` keeps at most N titles per genre (alone or with
MMR). The default (``diversity=none``, no cap) is the plain top-k, unchanged. The answer then
names the intra-list similarity (mean pairwise cosine) of the diverse list and of the plain top-k.

    fmpipe retrieve profile_id=42 k=10
    fmpipe retrieve profile_id=42 k=10 surface=kids
    fmpipe retrieve profile_id=42 k=10 prompt=buy
    fmpipe retrieve profile_id=42 k=10 diversity=mmr lambda=0.7 genre_cap=3
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from fm.schema import ACTIONS, vocab_index
from jobs.core.io import partition
from jobs.core.settings import Paths, parse_date, parse_overrides
from jobs.core.vocab import read_vocab, title_ids_by_idx

QUERY_FEATURE = "emb_layer2_last"
DIVERSITY = ("none", "mmr")


@dataclass(frozen=True)
class RetrieveConfig:
    profile_id: int = -1
    k: int = 10
    exclude_finished: bool = True
    feature: str = QUERY_FEATURE
    surface: str = ""                  # a published surface (home, search, kids, ...): its vector is the query
    prompt: str = ""                   # a published soft prompt (fmpipe embed prompts=...): its view is the query
    diversity: str = "none"            # none | mmr (fm.diversity: re-rank a candidate pool)
    mmr_lambda: float = 0.7            # `lambda=` on the command line: 1 = relevance only
    genre_cap: int = 0                 # at most this many titles per genre (0: no cap)
    pool: int = 5000                   # candidates re-ranked when diversifying

    def __post_init__(self) -> None:
        if self.diversity not in DIVERSITY:
            raise ValueError(f"diversity={self.diversity!r}: expected one of {', '.join(DIVERSITY)}")
        if not 0.0 <= self.mmr_lambda <= 1.0:
            raise ValueError(f"lambda={self.mmr_lambda}: expected a value in [0, 1] (1 = relevance only)")
        if self.genre_cap < 0 or self.pool < 1 or self.k < 1:
            raise ValueError(f"genre_cap >= 0, pool >= 1 and k >= 1 expected, got {self.genre_cap}, {self.pool}, {self.k}")
        if self.surface and self.prompt:
            raise ValueError(f"surface={self.surface!r} and prompt={self.prompt!r}: ask for one of them")


def finished_titles(paths: Paths, day, profile_id: int) -> set[str]:
    """Title ids with a 'complete' event in the profile's history window after ``day``."""
    path = partition(paths.history, parse_date(day))
    if not path.exists():
        return set()
    t = pq.read_table(path, columns=["profile_id", "title", "action"],
                      filters=pc.field("profile_id") == pa.scalar(int(profile_id), pa.int64()))
    if t.num_rows == 0:
        return set()
    done = vocab_index(ACTIONS)["complete"]
    ids = title_ids_by_idx(read_vocab(paths))
    out = set()
    for titles, actions in zip(t["title"].to_pylist(), t["action"].to_pylist()):
        for title, action in zip(titles or [], actions or []):
            if action == done and 0 <= title < len(ids) and ids[title] is not None:
                out.add(ids[title])
    return out


def _manifest_section(paths: Paths, day, key: str) -> dict:
    manifest = partition(paths.profile_embeddings, parse_date(day)) / "_manifest.json"
    if not manifest.exists():
        return {}
    return dict(json.loads(manifest.read_text()).get(key) or {})


def published_surfaces(paths: Paths, day) -> dict[str, str]:
    """{surface: column} of the profile publication of ``day`` (empty when it has none)."""
    return _manifest_section(paths, day, "surfaces")


def prompt_features(paths: Paths, day, prompt: str) -> tuple[str, str]:
    """(view column, probability column) of ``prompt`` in the publication of ``day``."""
    available = _manifest_section(paths, day, "prompts")
    if prompt not in available:
        have = ", ".join(sorted(available)) or "none (embed with prompts=<name> to publish one)"
        raise ValueError(f"prompt={prompt!r} is not published for {day}; available prompts: {have}")
    return available[prompt]["column"], available[prompt]["score"]


def surface_feature(paths: Paths, day, surface: str) -> str:
    """The profile feature that answers for ``surface`` in the publication of ``day``."""
    available = published_surfaces(paths, day)
    if surface not in available:
        have = ", ".join(sorted(available)) or "none (the model was trained without surfaces=...)"
        raise ValueError(f"surface={surface!r} is not published for {day}; available surfaces: {have}")
    return available[surface]


def profile_vector(store, profile_id: int, feature: str = QUERY_FEATURE,
                   extra: tuple[str, ...] = ()) -> tuple[np.ndarray, str | None, dict]:
    """The profile's query vector, its model version and the ``extra`` features, in one online read."""
    names = [feature, *extra, "model_version"]
    got = store.get_online_features(features=[f"profile_embeddings:{n}" for n in names],
                                    entity_rows=[{"profile_id": int(profile_id)}]).to_dict()
    vec = got[feature][0]
    if vec is None:
        raise KeyError(f"profile {profile_id} has no {feature} in the online store (never published, or expired)")
    return np.asarray(vec, dtype=np.float32), got["model_version"][0], {n: got[n][0] for n in extra}


def title_vectors(paths: Paths, day, title_ids: list[str]) -> np.ndarray:
    """The published title vectors of ``day`` (what the index was built from), in ``title_ids`` order."""
    path = partition(paths.title_embeddings, parse_date(day))
    if not path.exists():
        raise FileNotFoundError(f"no title publication for {day} ({path} is missing): diversity needs the title vectors")
    t = pq.read_table(path, columns=["title_id", "title_embedding"])
    t = t.take(pc.index_in(pa.array(title_ids, pa.string()), t["title_id"]))
    return np.asarray(t["title_embedding"].to_pylist(), np.float32)


def title_genres(paths: Paths, title_ids: list[str]) -> list[list[str]]:
    """Genres of ``title_ids`` from the catalogue (none for a title it lacks)."""
    cat = pq.read_table(paths.catalogue, columns=["title_id", "genres"])
    by_id = dict(zip(cat["title_id"].to_pylist(), cat["genres"].to_pylist()))
    return [list(by_id.get(t) or []) for t in title_ids]


def diversify(paths: Paths, day, pool: list[tuple[str, float]], k: int, lam: float, genre_cap: int) -> tuple[list, dict]:
    """The ``k`` picks of :func:`fm.diversity.rerank` over ``pool`` and the lists' intra-list similarity."""
    from fm.diversity import intra_list_similarity, rerank
    ids = [t for t, _ in pool]
    vecs = title_vectors(paths, day, ids)
    genres = title_genres(paths, ids) if genre_cap else None
    pick = rerank(np.array([s for _, s in pool]), vecs, k, lam, genres, genre_cap)
    info = {"pool": len(pool), "intra_list_similarity": round(intra_list_similarity(vecs[pick]), 6),
            "plain_intra_list_similarity": round(intra_list_similarity(vecs[:k]), 6)}
    return [pool[i] for i in pick], info


def retrieve(paths: Paths, profile_id: int, k: int = 10, exclude_finished: bool = True, feature: str = QUERY_FEATURE,
             store=None, index=None, surface: str = "", diversity: str = "none", mmr_lambda: float = 0.7,
             genre_cap: int = 0, pool: int = 5000, prompt: str = "") -> dict:
    from jobs.core.feast_store import get_store
    from jobs.index import TitleIndex
    store = store or get_store(paths)
    index = index or TitleIndex.current(paths)
    day = index.meta["date"]
    asked, extra = {}, ()
    if surface:
        feature = surface_feature(paths, day, surface)
        asked = {"surface": surface, "feature": feature}
    if prompt:
        feature, score = prompt_features(paths, day, prompt)
        asked, extra = {"prompt": prompt, "feature": feature}, (score,)
    vec, version, more = profile_vector(store, profile_id, feature, extra)
    if prompt:
        p = more[extra[0]]
        asked["task_probability"] = None if p is None else round(float(p[1]), 6)
    exclude = finished_titles(paths, day, profile_id) if exclude_finished else set()
    diverse = {}
    if diversity == "mmr" or genre_cap:
        lam = mmr_lambda if diversity == "mmr" else 1.0
        hits, diverse = diversify(paths, day, index.score(vec, max(pool, k), exclude), k, lam, genre_cap)
        diverse = {"diversity": {"method": diversity, "lambda": lam, "genre_cap": genre_cap, **diverse}}
    else:
        hits = index.score(vec, k, exclude)
    return {"profile_id": int(profile_id), "date": day, "model_version": version,
            "index_model_version": index.meta.get("model_version"),
            "model_version_mismatch": version != index.meta.get("model_version"),
            **asked, **diverse,
            "excluded_finished": sorted(exclude), "titles": [{"title_id": t, "score": round(s, 6)} for t, s in hits]}


def run(cfg: RetrieveConfig, paths: Paths) -> dict:
    if cfg.profile_id < 0:
        raise ValueError("profile_id=<id> is required")
    return retrieve(paths, cfg.profile_id, cfg.k, cfg.exclude_finished, cfg.feature, surface=cfg.surface,
                    diversity=cfg.diversity, mmr_lambda=cfg.mmr_lambda, genre_cap=cfg.genre_cap, pool=cfg.pool,
                    prompt=cfg.prompt)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("overrides", nargs="*", help="key=value overrides of RetrieveConfig (profile_id=42 k=10)")
    # `lambda` is a Python keyword: the command line's lambda=0.7 is the config's mmr_lambda
    overrides = ["mmr_" + o if o.split("=", 1)[0] == "lambda" else o for o in ap.parse_args(argv).overrides]
    out = run(parse_overrides(RetrieveConfig, overrides), Paths.from_env())
    print(json.dumps(out, indent=2))
    return out
