"""Where does a trained model lose from validation to test? A post-hoc diagnostic, never a selection.

    .venv/bin/python bench/valid_test_gap.py --model fm-20140701-scratch-ea0b3a92            # Beauty
    .venv/bin/python bench/valid_test_gap.py --model A --model B --model C --name valid_test_gap_beauty

Why: on Amazon Beauty the FM validates about 5% above our SASRec but tests about 2% below it, so it
loses more from validation (each profile's second-last event) to test (its last). This scores a
model trained with ``leave_one_out=true`` on both targets, as shipped and with one input or output
part removed at scoring time (no retraining):

* the time fields of every history event (hour, day of week, gap) or the action field set to PAD,
  which asks whether features whose distribution moves between the two targets carry the loss;
* the per-title bias scaled by 0, 0.5 and 1.5, which asks whether the popularity prior (which
  SASRec has not) helps validation more than test;
* validation and test targets each split by whether the target came within 2 s of the event before
  it (Beauty's timestamps are days, so: the same day) or later, with each group's share: if the two
  target sets mix the groups differently, the mix alone moves the figure.

This reads test targets, so nothing here may choose a default: it explains a figure, it does not
tune one. Writes ``<out>/<name>.md`` / ``.json``; the last line printed is one JSON object.
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
from fm.evaluate import metrics_from_ranks  # noqa: E402
from fm.schema import N_SPECIAL, PAD  # noqa: E402
from jobs.core.io import partition  # noqa: E402
from jobs.core.settings import Paths, parse_date  # noqa: E402
from jobs.core.vocab import read_vocab, title_ids_by_idx  # noqa: E402
from jobs.train import load_grown  # noqa: E402

FIELD_ABLATIONS = {"time fields (hour, dow, gap) = PAD": ("hour", "dow", "gap"), "action = PAD": ("action",)}
BIAS_SCALES = (0.0, 0.5, 1.5)


def ndcg10(ranks: np.ndarray) -> float:
    """NDCG@10 of a set of 0-based target ranks, by the protocol's one metric definition."""
    return metrics_from_ranks(torch.as_tensor(ranks), ks=(10,))["ndcg@10"]


def without(seqs: Sequences, names: tuple[str, ...]) -> Sequences:
    """The same sequences with the fields ``names`` set to PAD at every event."""
    return Sequences(seqs.profile_id, seqs.offsets,
                     {k: (np.full_like(v, PAD) if k in names else v) for k, v in seqs.values.items()})


def both(model, seqs: Sequences, split: P.Split) -> tuple[np.ndarray, np.ndarray]:
    """The 0-based rank of every validation and every test target, full ranking, history removed."""
    f = P.fm_scores(model)
    return (P.rank_targets(f, seqs, split.valid, model.cfg.max_len),
            P.rank_targets(f, seqs, split.test, model.cfg.max_len))


def row(name: str, v: np.ndarray, t: np.ndarray) -> dict:
    """One variant's validation and test NDCG@10 from its target ranks."""
    nv, nt = ndcg10(v), ndcg10(t)
    return {"variant": name, "valid_ndcg@10": round(nv, 4), "test_ndcg@10": round(nt, 4),
            "test_over_valid": round(nt / nv, 3)}


def analyse(home: Paths, version: str) -> dict:
    """Every variant of one model, and the validation and the test figures each split by whether the
    target came the same day as the event before it."""
    model, _, meta = load_grown(home.models / version, title_ids_by_idx(read_vocab(home)), pq.read_table(home.catalogue), home)
    if meta.get("evaluation_split") != "leave_one_out":
        raise SystemExit(f"{version} was not trained with leave_one_out=true: its validation targets are not held out")
    model.eval()
    seqs = Sequences.read(partition(home.history, parse_date(meta["trained_on"][0]["history_state"])))
    split = P.leave_one_out(seqs)
    v0, t0 = both(model, seqs, split)
    rows = [row("as shipped", v0, t0)]
    for name, fields in FIELD_ABLATIONS.items():
        rows.append(row(name, *both(model, without(seqs, fields), split)))
    if model.bias is not None:
        bias = model.bias.data.clone()
        for scale in BIAS_SCALES:
            model.bias.data = bias * scale
            rows.append(row(f"title bias x{scale}", *both(model, seqs, split)))
        model.bias.data = bias
    return {"model": version, "seed": meta["train_config"]["seed"], "valid_users": int(len(split.valid)),
            "test_users": int(len(split.test)), "variants": rows,
            "by_gap": {"valid": by_gap(seqs, split.valid, v0), "test": by_gap(seqs, split.test, t0)}}


