"""Trends across days for the daily report: is today normal compared with the last two weeks?

Per date (the report's date and up to ``max_days`` before it): event volume, quarantine rate,
events per token, active profiles, the gate verdict, and **retrieval quality** -- how well the
publication served *before* a date predicted what profiles did *on* it: for each profile active on
day D that had a published vector on the latest published date P < D, its first target event of D
(play, complete, add to list, thumbs up) is ranked among every title by the score ``fmpipe
retrieve`` uses (published profile vector · published title vector of P), titles already in the
profile's history at P removed. NDCG@10 and HR@10 over at most ``max_profiles`` profiles.

Why: drift and row counts say the pipeline ran; only this says the vectors still recommend. A
model that silently stopped learning, a broken alignment or a bad publication shows up as a drop
here the day after. Everything is read from what the steps wrote (step records, the gate's summary,
the published tree, tokens and history), never recomputed by a model.
"""
from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from fm.model import ModelConfig
from fm.schema import ACTIONS, vocab_index
from jobs.core import published
from jobs.core.io import partition, partition_dates
from jobs.core.settings import Paths
from jobs.tools.status import read_json
from jobs.core.vocab import read_vocab

MAX_PROFILES = 5_000


def query_column(names: list[str]) -> str | None:
    """The retrieval query among published profile columns: the deepest layer's ``last`` vector."""
    cols = [c for c in names if c.startswith("emb_layer") and c.endswith("_last")]
    return max(cols, key=lambda c: int(c[len("emb_layer"):].split("_")[0])) if cols else None


def _published_dates(paths: Paths) -> list[dt.date]:
    return partition_dates(published.view_root(paths, "profile"))


def _read_dir(path: Path, columns: list[str], filters=None) -> pa.Table:
    return pq.read_table(path, columns=columns, filters=filters)


def first_targets(paths: Paths, day: dt.date) -> dict[int, int]:
    """profile_id -> title id of its first target event on ``day`` (by time, then arrival order)."""
    part = partition(paths.tokens, day)
    if not any(part.glob("*.parquet")):
        return {}
    t = _read_dir(part, ["profile_id", "ts", "seq", "title", "action"])
    index = vocab_index(ACTIONS)
    targets = pa.array([index[a] for a in ModelConfig.target_actions], pa.int32())
    t = t.filter(pc.is_in(t["action"], value_set=targets)).sort_by([("profile_id", "ascending"), ("ts", "ascending"),
                                                                    ("seq", "ascending")])
    pids, titles = t["profile_id"].to_numpy(), t["title"].to_numpy()
    first = np.r_[True, pids[1:] != pids[:-1]] if len(pids) else np.zeros(0, bool)
    return dict(zip(pids[first].tolist(), titles[first].tolist()))


def retrieval_quality(paths: Paths, day: dt.date, prev: dt.date, max_profiles: int = MAX_PROFILES) -> dict | None:
    """NDCG@10 / HR@10 of day ``day``'s first target events under the publication of ``prev``."""
    targets = first_targets(paths, day)
    prof_dir, title_dir = partition(published.view_root(paths, "profile"), prev), partition(published.view_root(paths, "title"), prev)
    if not targets or not any(prof_dir.glob("*.parquet")) or not any(title_dir.glob("*.parquet")):
        return None
    col = query_column(pq.read_schema(next(prof_dir.glob("*.parquet"))).names)
    if col is None:
        return None
    wanted = pa.array(sorted(targets)[:max_profiles], pa.int64())
    prof = _read_dir(prof_dir, ["profile_id", col], pc.field("profile_id").isin(wanted))
    if prof.num_rows == 0:
        return None
    vocab = read_vocab(paths)
    idx_of = dict(zip(vocab["title_id"].to_pylist(), vocab["idx"].to_pylist()))
    tt = _read_dir(title_dir, ["title_id", "title_embedding"])
    t_idx = np.array([idx_of.get(t, -1) for t in tt["title_id"].to_pylist()])
    tv = np.stack(tt["title_embedding"].to_numpy(zero_copy_only=False)).astype(np.float32)
    col_of = np.full(int(max(t_idx.max(initial=0), max(targets.values())) + 1), -1)
    col_of[t_idx[t_idx >= 0]] = np.flatnonzero(t_idx >= 0)
    pids = prof["profile_id"].to_numpy()
    q = np.stack(prof[col].to_numpy(zero_copy_only=False)).astype(np.float32)
    scores = q @ tv.T
    seen = _history_titles(paths, prev, pids)
    ranks = []
    for r, pid in enumerate(pids.tolist()):
        target = col_of[targets[pid]] if targets[pid] < len(col_of) else -1
        if target < 0:
            continue                                       # a title the previous publication did not have
        s = scores[r].copy()
        hist = col_of[[x for x in seen.get(pid, ()) if x < len(col_of)]]
        s[hist[(hist >= 0) & (hist != target)]] = -np.inf
        ranks.append(int((s > s[target]).sum()))
    if not ranks:
        return None
    ranks = np.array(ranks)
    hit = ranks < 10
    return {"ndcg@10": round(float(np.where(hit, 1.0 / np.log2(ranks + 2), 0.0).mean()), 4),
            "hr@10": round(float(hit.mean()), 4), "profiles": int(len(ranks)), "publication_date": prev.isoformat()}


