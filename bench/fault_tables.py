"""What ``bench/faults.py`` compares: every table's rows, and what consumers are served.

:func:`table_rows` reads every table of a home as a multiset of row digests: raw events, tokens,
quarantine, the title vocabulary, the catalogue, every kept history state, the offline store's
``published/`` tree (each view), the online store's live tables (every view, every layer: one row
per entity and feature) and the current indexes (one row per indexed id, one per index file).
:func:`rows_lost` counts the reference's rows missing (or different) in a home; nothing else is
compared, so a fault may add rows (e.g. late events) without counting as a loss.

:func:`served` is what a consumer reads at one moment: the pointer's publication and date, every
online value of every view, and the current index's ids and metadata date. A home serves
"yesterday" or "today" whole when ``served`` equals that day's reference exactly.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import sqlite3
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq

VOLATILE = {"created", "created_ts", "published_at_wall"}       # columns a re-run may legitimately change


def _digest(values) -> str:
    return hashlib.blake2b(repr(values).encode(), digest_size=12).hexdigest()


def _parquet_rows(files: list[Path], extra: str = "") -> Counter:
    out: Counter = Counter()
    for f in sorted(files):
        try:
            t = pq.read_table(f)
        except Exception:                                  # noqa: BLE001 (an unreadable file: every row lost)
            continue
        cols = [c for c in t.column_names if c not in VOLATILE]
        for row in zip(*(t[c].to_pylist() for c in cols)):
            out[_digest((extra or f.parent.name, row))] += 1
    return out


def _partitioned(root: Path) -> Counter:
    return _parquet_rows([f for f in root.glob("dt=*/*.parquet")]) if root.exists() else Counter()


def online_db(paths) -> Path | None:
    from jobs.core.feast_store import sqlite_online_path
    return sqlite_online_path(paths)


def online_rows(paths) -> dict[str, Counter]:
    """Live online tables, one row per (entity, feature): every view and every layer."""
    db = online_db(paths)
    out: dict[str, Counter] = {}
    if db is None or not db.exists():
        return out
    from jobs.core.feast_store import repo_config
    project = repo_config(paths).project
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=60)) as c:
        for view in ("profile_embeddings", "title_embeddings"):
            try:
                rows = c.execute(f'SELECT entity_key, feature_name, value FROM "{project}_{view}"').fetchall()
            except sqlite3.OperationalError:
                rows = []
            out[f"online.{view}"] = Counter(_digest((bytes(k), f, bytes(v) if v is not None else None)) for k, f, v in rows)
    return out


def index_rows(paths) -> Counter:
    """The current indexes: one row per (ids file, position, id) and one per index file's vector count."""
    import faiss
    from jobs.index import current_dir
    out: Counter = Counter()
    try:
        d = current_dir(paths)
    except (FileNotFoundError, OSError, ValueError):
        return out
    for f in sorted(d.glob("*ids*.parquet")):
        try:
            t = pq.read_table(f)
        except Exception:                                  # noqa: BLE001
            continue
        col = t.column_names[0]
        out.update(_digest((f.name, i, v)) for i, v in enumerate(t[col].to_pylist()))
    for f in sorted(d.glob("*.faiss")) + sorted(d.glob("*.index")):
        try:
            idx = faiss.read_index(str(f))
            out[_digest((f.name, idx.ntotal, idx.d))] += 1
        except Exception:                                  # noqa: BLE001
            continue
    return out


def table_rows(paths) -> dict[str, Counter]:
    h = paths.home
    tables = {"raw": _partitioned(paths.raw), "tokens": _partitioned(paths.tokens),
              "quarantine": _partitioned(paths.quarantine), "history": _partitioned(paths.history),
              "vocab": _parquet_rows([paths.title_vocab], "vocab") if paths.title_vocab.exists() else Counter(),
              "catalogue": _parquet_rows([paths.catalogue], "catalogue") if paths.catalogue.exists() else Counter(),
              "offline.profile": _partitioned(h / "published" / "profile"),
              "offline.title": _partitioned(h / "published" / "title"),
              "index": index_rows(paths)}
    tables.update(online_rows(paths))
    return tables


def rows_lost(reference: dict[str, Counter], got: dict[str, Counter]) -> dict[str, int]:
    """Per table: reference rows missing or different in ``got`` (multiset difference)."""
    return {t: sum((ref - got.get(t, Counter())).values()) for t, ref in reference.items()
            if sum((ref - got.get(t, Counter())).values())}


def served(paths) -> dict:
    """What a consumer is served now (see the module docstring)."""
    from jobs.core import publication as pubs
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cur = pubs.current(paths)
        idx = index_rows(paths)
        meta = None
        try:
            from jobs.index import META_FILE, current_dir
            meta = json.loads((current_dir(paths) / META_FILE).read_text()).get("date")
        except (FileNotFoundError, OSError, ValueError):
            pass
    return {"date": (cur or {}).get("date"), "index_date": meta, "online": online_rows(paths), "index": idx}


def same_serving(a: dict, b: dict) -> bool:
    return a["date"] == b["date"] and a["index_date"] == b["index_date"] and a["online"] == b["online"] \
        and a["index"] == b["index"]


def describe_serving(seen: dict, yesterday: dict, today: dict) -> str:
    def share(ref: dict) -> str:
        n = sum(len(c) for c in ref["online"].values())
        common = sum(sum((seen["online"].get(k, Counter()) & c).values()) for k, c in ref["online"].items())
        return f"{common}/{n}"
    return (f"pointer date {seen['date']}, index of {seen['index_date']}; online rows as yesterday "
            f"{share(yesterday)}, as today {share(today)}")
