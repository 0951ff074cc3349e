"""Public-dataset readers: MovieLens and Amazon Beauty files -> raw events + catalogue.

These formats are fixed, so they need no column mapping; each reader only turns its files into a
user/item/timestamp(/action) table and hands it to the generic path in :mod:`jobs.tools.event_import`
(same checks, same raw layout, same ``dataset.json`` targets). What stays here is what the generic
path cannot know: how a rating becomes an action, where Beauty's absolute dates come from, and which
file holds each dataset's item attributes. ``fmpipe import movielens|beauty`` dispatches here from
:mod:`jobs.tools.importers`.
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from fm import schema as S
from fm.data import data_root
from jobs.tools.event_import import ImportConfig, ImportError_, events_from_table, write_dataset_meta, write_raw
from jobs.core.io import atomic_write_table
from jobs.core.settings import Paths


def import_movielens(paths: Paths, path: str | None = None, users: int = 0, ratings_file: str | None = None) -> dict:
    """MovieLens ratings -> raw events, movies (+ extra infos) -> catalogue."""
    from fm import movielens
    ratings = movielens.sort_events(movielens.read_ratings(path, file=ratings_file or movielens.RATINGS_FILE))
    if users:
        ratings = ratings[ratings["user"] <= users]
    table = pa.table({
        "user": ratings["user"].to_numpy(), "item": ratings["movie"].astype(str).to_numpy(),
        "timestamp": ratings["ts"].to_numpy(),
        "action": np.array([movielens.ACTION_OF_RATING[int(r)] for r in ratings["rating"]]),
    })
    events = events_from_table(table, ImportConfig(user="user", item="item", timestamp="timestamp", action="action"),
                               "ml")
    events["event_id"] = [f"ml-{line}" for line in ratings["line"]]
    events["seq"] = ratings["line"].to_numpy(np.int64)       # the file's line order breaks equal timestamps
    atomic_write_table(movielens.movie_catalogue(path), paths.catalogue)
    write_dataset_meta(paths, "movielens", movielens.ACTION_OF_RATING.values())   # every rating is an interaction
    return write_raw(events, paths, "ml")


BEAUTY_EPOCH = pd.Timestamp("2014-07-01", tz="UTC")   # every user's last review lands on this day


def read_beauty(path: Path) -> pd.DataFrame:
    """``Beauty_with_gaps.txt.gz`` (one line per user: ``user item1 .. itemN<TAB>gap1 .. gapN``, items in
    time order, gaps in seconds since the previous event) -> one row per event, in file order, with
    ``seq`` = the event's position in the file. Absolute dates are not in the file: each user's last
    event is put on :data:`BEAUTY_EPOCH` and earlier ones go back by the gaps (relative time kept)."""
    users, items, gaps = [], [], []
    with gzip.open(path, "rt") as f:
        for no, line in enumerate(f, 1):
            ids, _, gap_text = line.rstrip("\n").partition("\t")
            fields, g = ids.split(), gap_text.split()
            if len(fields) < 2 or len(g) != len(fields) - 1:
                raise ImportError_(f"{path}: line {no}: expected 'user item1 .. itemN<TAB>gap1 .. gapN' with one "
                                   f"gap per item, got {len(fields) - 1} items and {len(g)} gaps")
            users += [int(fields[0])] * (len(fields) - 1)
            items += fields[1:]
            gaps.append(np.asarray(g, np.int64))
    df = pd.DataFrame({"user": np.asarray(users, np.int64), "item": items})
    elapsed = np.concatenate([np.cumsum(g) for g in gaps])
    total = np.repeat([int(np.sum(g)) for g in gaps], [len(g) for g in gaps])
    df["ts"] = BEAUTY_EPOCH - pd.to_timedelta(total - elapsed, unit="s")
    df["seq"] = np.arange(len(df), dtype=np.int64)
    return df


def beauty_catalogue(path: Path, item_ids: list[str]) -> pa.Table:
    """Items with their anonymised brand/category attribute ids as the content (``attr<k>`` words)."""
    attrs = json.loads(gzip.open(path, "rt").read()) if path.exists() else {}
    genres = [[f"attr{a}" for a in attrs.get(i, [])] for i in item_ids]
    n = len(item_ids)
    return pa.table({"title_id": item_ids, "name": [f"item {i}" for i in item_ids], "kind": ["product"] * n,
                     "genres": genres, "release_date": [None] * n, "synopsis": [""] * n, "runtime_s": [None] * n},
                    schema=S.CATALOGUE_SCHEMA)


def import_beauty(paths: Paths, path: str | None = None, users: int = 0) -> dict:
    """Amazon Beauty (5-core, the sequential-recommendation preprocessing) -> raw events + catalogue.
    Every review is an interaction (action ``play``)."""
    root = Path(path) if path else data_root() / "amazon-beauty"
    source = root / "Beauty_with_gaps.txt.gz"
    if not source.exists():
        raise FileNotFoundError(f"{source} does not exist (give path=<folder with Beauty_with_gaps.txt.gz>)")
    df = read_beauty(source)
    if users:
        df = df[df["user"] <= users]
    table = pa.table({"user": df["user"].to_numpy(), "item": df["item"].to_numpy(), "timestamp": df["ts"]})
    events = events_from_table(table, ImportConfig(user="user", item="item", timestamp="timestamp"), "beauty")
    events["seq"] = df["seq"].to_numpy()
    atomic_write_table(beauty_catalogue(root / "Beauty_item2attributes.json.gz", sorted(df["item"].unique())),
                       paths.catalogue)
    write_dataset_meta(paths, "amazon-beauty", ["play"])
    return write_raw(events, paths, "beauty")