def by_gap(seqs: Sequences, es: P.EvalSet, ranks: np.ndarray) -> dict:
    """NDCG@10 of the targets that came within 2 s of the event before them (Beauty: the same day) and
    of the later ones: if the two target sets mix them differently, the mix alone moves the figure."""
    same = seqs.values["gap"][seqs.offsets[es.rows] + es.ends] <= N_SPECIAL     # gap bucket N_SPECIAL: < 2 s
    return {"same_day": {"share": round(float(same.mean()), 4), "ndcg@10": round(ndcg10(ranks[same]), 4)},
            "later": {"share": round(float((~same).mean()), 4), "ndcg@10": round(ndcg10(ranks[~same]), 4)}}


def gap_split(score_fn: P.ScoreFn, seqs: Sequences, max_len: int) -> dict:
    """:func:`by_gap` for any scorer (``bench/quality.py`` records it for SASRec beside the FM's here):
    the validation and the test targets of ``seqs``, each split by same-day or later."""
    split = P.leave_one_out(seqs)
    return {role: by_gap(seqs, es, P.rank_targets(score_fn, seqs, es, max_len))
            for role, es in (("valid", split.valid), ("test", split.test))}


def table(results: list[dict]) -> list[str]:
    names = [r["variant"] for r in results[0]["variants"]]
    head = " | ".join(f"seed {r['seed']} valid / test" for r in results)
    lines = [f"| variant | {head} | mean test / valid |", "|---|" + "---|" * (len(results) + 1)]
    for i, name in enumerate(names):
        cells = [f"{r['variants'][i]['valid_ndcg@10']:.4f} / {r['variants'][i]['test_ndcg@10']:.4f}" for r in results]
        ratio = np.mean([r["variants"][i]["test_over_valid"] for r in results])
        lines.append(f"| {name} | {' | '.join(cells)} | {ratio:.3f} |")
    return lines


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--home", default="bench/.work/beauty", help="an FMPIPE_HOME with the history the model trained on")
    ap.add_argument("--model", action="append", required=True, help="model version under <home>/models (repeatable)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--name", default="valid_test_gap_beauty")
    args = ap.parse_args(argv)
    rec, t0 = provenance("bench/valid_test_gap.py", argv), time.perf_counter()
    torch.set_num_threads(args.threads)
    home = Paths(Path(args.home))
    results = [analyse(home, m) for m in args.model]
    for r in results:
        print(r, flush=True)
    rec.update({"home": args.home, "models": results, "loadavg_end": [round(x, 2) for x in os.getloadavg()],
                "wall_s": time.perf_counter() - t0})
    gaps = [f"| seed {r['seed']} | {role} | {g['same_day']['share']:.1%} | {g['same_day']['ndcg@10']} | {g['later']['ndcg@10']} |"
            for r in results for role, g in r["by_gap"].items()]
    lines = [f"# Validation → test: what the model loses, by part ({args.home})", "",
             "Post-hoc: scores the test targets, so nothing here chooses a setting. NDCG@10, full ranking.", "",
             *table(results), "", "By whether the target came the same day as the event before it (as shipped):", "",
             "| model | targets | same day: share | NDCG@10 | later: NDCG@10 |", "|---|---|---|---|---|", *gaps, ""]
    write_results(args.out, args.name, lines, rec)
    emit({"valid_test_gap": [{"seed": r["seed"], "variants": r["variants"]} for r in results]})
    return rec


if __name__ == "__main__":
    main()
