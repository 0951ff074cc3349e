"""Order-independent checksums of embedding tables.

The same partition can be written by different engines (local: one file, row groups in profile
order; Spark: many files in task order) and re-read in any layout, so the checksum is a sum
(mod 2^64) of one hash per row: it depends on which rows (keys and exact float32 bits) a table
holds, never on their order or on how they are split into files and row groups.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fm.align import splitmix64
from fm.stream import history_files

ROW_GROUP = 8192
CHECKSUM_ALGO = "sum64(splitmix64(key) ^ poly64(float32 bits)) per row, order-independent"


def _poly(n_words: int, salt: int) -> np.ndarray:
    return splitmix64(np.arange(n_words, dtype=np.int64) + np.int64(salt * 1_000_003)) | np.uint64(1)


def list_matrix(col) -> np.ndarray:
    """list<float32> column (equal lengths) -> (N, D) float32."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    n = len(arr)
    flat = arr.flatten().to_numpy(zero_copy_only=False)
    return flat.reshape(n, -1) if n else np.zeros((0, 0), np.float32)


def key_hashes(keys) -> np.ndarray:
    arr = keys.combine_chunks() if isinstance(keys, pa.ChunkedArray) else keys
    if pa.types.is_integer(arr.type):
        return splitmix64(arr.to_numpy(zero_copy_only=False).astype(np.int64))
    return np.array([int.from_bytes(hashlib.blake2b(str(k).encode(), digest_size=8).digest(), "little")
                     for k in arr.to_pylist()], dtype=np.uint64)


class Checksum:
    """Sum (mod 2^64) of one 64-bit hash per row over the key and the exact float32 bits of every
    vector column: the same rows give the same checksum in any order and any file layout."""

    def __init__(self, key: str, columns: list[str]):
        self.key, self.columns, self.acc, self.rows = key, list(columns), np.uint64(0), 0

    def update(self, batch: pa.RecordBatch | pa.Table) -> None:
        if batch.num_rows == 0:
            return
        h = key_hashes(batch.column(self.key))
        with np.errstate(over="ignore"):
            for j, name in enumerate(self.columns):
                w = list_matrix(batch.column(name)).view(np.uint32).astype(np.uint64)
                h = splitmix64(h ^ (w * _poly(w.shape[1], j + 1)).sum(axis=1, dtype=np.uint64))
            self.acc = np.uint64((self.acc + h.sum(dtype=np.uint64)) & np.uint64(0xFFFFFFFFFFFFFFFF))
        self.rows += batch.num_rows

    def hexdigest(self) -> str:
        text = f"{self.key}|{','.join(self.columns)}|{self.rows}|{int(self.acc)}"
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def table_checksum(directory: Path, key: str, columns: list[str]) -> tuple[int, str]:
    """Row count and checksum of a written partition, streamed back file by file."""
    c = Checksum(key, columns)
    for f in history_files(directory):
        for b in pq.ParquetFile(f).iter_batches(batch_size=ROW_GROUP, columns=[key, *columns]):
            c.update(b)
    return c.rows, c.hexdigest()
