"""Reading the append-only title vocabulary written by the tokenize job, and which of its titles
belong to a given day."""
from __future__ import annotations

import datetime as dt

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from fm.schema import N_SPECIAL, TITLE_VOCAB_SCHEMA
from jobs.core.settings import Paths


def read_vocab(paths: Paths) -> pa.Table:
    if paths.title_vocab.exists():
        return pq.read_table(paths.title_vocab, schema=TITLE_VOCAB_SCHEMA)
    return TITLE_VOCAB_SCHEMA.empty_table()


def title_ids_by_idx(vocab: pa.Table) -> list[str | None]:
    """Position i holds the title_id of vocabulary id i (None for PAD and OOV)."""
    out: list[str | None] = [None] * N_SPECIAL
    ordered = vocab.sort_by("idx")
    idx = ordered["idx"].to_pylist()
    if idx != list(range(N_SPECIAL, N_SPECIAL + len(idx))):
        raise ValueError("title vocabulary ids are not contiguous from 2: the vocabulary table is corrupt")
    return out + ordered["title_id"].to_pylist()


def released_titles(paths: Paths, day: dt.date) -> list[str]:
    """Catalogue titles released by ``day`` (unknown release date: always): each needs an embedding."""
    if not paths.catalogue.exists():
        raise FileNotFoundError(f"title coverage: catalogue {paths.catalogue} missing")
    cat = pq.read_table(paths.catalogue, columns=["title_id", "release_date"])
    released = pc.or_kleene(pc.is_null(cat["release_date"]), pc.less_equal(cat["release_date"], pa.scalar(day, pa.date32())))
    return sorted(cat.filter(released)["title_id"].to_pylist())


def known_on(paths: Paths, title_ids: list[str | None], day: dt.date) -> np.ndarray:
    """Bool mask over ``title_ids`` (vocabulary order): the titles that exist on ``day``.

    Why not simply the whole vocabulary: it is append-only and grows with later days, so embedding
    yesterday again after today would also write today's new titles, and yesterday's publication
    would change under an Airflow clear or a re-run (refused by publish as a backwards move). A title
    exists on ``day`` unless the catalogue gives it a later release date -- the same rule by which
    tokenize admits titles to the vocabulary (titles without a date, or no longer in the catalogue,
    always exist), so a day's title table is the same whatever the order its days ran in."""
    ids = np.asarray(title_ids, dtype=object)
    if not paths.catalogue.exists():
        return np.ones(len(ids), bool)
    cat = pq.read_table(paths.catalogue, columns=["title_id", "release_date"])
    later = cat.filter(pc.greater(cat["release_date"], pa.scalar(day, pa.date32())))["title_id"].to_pylist()
    return ~np.isin(ids, np.asarray(later, dtype=object))
