"""MovieLens-1M (the slice in ``/work/shared/data/ml-1m``) as project token sequences.

One token per rating. Mapping onto the event schema (``fm.schema``):

* ``title``  : movie vocabulary index, ``N_SPECIAL + i`` for the i-th smallest MovieID that appears
  in the ratings file (so every rated movie, and only those, is a rankable title);
* ``action`` : rating 4-5 -> ``thumbs_up``, 1-2 -> ``thumbs_down``, 3 -> ``complete``;
* ``hour`` / ``dow`` : UTC hour and day of week of the timestamp, encoded exactly as the Spark
  tokenize job does (``N_SPECIAL + hour``, ``N_SPECIAL + (0 = Sunday .. 6 = Saturday)``);
* ``gap``    : :func:`fm.schema.gap_bucket` of the seconds since the user's previous rating
  (OOV for the first one);
* ``device`` / ``canvas`` / ``locale`` / ``row`` : OOV (MovieLens has none); ``duration``:
  ``NO_DURATION``.

Each user's ratings are ordered by (timestamp, line order in the file), the order the evaluation
protocol in ``/work/shared/data/README.md`` prescribes. The data are read where they lie
(default ``ml-1m`` under :func:`fm.data.data_root`, or ``$FMPIPE_ML1M``); nothing is copied into the repository.
"""
from __future__ import annotations

import gzip
import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from fm import schema as S
from fm.data import Sequences, data_root

DEFAULT_PATH = data_root() / "ml-1m"
RATINGS_FILE = "ratings_users_0001-2999.dat.gz"
ACTION_OF_RATING = {1: "thumbs_down", 2: "thumbs_down", 3: "complete", 4: "thumbs_up", 5: "thumbs_up"}


def data_path(path: str | Path | None = None) -> Path:
    """Explicit path, else ``$FMPIPE_ML1M``, else the shared default."""
    return Path(path or os.environ.get("FMPIPE_ML1M") or DEFAULT_PATH)


def _read_dat(path: Path, names: list[str], encoding: str = "latin-1") -> pd.DataFrame:
    """``::``-separated file (plain or .gz) -> DataFrame of strings, in file order."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read().decode(encoding)
    rows = [line.split("::", len(names) - 1) for line in raw.splitlines() if line.strip()]
    rows = [r + [""] * (len(names) - len(r)) for r in rows]
    return pd.DataFrame(rows, columns=names)


def read_ratings(path: str | Path | None = None, file: str = RATINGS_FILE) -> pd.DataFrame:
    """Ratings in file order: user, movie, rating, ts (int64) and ``line`` (0-based line number)."""
    p = data_path(path)
    p = p / file if p.is_dir() else p
    opener = gzip.open if p.suffix == ".gz" else open
    with opener(p, "rb") as f:
        text = f.read().decode("latin-1").replace("::", "\t")
    df = pd.read_csv(io.StringIO(text), sep="\t", header=None, names=["user", "movie", "rating", "ts"],
                     dtype=np.int64)
    df["line"] = np.arange(len(df), dtype=np.int64)
    return df


def sort_events(df: pd.DataFrame) -> pd.DataFrame:
    """Each user's events by (timestamp, line order in the file); users by id."""
    order = np.lexsort((df["line"].to_numpy(), df["ts"].to_numpy(), df["user"].to_numpy()))
    return df.iloc[order].reset_index(drop=True)


def actions_of_ratings(ratings: np.ndarray) -> np.ndarray:
    """Rating 1..5 -> action vocabulary id (thumbs_down / complete / thumbs_up)."""
    idx = S.vocab_index(S.ACTIONS)
    lut = np.full(6, S.OOV, np.int32)
    for r, a in ACTION_OF_RATING.items():
        lut[r] = idx[a]
    return lut[np.asarray(ratings, np.int64)]


def gap_buckets(gap_s: np.ndarray, first: np.ndarray) -> np.ndarray:
    """Vectorised :func:`fm.schema.gap_bucket` (tests check it value by value); ``first`` -> OOV."""
    g = np.maximum(np.asarray(gap_s, np.float64), 1.0)
    b = S.N_SPECIAL + np.minimum(np.floor(np.log2(g)).astype(np.int64), S.N_GAP - S.N_SPECIAL - 1)
    return np.where(first, S.OOV, b).astype(np.int32)


@dataclass
class MovieLens:
    seqs: Sequences            # one row per user (ascending user id), tokens in protocol order
    movie_ids: np.ndarray      # (n_movies,) MovieID of title index N_SPECIAL + i
    ts: np.ndarray             # (total,) unix seconds, aligned with seqs.values
    rating: np.ndarray         # (total,) 1..5, aligned with seqs.values

    @property
    def n_titles(self) -> int:
        """Title vocabulary size including PAD and OOV."""
        return len(self.movie_ids) + S.N_SPECIAL

    def title_index(self) -> dict[int, int]:
        return {int(m): i + S.N_SPECIAL for i, m in enumerate(self.movie_ids)}


