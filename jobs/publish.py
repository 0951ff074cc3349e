"""Publish the day's validated embeddings to Feast: registry apply, then materialize the day.

The offline store *is* the embed job's Parquet (Feast reads the ``dt=`` partitions), so
point-in-time ``get_historical_features`` works across every published day. Materialization loads
exactly the rows stamped for this date (``event_timestamp`` = end of day D) into the online store;
re-running a date upserts the same values (idempotent).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import time
from dataclasses import dataclass

import pyarrow.parquet as pq

from jobs.embed import published_at
from jobs.feast_store import get_store, load_definitions
from jobs.io import partition
from jobs.settings import Paths, parse_date, parse_overrides

FEATURE_VIEWS = {"profile_embeddings": "profile_embeddings", "title_embeddings": "title_embeddings"}


@dataclass(frozen=True)
class PublishConfig:
    date: str = ""
    require_gate: bool = True          # refuse to publish a date whose validation did not pass


def check_gate(paths: Paths, day: dt.date) -> None:
    summary = partition(paths.gx / "results", day) / "summary.json"
    if not summary.exists():
        raise RuntimeError(f"refusing to publish {day}: no validation result at {summary} (run validate first)")
    if not json.loads(summary.read_text())["success"]:
        raise RuntimeError(f"refusing to publish {day}: validation failed (see {summary})")


def check_columns(store, paths: Paths, day: dt.date) -> None:
    """The table must carry every field the feature view declares, or online reads would be null."""
    roots = {"profile_embeddings": paths.profile_embeddings, "title_embeddings": paths.title_embeddings}
    for fv_name, root in roots.items():
        cols = set(pq.read_schema(next(partition(root, day).glob("*.parquet"))).names)
        fields = {f.name for f in store.get_feature_view(fv_name).features}
        missing = fields - cols
        if missing:
            raise ValueError(f"feature view {fv_name!r} declares {sorted(missing)} but {partition(root, day)} has "
                             f"only {sorted(cols)}: update feature_repo/definitions.py to the model's layers")


def run(cfg: PublishConfig, paths: Paths) -> dict:
    day = parse_date(cfg.date)
    if cfg.require_gate:
        check_gate(paths, day)
    t0 = time.perf_counter()
    store = get_store(paths)
    store.apply(load_definitions(paths))
    check_columns(store, paths, day)
    stamp = published_at(day)
    store.materialize(start_date=stamp - dt.timedelta(hours=1), end_date=stamp,
                      feature_views=list(FEATURE_VIEWS.values()))
    rows = {name: pq.read_metadata(next(partition(root, day).glob("*.parquet"))).num_rows
            for name, root in (("profile", paths.profile_embeddings), ("title", paths.title_embeddings))}
    return {"date": day.isoformat(), "materialized_rows": rows, "publish_s": round(time.perf_counter() - t0, 2),
            "registry": str(store.config.registry_config), "online_store": store.config.online_store.type}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("overrides", nargs="*", help="key=value overrides of PublishConfig")
    out = run(parse_overrides(PublishConfig, ap.parse_args(argv).overrides), Paths.from_env())
    print(out)
    return out
