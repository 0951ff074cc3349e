"""Bring your own data, no code: an oddly shaped CSV log and CSV catalogue go through import, the
first training and one whole daily run to a publication a ranker can read and retrieve from.

The shape is the kind a data engineer actually gets: ';'-separated, unix milliseconds, the shop's
own action names, extra columns nobody mapped, numeric item ids (kept as strings end to end),
'|'-separated genres, "15 December 1995" release dates, and a synopsis glued from two columns.
"""
from __future__ import annotations

import datetime as dt

import numpy as np
import pyarrow.parquet as pq
import pytest

from jobs.tools import event_import
from jobs import pipeline, tokenize, train
from jobs.core.io import partition

START = dt.datetime(2026, 11, 1, 8, tzinfo=dt.timezone.utc)
GENRES = ["Crime", "Comedy", "Drama", "Sci-Fi", "Animation"]


def shop_log(rng: np.random.Generator, users: int = 60, items: int = 40, days: int = 3) -> str:
    """Users who each like one genre (items i % 5), a few events a day, in the shop's own vocabulary."""
    lines = ["customer;sku;epoch_ms;event;screen;basket_value"]
    for d in range(days):
        for u in range(users):
            taste = u % len(GENRES)
            for k in range(int(rng.integers(2, 6))):
                item = 100 + (taste + len(GENRES) * int(rng.integers(0, items // len(GENRES))))
                t = START + dt.timedelta(days=d, minutes=int(rng.integers(0, 600)) + k)
                event = ["view", "view", "add_to_cart", "purchase"][int(rng.integers(0, 4))]
                lines.append(f"{1000 + u};{item};{int(t.timestamp() * 1000)};{event};"
                             f"{['tv', 'mobile'][u % 2]};{rng.uniform(1, 99):.2f}")
    return "\n".join(lines) + "\n"


def shop_catalogue(items: int = 40) -> str:
    lines = ["item,title,category,released,blurb,maker"]
    for i in range(items):
        g = GENRES[i % len(GENRES)]
        lines.append(f"{100 + i},Item {i},{g}|{GENRES[(i + 2) % len(GENRES)]},{1 + i % 28} December 1995,"
                     f"a {g.lower()} thing number {i},Maker {i % 3}")
    return "\n".join(lines) + "\n"


def test_an_odd_csv_log_and_catalogue_reach_a_publication_without_code(tmp_path, home, spark):
    rng = np.random.default_rng(7)
    log, items = tmp_path / "shop.csv", tmp_path / "items.csv"
    log.write_text(shop_log(rng))
    items.write_text(shop_catalogue())
    cfg = dict(source=str(log), delimiter=";", user="customer", item="sku", timestamp="epoch_ms", action="event",
               action_map="view:impression,add_to_cart:add_to_list,purchase:complete", device="screen",
               catalogue=str(items), catalogue_map="title_id:item,name:title,genres:category,release_date:released,"
               "synopsis:blurb+maker")
    with pytest.raises(event_import.ImportError_, match="it looks ','-separated: set catalogue_delimiter=','"):
        event_import.run(event_import.ImportConfig(**cfg), home)      # the log's ';' is not the catalogue's
    assert not home.raw.exists()
    out = event_import.run(event_import.ImportConfig(**cfg, catalogue_delimiter=","), home)
    assert out["days"] == 3 and out["catalogue_titles"] == 40
    cat = {r["title_id"]: r for r in pq.read_table(home.catalogue).to_pylist()}
    assert cat["101"]["genres"] == ["Comedy", "Sci-Fi"] and cat["101"]["release_date"] == dt.date(1995, 12, 2)
    days = sorted(p.name[3:] for p in home.raw.glob("dt=*"))
    assert days == ["2026-11-01", "2026-11-02", "2026-11-03"]

    tokenize.run(tokenize.TokenizeConfig(date=days[-2], full=True), home, spark)
    first = train.run(train.TrainJobConfig(date=days[-2], time_budget_s=6, max_epochs=3, d_model=32, max_len=32), home)
    assert first["promoted"]
    results = {r["step"]: r for r in pipeline.run_all(days[-1])}
    assert results["tokenize"]["quarantined"] == 0 and results["tokenize"]["valid_events"] > 0
    assert results["publish"]["publication"] and results["publish"]["materialized_rows"]["profile"] > 0

    from jobs.tools.retrieve import retrieve
    hits = retrieve(home, 1000, k=5, exclude_finished=False)
    ids = [h["title_id"] for h in hits["titles"]]
    assert len(ids) == 5 and set(ids) <= set(cat)                      # the shop's own ids, as strings
    titles = pq.read_table(partition(home.title_embeddings, dt.date.fromisoformat(days[-1])))
    assert set(titles["title_id"].to_pylist()) == set(cat)
