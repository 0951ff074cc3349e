"""Build a Feast FeatureStore for the repo in ``feature_repo/``, pointed at the current FMPIPE_HOME,
and turn Arrow batches into the rows Feast's online stores write.

``feature_store.yaml`` is the source of truth for backends (set ``online_store.type: redis`` etc.
there, no code change; ``$FMPIPE_FEATURE_REPO`` points the jobs at another feature repo folder,
e.g. a deployment's copy with its own yaml). Only when the state root is not the default ``var/``
do we rewrite the local SQLite/registry paths, so tests and scratch runs never touch the default
store (a Redis/remote online store is used as configured).

:func:`online_rows` produces exactly what Feast's own ``_convert_arrow_to_proto`` produces (entity
key protos, ``Value`` protos, naive-UTC event timestamps) and is handed to the provider's
``online_write_batch``, so any Feast online store accepts it and ``get_online_features`` reads it
back unchanged. The only difference is speed: ``Array(Float32)`` columns are encoded straight from
the Arrow buffer into the ``Value`` wire format (one ``Value.FromString`` per vector instead of a
Python float list per vector), which was most of the cost of Feast's generic conversion.
``tests/test_publish.py`` checks the rows are identical to Feast's conversion.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import importlib.util
import os
from pathlib import Path

import numpy as np
import pyarrow as pa

from jobs.core.settings import REPO_ROOT, Paths

FEATURE_REPO = REPO_ROOT / "feature_repo"


def feature_repo() -> Path:
    """The Feast repo folder the jobs use: ``$FMPIPE_FEATURE_REPO`` if set, else ``feature_repo/``."""
    return Path(os.environ.get("FMPIPE_FEATURE_REPO") or FEATURE_REPO).resolve()


def repo_config(paths: Paths):
    """The Feast ``RepoConfig`` the jobs use for ``paths`` (local SQLite/registry paths moved under
    ``FMPIPE_HOME`` unless it is the default ``var/``)."""
    from feast.repo_config import load_repo_config

    repo = feature_repo()
    cfg = load_repo_config(repo, repo / "feature_store.yaml")
    if paths.home != (REPO_ROOT / "var").resolve():
        paths.feast.mkdir(parents=True, exist_ok=True)
        cfg.registry_config = str(paths.feast / "registry.db")
        cfg._registry = None                      # drop the one parsed from the yaml path
        if getattr(cfg.online_store, "type", None) == "sqlite":
            cfg.online_store.path = str(paths.feast / "online.db")
    return cfg


def get_store(paths: Paths):
    from feast import FeatureStore
    return FeatureStore(repo_path=str(feature_repo()), config=repo_config(paths))


def sqlite_online_path(paths: Paths) -> Path | None:
    """The SQLite online store's database file, or None when the online store is not SQLite."""
    cfg = repo_config(paths)
    if getattr(cfg.online_store, "type", None) != "sqlite":
        return None
    p = Path(cfg.online_store.path)
    return p if p.is_absolute() else feature_repo() / p


