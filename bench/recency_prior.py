"""Would a time-aware popularity prior help? A validation-only check on a trained model.

    .venv/bin/python bench/recency_prior.py --model fm-20140701-scratch-ac381bad          # Beauty
    .venv/bin/python bench/recency_prior.py --home bench/.work/ml-1m --model <version>

Why: on Amazon Beauty the FM validates above SASRec but loses more from validation to test. One
explanation is that test targets are newer titles, which a static per-title bias cannot follow.
This scores the validation targets (second-last event per user) with

    score = the model's next-title logits + lam * log1p(n_W(title, request day))

where ``n_W`` counts the title's training events in the ``W`` days before the request, from every
user's training part (causal in time: events on or after the request day are not counted). ``W`` is
very large for a static popularity prior. ``lam = 0`` is the model as shipped. The whole run is
inside ``fm.protocol.selecting()``, so a read of the test targets raises. The choice never sees test.

Writes ``<out>/<name>.md`` / ``.json``; the last line printed is one JSON object.
"""
from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))

import argparse  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

from bench.common import emit, provenance, write_results  # noqa: E402
from fm import protocol as P  # noqa: E402
from fm.data import Sequences  # noqa: E402
from fm.recipe import target_ids  # noqa: E402
from jobs.evaluate import history_seconds  # noqa: E402
from jobs.core.io import partition  # noqa: E402
from jobs.core.settings import Paths, parse_date  # noqa: E402
from jobs.train import load_grown  # noqa: E402
from jobs.core.vocab import read_vocab, title_ids_by_idx  # noqa: E402

DAY_S = 86400
GRID = ((30, (0.1, 0.3, 0.6, 1.0)), (90, (0.1, 0.3, 0.6)), (365, (0.1, 0.3)), (10**6, (0.1, 0.3)))


def day_counts(seqs: Sequences, day: np.ndarray, n_titles: int, train: np.ndarray) -> np.ndarray:
    """(days + 1, titles) cumulative counts of training events: row d = events on days < d."""
    d0 = int(day[train].min())
    c = np.zeros((int(day.max()) - d0 + 2, n_titles), np.int32)
    np.add.at(c, (day[train] - d0 + 1, seqs.values["title"][train]), 1)
    return np.cumsum(c, axis=0, dtype=np.int32), d0


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--home", default="bench/.work/beauty", help="an FMPIPE_HOME with the history the model trained on")
    ap.add_argument("--model", required=True, help="model version under <home>/models (trained with leave_one_out=true)")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--name", default="recency_prior_beauty")
    args = ap.parse_args(argv)
    rec, t0 = provenance("bench/recency_prior.py", argv), time.perf_counter()
    torch.set_num_threads(1)
    home = Paths(Path(args.home))
    model, _, meta = load_grown(home.models / args.model, title_ids_by_idx(read_vocab(home)), pq.read_table(home.catalogue), home)
    hp = partition(home.history, parse_date(meta["trained_on"][0]["history_state"]))   # the state it trained on
    seqs, ts = Sequences.read(hp), history_seconds(hp)
    if meta.get("evaluation_split") != "leave_one_out":
        raise SystemExit(f"{args.model} was not trained with leave_one_out=true: its validation targets are not held out")
    model.eval()
    es = P.eval_set(seqs, 2, "valid", target_ids(model))
    row = np.repeat(np.arange(len(seqs)), seqs.lengths)
    train = (np.arange(int(seqs.offsets[-1])) - seqs.offsets[row]) < (seqs.lengths - 2)[row]
    day = (ts // DAY_S).astype(np.int64)
    counts, d0 = day_counts(seqs, day, model.cfg.n_titles, train)
    qday = np.zeros(len(seqs), np.int64)
    qday[es.rows] = day[seqs.offsets[es.rows] + es.ends] - d0
    base, cache = P.fm_scores(model), {}

    def scored(lam: float, w: int):
        def f(b):
            key = (int(b.rows[0]), len(b.rows))
            if key not in cache:
                cache[key] = base(b)
            if lam == 0:
                return cache[key]
            d = np.clip(qday[b.rows], 0, len(counts) - 1)
            n = counts[d] - counts[np.clip(d - w, 0, None)]
            return cache[key] + lam * torch.from_numpy(np.log1p(n.astype(np.float32)))
        return f
    runs = []
    with P.selecting():
        for w, lams in ((10**6, (0.0,)), *GRID):
            for lam in lams:
                m = P.evaluate(scored(lam, w), seqs, es, model.cfg.max_len)
                runs.append({"window_days": w, "lam": lam, "valid_ndcg@10": round(m["ndcg@10"], 4),
                             "valid_hr@50": round(m["hr@50"], 4)})
                print(runs[-1], flush=True)
    best = max(runs, key=lambda r: r["valid_ndcg@10"])
    rec.update({"model": args.model, "home": args.home, "users": int(len(es)),
                "runs": runs, "best": best, "shipped": runs[0], "gain": round(best["valid_ndcg@10"] / runs[0]["valid_ndcg@10"], 4),
                "loadavg_end": [round(x, 2) for x in os.getloadavg()], "wall_s": time.perf_counter() - t0})
    lines = [f"# Time-aware popularity prior, validation only ({args.model}, {len(es)} validation users)", "",
             "score = model logits + lam x log1p(training events of the title in the W days before the request)", "",
             "| W (days) | lam | valid NDCG@10 | valid HR@50 |", "|---|---|---|---|",
             *[f"| {'all' if r['window_days'] >= 10**6 else r['window_days']} | {r['lam']} | {r['valid_ndcg@10']} | {r['valid_hr@50']} |"
               for r in runs], "",
             f"Best: W {best['window_days']}, lam {best['lam']} ({rec['gain']}x the model as shipped).", ""]
    write_results(args.out, args.name, lines, rec)
    emit({"recency_prior": {"best": best, "shipped": runs[0], "gain": rec["gain"]}})
    return rec


if __name__ == "__main__":
    main()
