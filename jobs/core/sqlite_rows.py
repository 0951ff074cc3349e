"""Feast's SQLite online-store rows built column-wise from Arrow, written with one prepared upsert.

Why: Feast's ``SqliteOnlineStore.online_write_batch`` works cell by cell in Python -- a ``Value``
message per (entity, feature), ``serialize_entity_key`` per entity, one ``execute`` per cell -- and
at 256-d vectors it reached 0.16-0.34x of plain ``sqlite3`` inserting the same rows (issue 16).
Here every column is laid out at once (entity keys and float vectors straight in their wire format
with numpy; repeated scalars such as ``model_version`` serialized once per distinct value) and a
batch goes in with one ``executemany`` of Feast's own upsert statement, in one transaction.

What is written is byte for byte what Feast writes: the same table, the same columns, the same
``entity_key`` / ``value`` / ``value_text`` bytes and the same integer timestamps (Feast's own
adapter is called on each distinct timestamp). Every batch checks its first and last entity key
against Feast's ``serialize_entity_key``, and ``tests/test_publish.py`` compares whole tables with
``online_write_batch``'s. Stores this layout does not cover (a ``vector_enabled`` or
OpenAI-compatible SQLite store, versioned online tables) keep Feast's path (:func:`covers`).
"""
from __future__ import annotations

import sqlite3

import numpy as np
import pyarrow as pa


def covers(store) -> bool:
    """Whether the store is a SQLite online store with Feast's plain row layout."""
    online, registry = store.config.online_store, store.config.registry
    return (getattr(online, "type", "") == "sqlite" and not getattr(online, "vector_enabled", False)
            and not getattr(online, "enable_openai_compatible_store", False)
            and not getattr(registry, "enable_online_feature_view_versioning", False))


def upsert_sql(table: str) -> str:
    """Feast's upsert (``SqliteOnlineStore.online_write_batch``) for its plain layout."""
    return (f'INSERT INTO "{table}" (entity_key, feature_name, value, value_text, event_ts, created_ts) '
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(entity_key, feature_name) DO UPDATE SET "
            "value = excluded.value, value_text = excluded.value_text, event_ts = excluded.event_ts, "
            "created_ts = excluded.created_ts;")


def entity_keys(fv, batch: pa.RecordBatch, version: int) -> list[bytes]:
    """Serialized entity keys of the batch's rows (a single int64 key: laid out with numpy)."""
    from feast.infra.key_encoding_utils import serialize_entity_key
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Value
    from jobs.core.feast_store import entity_key_protos
    names = [c.name for c in fv.entity_columns]
    n = batch.num_rows

    def feast_keys(rows: pa.RecordBatch) -> list[bytes]:
        return [serialize_entity_key(k, version) for k in entity_key_protos(fv, rows)]

    col = batch.column(names[0]) if len(names) == 1 else None
    if col is None or col.type != pa.int64() or col.null_count or not n:
        return feast_keys(batch)
    probe = [serialize_entity_key(EntityKey(join_keys=names, entity_values=[Value(int64_val=v)]), version) for v in (0, 1)]
    prefix = probe[0][:-8]
    if probe[1] != prefix + (1).to_bytes(8, "little") or probe[0] != prefix + bytes(8):
        return feast_keys(batch)                              # another key layout: Feast's serializer
    head = np.frombuffer(prefix, np.uint8)
    mat = np.empty((n, len(head) + 8), np.uint8)
    mat[:, :len(head)] = head
    mat[:, len(head):] = col.to_numpy().astype("<i8").view(np.uint8).reshape(n, 8)
    buf, w = mat.tobytes(), mat.shape[1]
    keys = [buf[i:i + w] for i in range(0, n * w, w)]
    for i in {0, n - 1}:
        if keys[i] != feast_keys(batch.slice(i, 1))[0]:
            raise AssertionError(f"entity key layout differs from Feast's at row {i} of {fv.name}")
    return keys


def cells(field, column: pa.Array) -> tuple[list, list]:
    """(value bytes, value_text) of one feature column, as Feast stores them."""
    from feast.infra.online_stores.helpers import extract_text_and_num
    from feast.types import Array, Float32
    from jobs.core.feast_store import float_list_bytes, scalar_values
    if field.dtype == Array(Float32):
        return float_list_bytes(column), [None] * len(column)
    protos = scalar_values(column, field.dtype.to_value_type())
    seen: dict[int, tuple[bytes, str | None]] = {}
    out = [seen.setdefault(id(p), (p.SerializeToString(), extract_text_and_num(p, False)[0])) for p in protos]
    return [b for b, _ in out], [t for _, t in out]


def stamps(column: pa.Array | None, n: int) -> list:
    """A timestamp column as Feast's SQLite adapter stores it (naive UTC -> integer epoch seconds)."""
    from feast.infra.online_stores.sqlite import adapt_datetime_epoch
    from jobs.core.feast_store import naive_utc
    if column is None:
        return [None] * n
    naive = naive_utc(column)
    epoch = {t: adapt_datetime_epoch(t) for t in set(naive)}
    return [epoch[t] for t in naive]


def rows(fv, batch: pa.RecordBatch, version: int) -> list[tuple]:
    """Every (entity, feature) row of the batch, in Feast's column order, entity by entity."""
    keys = entity_keys(fv, batch, version)
    ts = stamps(batch.column(fv.batch_source.timestamp_field), batch.num_rows)
    created_field = fv.batch_source.created_timestamp_column
    created = stamps(batch.column(created_field) if created_field else None, batch.num_rows)
    columns = [(f.name, *cells(f, batch.column(f.name))) for f in fv.features]
    out = []
    for i, key in enumerate(keys):
        out.extend((key, name, values[i], texts[i], ts[i], created[i]) for name, values, texts in columns)
    return out


def write(conn: sqlite3.Connection, table: str, fv, batch: pa.RecordBatch, version: int) -> None:
    """One batch in one transaction (Feast's connection: ``with conn`` commits or rolls back)."""
    data = rows(fv, batch, version)
    with conn:
        conn.executemany(upsert_sql(table), data)