def load_definitions(paths: Paths) -> list:
    """Import the feature repo's ``definitions.py`` with FMPIPE_HOME set, and return its Feast objects."""
    from feast import Entity, FeatureService, FeatureView, FileSource

    from jobs.core.published import ensure_roots
    os.environ["FMPIPE_HOME"] = str(paths.home)
    ensure_roots(paths)                           # the offline sources name published/, maybe still empty
    spec = importlib.util.spec_from_file_location("fmpipe_feature_definitions", feature_repo() / "definitions.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    kinds = (Entity, FeatureView, FeatureService, FileSource)
    return [v for v in vars(module).values() if isinstance(v, kinds)]


def _registry_path(store) -> Path:
    reg = store.config.registry
    p = Path(getattr(reg, "path", "") or "")
    return p if p.is_absolute() else Path(store.repo_path) / p


def apply_if_changed(store, paths: Paths) -> bool:
    """``store.apply`` the definitions unless this exact repo (definitions, yaml, home) is applied.

    ``apply`` re-runs the online store's ``update`` (CREATE TABLE/INDEX IF NOT EXISTS), which is
    harmless but rebuilds a secondary index on a large live table after a publication swap, so a
    daily publish skips it when nothing changed. Returns whether it applied.
    """
    digest = hashlib.sha256()
    repo = Path(store.repo_path)
    for f in (repo / "definitions.py", repo / "feature_store.yaml"):
        digest.update(f.read_bytes())
    from jobs.core.feature_spec import spec_path
    if spec_path(paths.home).exists():            # the layer columns definitions.py derives its schema from
        digest.update(spec_path(paths.home).read_bytes())
    digest.update(str(paths.home).encode())
    stamp = paths.feast / "applied.sha256"
    fingerprint = digest.hexdigest()
    online_ok = True
    if getattr(store.config.online_store, "type", "") == "sqlite":
        from feast.infra.online_stores.sqlite import SqliteOnlineStore
        online_ok = Path(SqliteOnlineStore._get_db_path(store.config)).exists()
    if online_ok and _registry_path(store).exists() and stamp.exists() and stamp.read_text() == fingerprint:
        return False
    store.apply(load_definitions(paths))
    stamp.parent.mkdir(parents=True, exist_ok=True)
    stamp.write_text(fingerprint)
    return True


# ---------------------------------------------------------------------------------------------
# Arrow -> online-store rows
# ---------------------------------------------------------------------------------------------
def _varint(v: int) -> bytes:
    out = bytearray()
    while True:
        b, v = v & 0x7F, v >> 7
        out.append(b | 0x80 if v else b)
        if not v:
            return bytes(out)


def _float_list_headers():
    from feast.protos.feast.types.Value_pb2 import Value
    tag = _varint((Value.DESCRIPTOR.fields_by_name["float_list_val"].number << 3) | 2)
    cache: dict[int, bytes] = {}

    def header(n: int) -> bytes:
        if n not in cache:
            inner = n * 4
            f1 = (b"\x0a" + _varint(inner)) if n else b""   # FloatList.val = 1, packed
            cache[n] = tag + _varint(len(f1) + inner) + f1
        return cache[n]
    return header


def float_list_values(column: pa.Array | pa.ChunkedArray) -> list:
    """``Value(float_list_val=...)`` protos for a list<float32> column, built from the wire format."""
    from feast.protos.feast.types.Value_pb2 import Value
    return [Value.FromString(b) for b in float_list_bytes(column)]


def float_list_bytes(column: pa.Array | pa.ChunkedArray) -> list[bytes]:
    """The serialized ``Value(float_list_val=...)`` of each row of a list<float32> column (a null
    row: ``b""``, the empty ``Value``), laid out from the wire format without building messages."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if arr.type != pa.list_(pa.float32()):
        arr = arr.cast(pa.list_(pa.float32()))
    header, n = _float_list_headers(), len(arr)
    offsets = arr.offsets.to_numpy()
    flat = arr.values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    lengths = np.diff(offsets)
    if arr.null_count == 0 and n and (lengths == lengths[0]).all():
        # one fixed width (the usual case): lay out header + floats per row in one buffer, then slice
        d = int(lengths[0])
        head = np.frombuffer(header(d), np.uint8)
        mat = np.empty((n, len(head) + 4 * d), np.uint8)
        mat[:, :len(head)] = head
        mat[:, len(head):] = flat[offsets[0]:offsets[0] + n * d].astype("<f4", copy=False).view(np.uint8).reshape(n, 4 * d)
        buf, w = mat.tobytes(), mat.shape[1]
        return [buf[i:i + w] for i in range(0, n * w, w)]
    raw = flat.astype("<f4", copy=False).tobytes()
    valid = arr.is_valid().to_numpy(zero_copy_only=False)
    out = []
    for i in range(n):
        a, b = int(offsets[i]), int(offsets[i + 1])
        out.append(header(b - a) + raw[4 * a:4 * b] if valid[i] else b"")
    return out


def scalar_values(column: pa.Array | pa.ChunkedArray, value_type) -> list:
    """Scalar ``Value`` protos; repeated values (model_version, flags) share one message."""
    from feast.protos.feast.types.Value_pb2 import Value
    from feast.type_map import python_values_to_proto_values
    from feast.value_type import ValueType
    field = {ValueType.STRING: "string_val", ValueType.INT64: "int64_val", ValueType.INT32: "int32_val",
             ValueType.BOOL: "bool_val"}.get(value_type)
    if field is None:
        return python_values_to_proto_values(column.to_numpy(zero_copy_only=False), value_type)
    cache: dict = {None: Value()}
    out = []
    for v in column.to_pylist():
        m = cache.get(v)
        if m is None:
            m = Value(**{field: v})
            if field in ("string_val", "bool_val"):
                cache[v] = m
        out.append(m)
    return out


def entity_key_protos(fv, batch: pa.RecordBatch | pa.Table) -> list:
    """Feast ``EntityKey`` protos of the rows' join keys, as Feast's own conversion builds them."""
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    names = [c.name for c in fv.entity_columns]
    keys = [scalar_values(batch.column(c.name), c.dtype.to_value_type()) for c in fv.entity_columns]
    return [EntityKey(join_keys=names, entity_values=list(vs)) for vs in zip(*keys)]


def naive_utc(column: pa.Array | pa.ChunkedArray) -> list[dt.datetime]:
    """A timestamp column as naive UTC datetimes (what Feast's conversion hands the online store);
    rows with the same instant share one object."""
    us = column.cast(pa.timestamp("us", tz="UTC")).cast(pa.int64()).to_numpy(zero_copy_only=False)
    base, cache = dt.datetime(1970, 1, 1), {}
    return [cache.setdefault(int(u), base + dt.timedelta(microseconds=int(u))) for u in us]


def online_rows(fv, batch: pa.RecordBatch | pa.Table) -> list:
    """Rows for ``provider.online_write_batch`` from an Arrow batch: same as Feast's conversion."""
    from feast.types import Array, Float32

    if isinstance(batch, pa.Table):
        batch = batch.combine_chunks()
    values: dict[str, list] = {}
    for field in fv.features:
        col = batch.column(field.name)
        if field.dtype == Array(Float32):
            values[field.name] = float_list_values(col)
        else:
            values[field.name] = scalar_values(col, field.dtype.to_value_type())
    entity_keys = entity_key_protos(fv, batch)
    stamps = naive_utc(batch.column(fv.batch_source.timestamp_field))
    created_field = fv.batch_source.created_timestamp_column
    created = naive_utc(batch.column(created_field)) if created_field else [None] * batch.num_rows
    feature_names = list(values)
    columns = [values[n] for n in feature_names]
    return [(ek, dict(zip(feature_names, vals)), ts, cr)
            for ek, vals, ts, cr in zip(entity_keys, zip(*columns), stamps, created)]
