"""Reading the append-only title vocabulary written by the tokenize job."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from fm.schema import N_SPECIAL, TITLE_VOCAB_SCHEMA
from jobs.settings import Paths


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
