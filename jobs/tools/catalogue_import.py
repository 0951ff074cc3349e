"""Catalogue import without code: any CSV/Parquet item table mapped onto the catalogue schema.

``catalogue_map`` names, per catalogue field, the source column(s) that fill it, like the events
mapping: ``title_id:item,name:title,genres:genres+brand,release_date:released,synopsis:plot+director``
(``+`` joins several columns: genres/lists are concatenated, text is joined with ". "). Fields
not mapped are read from a column of the same name when present. Ids of any type become strings;
``genres`` may be a list column or a string split on ``genres_sep`` (default ``|``); release dates
parse ISO-8601, "22 Nov 1995", "Nov 22, 1995", a bare year or unix seconds, or ``date_format``
(strptime). Every unreadable value fails naming the file, the row, the column and the value.

Events before a title's release date: tokenize only knows a title once it is released, so such
events are quarantined as ``unknown_title``. The import counts them and ``before_release`` decides:
``quarantine`` (default: keep the catalogue's date, the events are quarantined and reported) or
``accept`` (the release date moves back to the day of the title's first event).
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa

from fm import schema as S

FIELDS = tuple(f.name for f in S.CATALOGUE_SCHEMA)
TEXT = ("name", "kind", "synopsis")
AUTO_DATE_FORMATS = ("ISO8601", "%d %b %Y", "%d %B %Y", "%b %d, %Y", "%B %d, %Y", "%b %d %Y", "%Y")
POLICIES = ("quarantine", "accept")


class CatalogueError(ValueError):
    """The catalogue does not match its mapping: names the file, row, column and value."""


def parse_map(text: str, columns: list[str], where: str) -> dict[str, list[str]]:
    """'field:col+col,...' -> {field: [columns]}; unmapped fields default to a same-named column."""
    mapping: dict[str, list[str]] = {f: [f] for f in FIELDS if f in columns}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        field, _, cols = part.partition(":")
        if field not in FIELDS or not cols:
            raise CatalogueError(f"catalogue_map entry {part!r}: expected <field>:<column>[+<column>...] with field "
                                 f"one of {', '.join(FIELDS)}")
        mapping[field] = [c.strip() for c in cols.split("+") if c.strip()]
    missing = sorted({c for cols in mapping.values() for c in cols} - set(columns))
    if missing:
        raise CatalogueError(f"{where}: catalogue column(s) {missing} not found; columns are {columns} "
                             "(map them with catalogue_map=field:column,...)")
    if "title_id" not in mapping:
        raise CatalogueError(f"{where}: no title id column: the catalogue has {columns}; "
                             "name it with catalogue_map=title_id:<column>")
    return mapping


def _text(df: pd.DataFrame, cols: list[str]) -> pd.Series:
    parts = [df[c].astype("string").str.strip().replace("", pd.NA) for c in cols]
    return pd.Series([". ".join(str(x) for x in row if not pd.isna(x)) or None for row in zip(*parts)],
                     dtype="object", index=df.index)


def _genres(df: pd.DataFrame, cols: list[str], sep: str) -> list[list[str]]:
    def one(v) -> list[str]:
        if v is None or (not isinstance(v, (list, np.ndarray)) and pd.isna(v)):
            return []
        items = list(v) if isinstance(v, (list, np.ndarray)) else str(v).split(sep)
        return [str(x).strip() for x in items if str(x).strip()]
    return [sum((one(v) for v in row), []) for row in zip(*(df[c].tolist() for c in cols))]


def _dates(raw: pd.Series, col: str, fmt: str, where: str) -> pd.Series:
    present = raw.notna() & (raw.astype("string").str.strip() != "")
    if pd.api.types.is_datetime64_any_dtype(raw):
        return pd.to_datetime(raw, utc=True).dt.date
    numeric = pd.to_numeric(raw, errors="coerce")
    if numeric[present].notna().all() and present.any() and (numeric[present] > 9999).all():
        return pd.to_datetime(numeric, unit="s", utc=True).dt.date      # unix seconds
    text = raw.astype("string").str.strip()
    best = pd.Series(pd.NaT, index=raw.index, dtype="datetime64[ns, UTC]")
    for f in ([fmt] if fmt else AUTO_DATE_FORMATS):           # each row: the first format that reads it
        best = best.fillna(pd.to_datetime(text, format=f, errors="coerce", utc=True))
    bad = present & best.isna()
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise CatalogueError(f"{where}: column {col!r} (release_date) row {row}: {raw.iloc[row]!r} is not a date "
                             f"({'format ' + fmt if fmt else 'tried ' + ', '.join(AUTO_DATE_FORMATS)}); "
                             "set date_format=<strptime format>")
    return best.dt.date


def catalogue_from_table(table: pa.Table, mapping_text: str, where: str, genres_sep: str = "|",
                         date_format: str = "") -> pa.Table:
    """Check and convert a mapped item table into the catalogue schema (one row per title)."""
    mapping = parse_map(mapping_text, table.column_names, where)
    df = table.select(sorted({c for cols in mapping.values() for c in cols})).to_pandas()
    ids = _text(df, mapping["title_id"])
    if ids.isna().any():
        row = int(np.flatnonzero(ids.isna().to_numpy())[0])
        raise CatalogueError(f"{where}: column {'+'.join(mapping['title_id'])!r} (title_id) row {row} is empty")
    ids = ids.map(lambda v: v[:-2] if v.endswith(".0") and v[:-2].isdigit() else v)   # 12.0 from a float column
    out = {"title_id": ids.tolist()}
    for f in TEXT:
        out[f] = _text(df, mapping[f]).tolist() if f in mapping else [None] * len(df)
    out["genres"] = _genres(df, mapping["genres"], genres_sep) if "genres" in mapping else [[]] * len(df)
    if "release_date" in mapping:
        col = mapping["release_date"][0]
        out["release_date"] = [None if pd.isna(d) else d for d in _dates(df[col], col, date_format, where)]
    else:
        out["release_date"] = [None] * len(df)
    if "runtime_s" in mapping:
        col = mapping["runtime_s"][0]
        rt = pd.to_numeric(df[col], errors="coerce")
        bad = df[col].notna() & (rt.isna() | (rt < 0))
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise CatalogueError(f"{where}: column {col!r} (runtime_s) row {row}: {df[col].iloc[row]!r} is not "
                                 "a non-negative number of seconds")
        out["runtime_s"] = [None if pd.isna(x) else int(x) for x in rt]
    else:
        out["runtime_s"] = [None] * len(df)
    return pa.table(out, schema=S.CATALOGUE_SCHEMA)


def before_release(cat: pa.Table, events: pd.DataFrame, policy: str) -> tuple[pa.Table, dict]:
    """Count events dated before their title's release; with ``accept`` move those release dates
    back to the title's first event day."""
    if policy not in POLICIES:
        raise CatalogueError(f"before_release={policy!r}: expected one of {', '.join(POLICIES)}")
    first = events.groupby("title_id")["dt"].min()
    rel = pd.Series(cat["release_date"].to_pylist(), index=cat["title_id"].to_pylist())
    ev_day = pd.to_datetime(events["dt"]).dt.date
    released = events["title_id"].map(rel)
    early = released.notna() & (ev_day < released)
    titles = sorted(events.loc[early, "title_id"].unique().tolist())
    info = {"events_before_release": int(early.sum()), "titles_with_events_before_release": len(titles),
            "policy": policy, "examples": titles[:5]}
    if policy == "accept" and titles:
        fixed = [min(r, pd.Timestamp(first[t]).date()) if t in titles and r is not None else r
                 for t, r in zip(cat["title_id"].to_pylist(), cat["release_date"].to_pylist())]
        cat = cat.set_column(cat.schema.get_field_index("release_date"), "release_date", pa.array(fixed, pa.date32()))
    return cat, info
