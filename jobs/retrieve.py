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
the publication does not carry is an error that names the ones it does.

    fmpipe retrieve profile_id=42 k=10
    fmpipe retrieve profile_id=42 k=10 surface=kids
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
from jobs.io import partition
from jobs.settings import Paths, parse_date, parse_overrides
from jobs.vocab import read_vocab, title_ids_by_idx

QUERY_FEATURE = "emb_layer2_last"


@dataclass(frozen=True)
class RetrieveConfig:
    profile_id: int = -1
    k: int = 10
    exclude_finished: bool = True
    feature: str = QUERY_FEATURE
    surface: str = ""                  # a published surface (home, search, kids, ...): its vector is the query


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


def published_surfaces(paths: Paths, day) -> dict[str, str]:
    """{surface: column} of the profile publication of ``day`` (empty when it has none)."""
    manifest = partition(paths.profile_embeddings, parse_date(day)) / "_manifest.json"
    if not manifest.exists():
        return {}
    return dict(json.loads(manifest.read_text()).get("surfaces") or {})


def surface_feature(paths: Paths, day, surface: str) -> str:
    """The profile feature that answers for ``surface`` in the publication of ``day``."""
    available = published_surfaces(paths, day)
    if surface not in available:
        have = ", ".join(sorted(available)) or "none (the model was trained without surfaces=...)"
        raise ValueError(f"surface={surface!r} is not published for {day}; available surfaces: {have}")
    return available[surface]


def profile_vector(store, profile_id: int, feature: str = QUERY_FEATURE) -> tuple[np.ndarray, str | None]:
    got = store.get_online_features(features=[f"profile_embeddings:{feature}", "profile_embeddings:model_version"],
                                    entity_rows=[{"profile_id": int(profile_id)}]).to_dict()
    vec = got[feature][0]
    if vec is None:
        raise KeyError(f"profile {profile_id} has no {feature} in the online store (never published, or expired)")
    return np.asarray(vec, dtype=np.float32), got["model_version"][0]


def retrieve(paths: Paths, profile_id: int, k: int = 10, exclude_finished: bool = True, feature: str = QUERY_FEATURE,
             store=None, index=None, surface: str = "") -> dict:
    from jobs.feast_store import get_store
    from jobs.index import TitleIndex
    store = store or get_store(paths)
    index = index or TitleIndex.current(paths)
    day = index.meta["date"]
    if surface:
        feature = surface_feature(paths, day, surface)
    vec, version = profile_vector(store, profile_id, feature)
    exclude = finished_titles(paths, day, profile_id) if exclude_finished else set()
    hits = index.score(vec, k, exclude)
    return {"profile_id": int(profile_id), "date": day, "model_version": version,
            "index_model_version": index.meta.get("model_version"),
            "model_version_mismatch": version != index.meta.get("model_version"),
            **({"surface": surface, "feature": feature} if surface else {}),
            "excluded_finished": sorted(exclude), "titles": [{"title_id": t, "score": round(s, 6)} for t, s in hits]}


def run(cfg: RetrieveConfig, paths: Paths) -> dict:
    if cfg.profile_id < 0:
        raise ValueError("profile_id=<id> is required")
    return retrieve(paths, cfg.profile_id, cfg.k, cfg.exclude_finished, cfg.feature, surface=cfg.surface)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("overrides", nargs="*", help="key=value overrides of RetrieveConfig (profile_id=42 k=10)")
    out = run(parse_overrides(RetrieveConfig, ap.parse_args(argv).overrides), Paths.from_env())
    print(json.dumps(out, indent=2))
    return out