def _history_titles(paths: Paths, day: dt.date, pids: np.ndarray) -> dict[int, set[int]]:
    part = partition(paths.history, day)
    if not any(part.glob("*.parquet")):
        return {}
    h = _read_dir(part, ["profile_id", "title"], pc.field("profile_id").isin(pa.array(pids, pa.int64())))
    return {p: set(t) for p, t in zip(h["profile_id"].to_pylist(), h["title"].to_pylist())}


def day_figures(paths: Paths, day: dt.date, pub_dates: list[dt.date]) -> dict:
    """One date's row of the trends table."""
    tok = read_json(partition(paths.reports, day) / "steps" / "tokenize.json") or {}
    gate = read_json(partition(paths.gx / "results", day) / "summary.json")
    raw = tok.get("raw_events") or 0
    earlier = [d for d in pub_dates if d < day]
    quality = retrieval_quality(paths, day, earlier[-1]) if earlier else None
    return {"date": day.isoformat(), "events": raw or None,
            "quarantine_rate": round(tok.get("quarantined", 0) / raw, 4) if raw else None,
            "events_per_token": tok.get("events_per_token"), "profiles_active": tok.get("profiles_active"),
            "gate": None if gate is None else bool(gate.get("success")), "retrieval": quality}


def trends(paths: Paths, day: dt.date, max_days: int = 14) -> list[dict]:
    """Rows for ``day`` and up to ``max_days`` earlier dates that were tokenized, oldest first."""
    days = [d for d in partition_dates(paths.tokens) if d <= day][-(max_days + 1):]
    pub_dates = _published_dates(paths)
    return [day_figures(paths, d, pub_dates) for d in days]


def plot(rows: list[dict], drift: dict[str, list]):
    """One figure, four panels: volume, quarantine rate, events per token, retrieval NDCG@10 + drift."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    dates = [r["date"][5:] for r in rows]
    fig, axes = plt.subplots(1, 4, figsize=(13, 2.8))
    series = [("events", "events per day"), ("quarantine_rate", "quarantine rate"),
              ("events_per_token", "events per token")]
    for ax, (key, title) in zip(axes, series):
        ax.plot(dates, [np.nan if r[key] is None else r[key] for r in rows], marker="o", color="#4c72b0")
        ax.set_title(title, fontsize=9)
    ax = axes[3]
    ax.plot(dates, [r["retrieval"]["ndcg@10"] if r["retrieval"] else np.nan for r in rows], marker="o",
            color="#c44e52", label="retrieval NDCG@10")
    for col, pts in drift.items():
        ax.plot([p[0][5:] for p in pts], [p[1] for p in pts], marker=".", lw=0.8, label=f"drift {col}")
    ax.set_title("quality (next-day NDCG@10) and drift (cosine)", fontsize=9), ax.set_ylim(-0.05, 1.05)
    ax.legend(fontsize=6)
    for ax in axes:
        ax.tick_params(axis="x", labelrotation=45, labelsize=7)
        ax.grid(alpha=0.3)
    return fig
