"""Validation sweep of the training recipe: where ``fm.recipe.Recipe``'s defaults come from.

    .venv/bin/python bench/sweep.py --quick                        # smoke run
    .venv/bin/python bench/sweep.py --budget-s 300                 # the sweep (one axis at a time)
    .venv/bin/python bench/sweep.py --axes lr,batch_size --budget-s 300
    .venv/bin/python bench/sweep.py --axes content_encoder --budget-s 600 --name sweep_content

One axis at a time around the current defaults (coordinate search): every value of an axis is
trained by the product's own path (``jobs.train.run`` with ``leave_one_out=true``, the rest at the
defaults) on ML-1M (or ``--dataset beauty``), and scored by its **validation** NDCG@10 (the second-last event of each user,
the checkpoint-selection target). The whole sweep runs inside ``fm.protocol.selecting()``, so any
read of the test targets raises: the choice never sees test. Writes ``<out>/sweep[_quick].md`` /
``.json`` (every run, the value validation prefers per axis, and whether it differs from the
default) and prints one JSON line.
"""
from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from bench.common import emit  # noqa: E402
from bench.quality import prepare, provenance  # noqa: E402
from fm import protocol as P  # noqa: E402
from fm.data import data_root  # noqa: E402
from fm.recipe import RECIPE_FIELDS, Recipe  # noqa: E402
from jobs import evaluate as evaluate_job  # noqa: E402
from jobs import train as train_job  # noqa: E402
from jobs.core.settings import parse_overrides  # noqa: E402

AXES: dict[str, list] = {
    "lr": [1e-3, 3e-3, 1e-2],
    "batch_size": [16, 64],
    "n_negatives": [0, 128, 512],
    "dropout": [0.1, 0.2, 0.3, 0.4, 0.5],
    "d_model": [64, 128],
    "n_layers": [1, 2, 3],
    "mtp_k": [1, 2],
    "detach_heads": [True, False],
    "max_len": [100, 200, 400],
    "id_dropout": [0.0, 0.1, 0.3],
    "content_encoder": ["tfidf", "minilm"],
    "content_dim": [64, 256, 512],
    "use_content": [True, False],
    "exposure_gate": [False, True],
    "rel_bias": ["none", "pos", "time", "pos_time"],
    "ema": [0.0, 0.999],
    "title_bias": [True, False],      # the learned per-title popularity prior
    "n_evals": [8, 32],             # how finely validation picks the kept checkpoint
    "weight_decay": [0.0, 0.01, 0.1],  # AdamW's decoupled decay: also shrinks rarely sampled titles' rows
}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="300 users, 15 s budgets, two axes")
    ap.add_argument("--axes", default="", help=f"comma-separated axes (default all: {', '.join(AXES)})")
    ap.add_argument("--values", default="", help="only these values of the (single) axis, comma-separated "
                    "(split one axis over processes; merge by reading the JSON files)")
    ap.add_argument("--budget-s", type=float, default=None, help="budget per run (default 300; quick 15)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", default=str(data_root()))
    ap.add_argument("--dataset", choices=("ml-1m", "beauty"), default="ml-1m",
                    help="which imported dataset the runs train on (bench/quality.py prepares it)")
    ap.add_argument("--work", default=str(Path(_HERE) / ".work"))
    ap.add_argument("--out", default=str(Path(_HERE) / "results"))
    ap.add_argument("--name", default="sweep", help="results file stem (several partial sweeps side by side)")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--merge", default="", help="comma-separated partial sweep names (results files) to merge "
                    "into --name, every run re-scored on all validation targets; trains nothing")
    ap.add_argument("--add", action="append", default=[], metavar="AXIS:VALUE",
                    help="with --merge: also score the earlier product run with these settings (found by its config)")
    a = ap.parse_args(argv)
    a.budget_s = a.budget_s if a.budget_s is not None else (15.0 if a.quick else 300.0)
    a.axes = [x for x in a.axes.split(",") if x] or (["lr", "mtp_k"] if a.quick else list(AXES))
    unknown = set(a.axes) - set(AXES)
    if unknown:
        ap.error(f"unknown axes {sorted(unknown)}; valid: {', '.join(AXES)}")
    a.values = parse_values(ap, a.axes, [x for x in a.values.split(",") if x])
    return a


def parse_values(ap: argparse.ArgumentParser, axes: list[str], given: list[str]) -> dict[str, list]:
    """``--values`` -> {axis: values to run}. Plain values (``pos,time``) restrict the single axis
    given; ``axis:value`` entries restrict several axes, each keeping its default as the anchor (one
    shared all-defaults run per process). Axes not named run all their values."""
    out = {axis: list(AXES[axis]) for axis in axes}
    if not given:
        return out
    if all(":" not in v for v in given):
        if len(axes) != 1:
            ap.error("plain --values need exactly one axis in --axes (or use axis:value entries)")
        given = [f"{axes[0]}:{v}" for v in given]
        out[axes[0]] = []
    else:
        for axis in {v.split(":", 1)[0] for v in given}:
            out[axis] = [getattr(Recipe(), axis)] if axis in out else []
    for entry in given:
        axis, _, value = entry.partition(":")
        known = {str(v): v for v in AXES.get(axis, [])}
        if axis not in out or value not in known:
            ap.error(f"--values {entry!r}: axis must be one of --axes and value one of its values "
                     f"({', '.join(f'{x}: {AXES[x]}' for x in axes)})")
        if known[value] not in out[axis]:
            out[axis].append(known[value])
    return out