def to_sequences(df: pd.DataFrame, movie_ids: np.ndarray | None = None) -> MovieLens:
    """Ratings (any order) -> :class:`MovieLens` with project tokens, sorted as the protocol says."""
    df = sort_events(df)
    if movie_ids is None:
        movie_ids = np.unique(df["movie"].to_numpy())
    movie_ids = np.asarray(movie_ids, np.int64)
    pos = np.searchsorted(movie_ids, df["movie"].to_numpy())
    pos = np.minimum(pos, len(movie_ids) - 1)
    known = movie_ids[pos] == df["movie"].to_numpy()
    title = np.where(known, pos + S.N_SPECIAL, S.OOV).astype(np.int32)

    users = df["user"].to_numpy()
    ts = df["ts"].to_numpy().astype(np.int64)
    first = np.ones(len(df), bool)
    first[1:] = users[1:] != users[:-1]
    gap = np.zeros(len(df), np.float64)
    gap[1:] = np.maximum(ts[1:] - ts[:-1], 0)
    when = pd.to_datetime(ts, unit="s", utc=True)
    n = len(df)
    values = {
        "title": title,
        "action": actions_of_ratings(df["rating"].to_numpy()),
        "duration": np.full(n, S.NO_DURATION, np.int32),
        "device": np.full(n, S.OOV, np.int32),
        "canvas": np.full(n, S.OOV, np.int32),
        "locale": np.full(n, S.OOV, np.int32),
        "row": np.full(n, S.OOV, np.int32),
        "hour": (S.N_SPECIAL + when.hour.to_numpy()).astype(np.int32),
        "dow": (S.N_SPECIAL + (when.dayofweek.to_numpy() + 1) % 7).astype(np.int32),   # 0 = Sunday, as Spark
        "gap": gap_buckets(gap, first),
    }
    starts = np.flatnonzero(first)
    offsets = np.concatenate([starts, [n]]).astype(np.int64)
    seqs = Sequences(users[starts].astype(np.int64), offsets, values)
    return MovieLens(seqs, movie_ids, ts, df["rating"].to_numpy().astype(np.int64))


def load(path: str | Path | None = None, users: int | None = None, seed: int = 0) -> MovieLens:
    """Load the slice. ``users``: keep a random subset of that many users (for quick runs); the movie
    vocabulary is still every movie of the full ratings file, so rankings stay over all of them."""
    df = read_ratings(path)
    movie_ids = np.unique(df["movie"].to_numpy())
    if users is not None and users < df["user"].nunique():
        keep = np.random.default_rng(seed).choice(np.unique(df["user"].to_numpy()), users, replace=False)
        df = df[df["user"].isin(keep)]
    return to_sequences(df, movie_ids)


# ---------------------------------------------------------------------------------------------
# Movie text for the content encoder
# ---------------------------------------------------------------------------------------------
EXTRA_COLUMNS = ["id", "title", "year", "mpaa", "released", "genres", "director", "writers", "actors",
                 "plot", "poster"]


def movie_catalogue(path: str | Path | None = None) -> pa.Table:
    """Catalogue in :data:`fm.schema.CATALOGUE_SCHEMA` form so :func:`fm.content.title_text` reads it:
    name = title, genres = MovieLens genres + extra-info genres, synopsis = director, actors and plot
    from ``movies_extrainfos.dat`` where present."""
    p = data_path(path)
    movies = _read_dat(p / "movies.dat", ["id", "title", "genres"], encoding="latin-1")
    extra_file = p / "movies_extrainfos.dat"
    extra = {}
    if extra_file.exists():
        ex = _read_dat(extra_file, EXTRA_COLUMNS, encoding="utf-8")
        extra = {r["id"].strip(): r for r in ex.to_dict("records")}
    rows = []
    for r in movies.to_dict("records"):
        mid = r["id"].strip()
        genres = [g for g in r["genres"].strip().split("|") if g]
        e = extra.get(mid)
        synopsis = ""
        if e is not None:
            genres += [g.strip() for g in e["genres"].split(",") if g.strip() and g.strip() != "N/A"]
            parts = [e["director"], e["actors"], e["plot"]]
            synopsis = " ".join(x.strip() for x in parts if x and x.strip() != "N/A")
        rows.append({"title_id": mid, "name": r["title"].strip(), "kind": "movie", "genres": genres,
                     "release_date": None, "synopsis": synopsis, "runtime_s": None})
    return pa.Table.from_pylist(rows, schema=S.CATALOGUE_SCHEMA)


def content_vectors(ml: MovieLens, path: str | Path | None = None, dim: int = 64, seed: int = 0) -> np.ndarray:
    """(n_titles, dim) content matrix indexed like the title vocabulary (PAD/OOV rows zero).

    The encoder is fitted on the text of every catalogue movie (text only, no ratings), so a
    movie held out of training still gets its vector."""
    from fm.content import ContentEncoder, content_matrix, title_text
    cat = movie_catalogue(path)
    enc = ContentEncoder.fit(title_text(cat), dim=dim, seed=seed)
    ids_by_idx: list[str | None] = [None] * S.N_SPECIAL + [str(int(m)) for m in ml.movie_ids]
    return content_matrix(enc, ids_by_idx, cat)
