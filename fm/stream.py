"""Streaming inference over Arrow: history rows in, vector rows out, memory bounded by one chunk.

How the vectors are computed at scale lives here; what they are (layer specs, the encoder, pooling,
the eager reference) lives in :mod:`fm.extract`. :func:`encode_sequences` runs the encoder over
length-bucketed batches sized per device (:data:`BATCH_LIMITS`); on an accelerator the batches are
gathered there (:func:`gather_batch`).

:func:`embed_batches` is the core both execution paths share (single process and Spark
``mapInArrow``). :func:`iter_history` reads a history partition row group by row group and skips
the row groups whose ``last_dt`` statistics exclude the day: the history is written sorted by
(``last_dt``, ``profile_id``) with bounded row groups (:mod:`jobs.tokenize`), so a day's active
profiles are read without scanning every profile (:func:`history_scan` measures it).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import platform
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from fm.data import Sequences
from fm.extract import (DEFAULT_BATCH_TOKENS, DEFAULT_CHUNK_PROFILES, ProfileEncoder, autocast, batch_ids, row_windows,
                        token_batches)
from fm.schema import PAD, TOKEN_FIELDS

# Forward-batch limits per device: (padded tokens, profiles). On CPU cores 8,192 tokens keep one
# batch's activations near the caches (bench/embed.py). A GPU needs far more work per launch to get
# past launch and host overhead: on an H200 (bench/gpu_check.sh) 8,192-token batches reached 2% of
# the bf16 matmul bound on the production shape.
BATCH_LIMITS = {"cpu": (DEFAULT_BATCH_TOKENS, 1024), "cuda": (262_144, 4096)}


def batch_limits(device: torch.device | str, batch_tokens: int = 0, max_batch: int = 0) -> tuple[int, int]:
    """(padded tokens, profiles) per forward batch on ``device``; a non-zero argument overrides its default."""
    tokens, rows = BATCH_LIMITS.get(torch.device(device).type, BATCH_LIMITS["cpu"])
    return batch_tokens or tokens, max_batch or rows


@functools.cache
def keep_freed_buffers(limit: int = 1 << 30) -> bool:
    """Ask glibc to keep freed buffers up to ``limit`` bytes for reuse (once per process; False
    where the C library is not glibc, which changes nothing).

    Why: one batch's widest activation (8,192 tokens x 4 d_model float32: 32 MiB at d_model 256) is
    above glibc's largest automatic mmap threshold (32 MiB), so each free hands it back to the OS and
    the next batch's allocation page-faults it in again, zero-filled: about a tenth of CPU encode
    time on the production shape (``bench/embed.py``). With the mmap and trim thresholds raised the
    pages stay in the heap; the process keeps its peak working set instead of shrinking between
    batches, which an inference process wants anyway."""
    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    m_trim_threshold, m_mmap_threshold = -1, -3                 # <malloc.h>
    return bool(libc.mallopt(m_mmap_threshold, limit)) and bool(libc.mallopt(m_trim_threshold, limit))


@torch.inference_mode()
def encode_sequences(encoder: ProfileEncoder, seqs: Sequences, *, batch_tokens: int = 0,
                     max_batch: int = 0, device: torch.device | str = "cpu") -> dict[str, np.ndarray]:
    """Vectors of every row of ``seqs`` in row order: {column: (N, D) float32}. Batch limits of 0 are
    the device's (:data:`BATCH_LIMITS`)."""
    device = torch.device(device)
    batch_tokens, max_batch = batch_limits(device, batch_tokens, max_batch)
    if device.type == "cpu":
        keep_freed_buffers()
    n = len(seqs)
    out = {name: np.empty((n, d), np.float32) for name, d in zip(encoder.names, encoder.dims)}
    if n == 0:
        return out
    if device.type != "cpu":
        return _encode_on_device(encoder, seqs, batch_tokens, max_batch, device, out)
    stacked = np.stack([seqs.values[f] for f in TOKEN_FIELDS], axis=1)
    for rows in token_batches(seqs.lengths, encoder.max_len, batch_tokens, max_batch):
        ids, lens = batch_ids(seqs, rows, encoder.max_len, stacked)
        for name, v in zip(encoder.names, encoder(ids, lens)):
            out[name][rows] = v.float().numpy()
    return out


def gather_batch(flat: torch.Tensor, offsets: np.ndarray, rows: np.ndarray, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`batch_ids` computed where ``flat`` ((T, F) ids of every token, fields in TOKEN_FIELDS
    order) lives: the same (B, L, F) ids and (B,) lengths, gathered on that device."""
    starts, lens, L = row_windows(offsets, rows, max_len)
    dev = flat.device
    start, n = torch.from_numpy(starts).to(dev), torch.from_numpy(lens).to(dev)
    pos = torch.arange(L, device=dev)
    valid = pos[None, :] < n[:, None]
    ids = flat[torch.where(valid, start[:, None] + pos[None, :], 0)]
    ids[~valid] = PAD
    return ids, n


def _encode_on_device(encoder: ProfileEncoder, seqs: Sequences, batch_tokens: int, max_batch: int,
                      device: torch.device, out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """encode_sequences on an accelerator. The host must not feed it batch by batch: the chunk's
    token ids go over once, every batch is gathered there (:func:`gather_batch`), and the vectors
    stay there until the chunk is done (one copy back per column). On an H200 the host-side
    gathering and the per-batch copies held the production shape to 2-8% of the bf16 bound."""
    flat = torch.stack([torch.from_numpy(seqs.values[f]).to(device) for f in TOKEN_FIELDS], dim=1)
    kept = {name: torch.empty((len(seqs), d), dtype=torch.float32, device=device)
            for name, d in zip(encoder.names, encoder.dims)}
    for rows in token_batches(seqs.lengths, encoder.max_len, batch_tokens, max_batch):
        ids, lens = gather_batch(flat, seqs.offsets, rows, encoder.max_len)
        at = torch.from_numpy(rows).to(device)
        with autocast(device):
            vecs = encoder(ids, lens)
        for name, v in zip(encoder.names, vecs):
            kept[name].index_copy_(0, at, v.float())
    for name, v in kept.items():
        out[name][:] = v.cpu().numpy()
    return out


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