def train_valid(args, day: str, home, over: dict) -> dict:
    """One product training run; only its validation figures come back."""
    cfg = parse_overrides(train_job.TrainJobConfig, {"date": day, "leave_one_out": True, "promote": "never",
                                                     "time_budget_s": args.budget_s, "clock": args.clock,
                                                     "seed": args.seed, "checkpoint_every_s": 0, **over})
    out = train_job.run(cfg, home)
    return {"valid_ndcg@10": out["valid"]["ndcg@10"], "valid_hr@10": out["valid"]["hr@10"],
            "train_cpu_s": out["train_cpu_s"], "steps": out["steps"], "epochs": out["epochs"], "model_path": out["path"],
            **weights_compared(Path(out["path"]), out.get("best_weights", "trained"))}


def weights_compared(model_dir: Path, kept: str) -> dict:
    """With ``ema`` on, the run validated the trained weights and their average side by side: the best
    train-time validation NDCG@10 of each, and which one the run kept (nothing when ``ema`` is off)."""
    history = json.loads((model_dir / "config.json").read_text())["metrics"].get("history") or []
    if not history or "ema_ndcg@10" not in history[-1][3]:
        return {}
    return {"kept_weights": kept, "best_trained_ndcg@10": max(h[3]["ndcg@10"] for h in history),
            "best_ema_ndcg@10": max(h[3]["ema_ndcg@10"] for h in history)}


# ---------------------------------------------------------------------------------------------
# Merging partial sweeps (one process per value) and re-scoring them on every validation target
# ---------------------------------------------------------------------------------------------
def find_model(home, run: dict, res: dict) -> Path:
    """The model a run trained: its recorded path, or (runs recorded before paths were) the one
    model under ``home/models`` whose training settings are the defaults with ``axis=value``, the
    sweep's budget, clock and seed (``valid_users`` aside: it only decides which targets validate)."""
    if run.get("model_path"):
        return Path(run["model_path"])
    want = {**{k: getattr(Recipe(), k) for k in RECIPE_FIELDS}, run["axis"]: run["value"], "time_budget_s": res["budget_s"],
            "clock": res["clock"], "seed": res["seed"]}
    want = {k: (list(v) if isinstance(v, tuple) else v) for k, v in want.items() if k != "valid_users"}
    hits = [d for d in sorted(Path(home.models).glob("*/config.json"))
            if all(json.loads(d.read_text())["train_config"].get(k) == v for k, v in want.items())]
    if len(hits) != 1:
        raise SystemExit(f"{run['axis']}={run['value']}: expected one matching model under {home.models}, found {len(hits)}")
    return hits[0].parent


def rescore(home, run: dict, res: dict) -> dict:
    """Validation figures of a run's model on *every* profile's validation target (``fmpipe evaluate
    split=valid``), inside ``selecting()``: the choice still never reads test."""
    with P.selecting():
        out = evaluate_job.run(evaluate_job.EvalConfig(model=str(find_model(home, run, res)), split="valid"), home)
    m = out["metrics"]
    return {**run, "valid_ndcg@10": m["ndcg@10"], "valid_hr@10": m["hr@10"], "valid_users": m["users"],
            "train_valid_ndcg@10": run["valid_ndcg@10"]}


