"""Streaming inference over Arrow: history rows in, vector rows out, memory bounded by one chunk.

:func:`embed_batches` is the core both execution paths share (single process and Spark
``mapInArrow``). :func:`iter_history` reads a history partition row group by row group and skips
the row groups whose ``last_dt`` statistics exclude the day: the history is written sorted by
(``last_dt``, ``profile_id``) with bounded row groups (:mod:`jobs.tokenize`), so a day's active
profiles are read without scanning every profile (:func:`history_scan` measures it).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from fm.data import Sequences
from fm.extract import DEFAULT_CHUNK_PROFILES, ProfileEncoder, encode_sequences
from fm.schema import TOKEN_FIELDS

def vector_array(v: np.ndarray) -> pa.Array:
    """(N, D) float32 -> list<float32> Arrow array (zero-copy values)."""
    v = np.ascontiguousarray(v, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1)), v.shape[1]).cast(pa.list_(pa.float32()))


def vectors_schema(names: list[str]) -> pa.Schema:
    return pa.schema([pa.field("profile_id", pa.int64(), nullable=False)]
                     + [pa.field(n, pa.list_(pa.float32())) for n in names])


def _chunks(batches: Iterable[pa.RecordBatch], rows: int) -> Iterator[pa.Table]:
    """Re-cut a stream of record batches into tables of exactly ``rows`` rows (the last may be short)."""
    buf: list[pa.RecordBatch] = []
    n = 0
    for b in batches:
        if b.num_rows == 0:
            continue
        buf.append(b)
        n += b.num_rows
        while n >= rows:
            t = pa.Table.from_batches(buf)
            yield t.slice(0, rows)
            rest = t.slice(rows)
            buf, n = rest.to_batches(), rest.num_rows
    if n:
        yield pa.Table.from_batches(buf)


def embed_batches(encoder: ProfileEncoder, batches: Iterable[pa.RecordBatch], *,
                  chunk_profiles: int = DEFAULT_CHUNK_PROFILES, batch_tokens: int = 0,
                  max_batch: int = 0, device: torch.device | str = "cpu",
                  rotations: dict[str, np.ndarray] | None = None) -> Iterator[pa.RecordBatch]:
    """History record batches (``profile_id`` + one list column per token field) -> record batches
    of ``profile_id`` + one vector column per spec, one per chunk of ``chunk_profiles`` profiles,
    sorted by ``profile_id`` within the chunk. ``rotations`` maps a column to a (D, D) matrix that
    its vectors are multiplied by (the stabilising alignment, :mod:`fm.align`).

    Memory is bounded by one chunk, whatever the number of profiles. Used by both engines.
    """
    schema = vectors_schema(encoder.names)
    rot = {k: np.asarray(v, np.float32) for k, v in (rotations or {}).items()}
    for table in _chunks(batches, chunk_profiles):
        seqs = Sequences.from_table(table)
        if (seqs.lengths < 1).any():
            bad = seqs.profile_id[seqs.lengths < 1][:5].tolist()
            raise ValueError(f"profiles with an empty history cannot be embedded: {bad}")
        vecs = encode_sequences(encoder, seqs, batch_tokens=batch_tokens, max_batch=max_batch, device=device)
        order = np.argsort(seqs.profile_id, kind="stable")
        cols = [pa.array(seqs.profile_id[order], pa.int64())]
        for name in encoder.names:
            v = vecs[name][order]
            if name in rot:
                v = v @ rot[name]
            cols.append(vector_array(v))
        yield pa.RecordBatch.from_arrays(cols, schema=schema)


def history_files(path: Path) -> list[Path]:
    """Parquet files of a partition directory (Spark's ``_SUCCESS``/``.crc`` side files skipped)."""
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*.parquet") if not p.name.startswith((".", "_")))


def day_row_groups(pf: pq.ParquetFile, day=None) -> list[int]:
    """Row groups of one history file that may hold rows with ``last_dt == day`` (every row group
    when ``day`` is None): those whose ``last_dt`` statistics include the day, or have none."""
    groups = list(range(pf.num_row_groups))
    if day is None:
        return groups
    col = pf.schema_arrow.get_field_index("last_dt")
    keep = []
    for g in groups:
        st = pf.metadata.row_group(g).column(col).statistics
        if st is None or not st.has_min_max or st.min <= day <= st.max:
            keep.append(g)
    return keep


def history_scan(path: Path, day=None, columns: tuple[str, ...] = ("profile_id", *TOKEN_FIELDS)) -> dict:
    """What :func:`iter_history` reads of a history partition for ``day``, from the footers only:
    row groups and compressed bytes (of the columns read) kept vs in the files, and the rows kept."""
    want = list(dict.fromkeys([*columns, *(["last_dt"] if day is not None else [])]))
    out = {"files": 0, "row_groups": 0, "row_groups_read": 0, "bytes": 0, "bytes_read": 0, "rows": 0, "rows_read": 0}
    for f in history_files(path):
        pf = pq.ParquetFile(f)
        md = pf.metadata
        leaves = {i for i in range(md.num_columns)
                  if md.schema.column(i).path.split(".")[0] in want}     # a list column's leaf is "title.list.element"
        kept = set(day_row_groups(pf, day))
        out["files"] += 1
        for g in range(md.num_row_groups):
            rg = md.row_group(g)
            size = sum(rg.column(i).total_compressed_size for i in leaves)
            out["row_groups"] += 1
            out["bytes"] += size
            out["rows"] += rg.num_rows
            if g in kept:
                out["row_groups_read"] += 1
                out["bytes_read"] += size
                out["rows_read"] += rg.num_rows
    return out


def iter_history(path: Path, day=None, ids: np.ndarray | None = None, batch_rows: int = 1024,
                 columns: tuple[str, ...] = ("profile_id", *TOKEN_FIELDS)) -> Iterator[pa.RecordBatch]:
    """Stream a history partition row group by row group: rows with ``last_dt == day`` (if given)
    and ``profile_id`` in ``ids`` (if given). Row groups whose ``last_dt`` statistics exclude the
    day are not read at all."""
    want = list(dict.fromkeys([*columns, *(["last_dt"] if day is not None else [])]))
    day_scalar = pa.scalar(day, pa.date32()) if day is not None else None
    id_set = pa.array(np.asarray(ids, np.int64)) if ids is not None else None
    for f in history_files(path):
        pf = pq.ParquetFile(f)
        groups = day_row_groups(pf, day)
        if not groups:
            continue
        for b in pf.iter_batches(batch_size=batch_rows, row_groups=groups, columns=want):
            mask = None
            if day_scalar is not None:
                mask = pc.equal(b.column("last_dt"), day_scalar)
            if id_set is not None:
                m2 = pc.is_in(b.column("profile_id"), value_set=id_set)
                mask = m2 if mask is None else pc.and_(mask, m2)
            if mask is not None:
                b = b.filter(mask)
            if b.num_rows:
                yield b.select(list(columns))
