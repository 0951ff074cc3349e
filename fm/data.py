"""Token sequences in memory and the padded batches torch reads.

A :class:`Sequences` holds many variable-length profiles as flat value arrays plus offsets
(jagged layout, like HSTU), so a million profiles cost one array per field, not a million lists.
Batches are right-padded with PAD; causal attention means padding after the last real token never
changes the states of real tokens.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from fm.schema import PAD, TOKEN_FIELDS


def data_root() -> Path:
    """Where the shared real datasets lie: ``$FMPIPE_DATA``, else ``../shared/data`` beside the repository
    (never copied into it)."""
    env = os.environ.get("FMPIPE_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


class Batch(NamedTuple):
    tokens: dict[str, torch.Tensor]     # field -> (B, L) int64
    valid: torch.Tensor                 # (B, L) bool, True on real tokens
    lengths: torch.Tensor               # (B,) int64
    rows: np.ndarray                    # (B,) row numbers into the Sequences


@dataclass
class Sequences:
    profile_id: np.ndarray              # (N,) int64
    offsets: np.ndarray                 # (N+1,) int64
    values: dict[str, np.ndarray]       # field -> (total,) int32

    def __len__(self) -> int:
        return len(self.profile_id)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @classmethod
    def from_table(cls, table: pa.Table) -> "Sequences":
        """From a history table (one list<int32> column per token field)."""
        first = table.column(TOKEN_FIELDS[0]).combine_chunks()
        offsets = first.offsets.to_numpy().astype(np.int64) - first.offsets[0].as_py()
        values = {f: table.column(f).combine_chunks().flatten().to_numpy().astype(np.int32) for f in TOKEN_FIELDS}
        return cls(table.column("profile_id").to_numpy().astype(np.int64), offsets, values)

    @classmethod
    def read(cls, path: Path, filter_expr=None) -> "Sequences":
        """A history partition (or file), rows in ``profile_id`` order whatever the files' layout
        (the history is written sorted by last active day, :data:`jobs.tokenize.HISTORY_SORT`), so
        training, evaluation and the benches see the same inputs for the same content."""
        table = pq.read_table(path, columns=["profile_id", *TOKEN_FIELDS], filters=filter_expr)
        ids = table.column("profile_id").to_numpy()
        if len(ids) > 1 and not bool(np.all(ids[1:] >= ids[:-1])):
            table = table.take(pa.array(np.argsort(ids, kind="stable")))
        return cls.from_table(table)

    def take(self, rows: np.ndarray) -> "Sequences":
        lens = self.lengths[rows]
        offsets = np.concatenate([[0], np.cumsum(lens)])
        idx = np.concatenate([np.arange(self.offsets[r], self.offsets[r + 1]) for r in rows]) if len(rows) else np.array([], np.int64)
        return Sequences(self.profile_id[rows], offsets, {f: v[idx] for f, v in self.values.items()})

    def keep_tokens(self, keep: np.ndarray) -> "Sequences":
        """The same profiles with only the tokens where ``keep`` (a flat bool mask) is True, e.g. a
        title held out of training removed from every history. Rows may become shorter or empty."""
        kept = np.concatenate([[0], np.cumsum(keep, dtype=np.int64)])     # kept tokens before each flat index
        offsets = kept[self.offsets].astype(np.int64)
        return Sequences(self.profile_id.copy(), offsets, {f: v[keep] for f, v in self.values.items()})

    def batch(self, rows: np.ndarray, max_len: int, ends: np.ndarray | None = None) -> Batch:
        """Pad the last ``max_len`` tokens before ``ends`` (default: the sequence end) of each row."""
        starts_all, ends_all = self.offsets[rows], self.offsets[rows + 1]
        if ends is not None:
            ends_all = starts_all + ends
        starts = np.maximum(starts_all, ends_all - max_len)
        lens = ends_all - starts
        L = int(max(lens.max(initial=1), 1))
        pos = np.arange(L)[None, :]
        valid = pos < lens[:, None]
        gather = np.where(valid, starts[:, None] + pos, 0)
        tokens = {f: torch.from_numpy(np.where(valid, v[gather], PAD).astype(np.int64)) for f, v in self.values.items()}
        return Batch(tokens, torch.from_numpy(valid), torch.from_numpy(lens.astype(np.int64)), rows)


def length_bucketed(lengths: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    """Row batches of similar length (sorted), so padding wastes little compute at inference."""
    order = np.argsort(lengths, kind="stable")
    for i in range(0, len(order), batch_size):
        yield order[i: i + batch_size]