def merge(args) -> dict:
    """``--merge a,b,c``: one sweep from partial ones (same dataset, budget, clock, seed), every run
    re-scored on all validation targets; ``--add axis:value`` also scores an earlier product run
    with those settings (e.g. the all-defaults run of ``bench/quality.py``) found by its config."""
    t0 = time.perf_counter()
    parts = [json.loads((Path(args.out) / f"{n}.json").read_text()) for n in args.merge.split(",")]
    res = {k: parts[0][k] for k in ("dataset", "budget_s", "clock", "seed")}
    if any({k: p.get(k) for k in res} != res for p in parts):
        raise SystemExit("--merge: the partial sweeps differ in dataset, budget, clock or seed")
    runs = [r for p in parts for r in p["runs"]]
    for entry in args.add:
        axis, _, value = entry.partition(":")
        runs.append({"axis": axis, "value": {str(v): v for v in AXES[axis]}[value], "valid_ndcg@10": float("nan"),
                     "valid_hr@10": float("nan"), "train_cpu_s": res["budget_s"], "steps": None, "epochs": float("nan"),
                     "note": "the earlier product run of bench/quality.py"})
    home, _ = prepare(res["dataset"], args)
    runs = [rescore(home, r, res) for r in runs]
    chosen = {}
    for axis in dict.fromkeys(r["axis"] for r in runs):
        scores = {r["value"]: r["valid_ndcg@10"] for r in runs if r["axis"] == axis}
        best = max(scores, key=scores.get)
        chosen[axis] = {"best": best, "default": getattr(Recipe(), axis), "valid_ndcg@10": scores,
                        "default_is_best": best == getattr(Recipe(), axis)}
    out = {**provenance(None), "merged": args.merge.split(","), **res, "rescored": "every validation target",
           "runs": runs, "chosen": chosen, "wall_s": round(time.perf_counter() - t0, 1), "loadavg_end": [round(x, 2) for x in os.getloadavg()]}
    out["command"] = out["command"].replace("bench/quality.py", "bench/sweep.py")
    args.budget_s, args.clock, args.seed, args.dataset = res["budget_s"], res["clock"], res["seed"], res["dataset"]
    write(out, args)
    emit({"chosen": {k: v["best"] for k, v in chosen.items()},
          "defaults_are_best": all(v["default_is_best"] for v in chosen.values())})
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.merge:
        return merge(args)
    prov = provenance(argv)
    prov["command"] = prov["command"].replace("bench/quality.py", "bench/sweep.py")
    home, day = prepare(args.dataset, args)
    defaults = Recipe()
    runs, chosen = [], {}
    t0 = time.perf_counter()
    base: dict | None = None                             # the all-defaults run, shared by every axis
    with P.selecting():                                  # reading test anywhere below raises
        for axis in args.axes:
            scores = {}
            for value in args.values[axis]:
                is_default = value == getattr(defaults, axis)
                if is_default and base is not None:
                    r = base
                else:
                    r = train_valid(args, day, home, {} if is_default else {axis: value})
                    base = r if is_default else base
                runs.append({"axis": axis, "value": value, **r})
                scores[value] = r["valid_ndcg@10"]
                print(f"{axis}={value}: valid NDCG@10 {r['valid_ndcg@10']:.4f}", file=sys.stderr)
            best = max(scores, key=scores.get)
            chosen[axis] = {"best": best, "default": getattr(defaults, axis), "valid_ndcg@10": scores,
                            "default_is_best": best == getattr(defaults, axis)}
    res = {**prov, "wall_s": round(time.perf_counter() - t0, 1), "loadavg_end": [round(x, 2) for x in os.getloadavg()],
           "dataset": args.dataset, "budget_s": args.budget_s, "clock": args.clock, "seed": args.seed, "runs": runs, "chosen": chosen}
    write(res, args)
    emit({"chosen": {k: v["best"] for k, v in chosen.items()},
          "defaults_are_best": all(v["default_is_best"] for v in chosen.values())})
    return res


def write(res: dict, args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = "_quick" if args.quick else ""
    stem = f"{args.name}{suffix}"
    lines = [f"# Recipe sweep on validation{' (quick smoke run — not a result)' if args.quick else ''}", "",
             f"- command: `{res['command']}`; commit `{res['commit']}`", f"- machine: {res['machine']}; load "
             f"{res['loadavg_start']} → {res['loadavg_end']}; wall {res['wall_s']:.0f} s",
             f"- each run: `fmpipe train leave_one_out=true` on {args.dataset}, budget {args.budget_s:.0f} s ({args.clock}), "
             f"seed {args.seed}, one setting changed from the defaults; score = validation NDCG@10 (test never read)"]
    if res.get("merged"):
        lines.append(f"- merged from {', '.join(res['merged'])} (their commits and commands are in those files); "
                     f"every model re-scored on {res['rescored']} (`fmpipe evaluate split=valid`); "
                     "'train-time' = the figure on the sample of validation targets the run chose its checkpoint on")
    lines += ["", "| axis | value | valid NDCG@10 | valid HR@10 | train-time valid NDCG@10 | train s (CPU) | epochs |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for r in res["runs"]:
        mark = " **(best)**" if res["chosen"][r["axis"]]["best"] == r["value"] else ""
        note = f" ({r['note']})" if r.get("note") else ""
        lines.append(f"| {r['axis']} | {r['value']}{mark}{note} | {r['valid_ndcg@10']:.4f} | {r['valid_hr@10']:.4f} | "
                     f"{r.get('train_valid_ndcg@10', r['valid_ndcg@10']):.4f} | {r['train_cpu_s']:.0f} | {r['epochs']:.1f} |")
    compared = [r for r in res["runs"] if "kept_weights" in r]
    if compared:
        lines += ["", "Runs that validated the weight average beside the trained weights (train-time validation NDCG@10, "
                  "best of each over the run):", "", "| axis | value | trained weights | average | kept |", "|---|---|---:|---:|---|"]
        lines += [f"| {r['axis']} | {r['value']} | {r['best_trained_ndcg@10']:.4f} | {r['best_ema_ndcg@10']:.4f} | "
                  f"{r['kept_weights']} |" for r in compared]
    lines += ["", "| axis | default | validation prefers |", "|---|---|---|"]
    lines += [f"| {a} | {c['default']} | {c['best']}{'' if c['default_is_best'] else ' (differs)'} |"
              for a, c in res["chosen"].items()]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    (out / f"{stem}.json").write_text(json.dumps(res, indent=1, default=str))


if __name__ == "__main__":
    main()
