"""Quality benchmark: the product's own training path vs SASRec, on ML-1M and Amazon Beauty.

    .venv/bin/python bench/quality.py --quick                              # smoke run (~5 min)
    .venv/bin/python bench/quality.py --only product --seed 0              # one part, one seed
    .venv/bin/python bench/quality.py                                      # every part, seeds 0-2, then merge
    .venv/bin/python bench/quality.py --merge                              # only merge the parts already run

What each part runs (every part is the product's code, with the product's defaults):

* ``product``: ML-1M through the pipeline a user runs -- ``fmpipe import movielens``, ``fmpipe
  tokenize full=true``, ``fmpipe train leave_one_out=true time_budget_s=S clock=cpu`` (recipe
  defaults otherwise), ``fmpipe evaluate data=movielens`` -- called as the jobs' ``run`` functions
  in a scratch ``FMPIPE_HOME``. The figure is exactly what ``fmpipe evaluate`` prints.
* ``sasrec``: our SASRec (``fm.sasrec``), trained by the same fit loop (``fm.fit``) on the same
  history table, validated on the same targets, under the same budget and clock; tested once by
  ``fm.protocol`` on the same test targets.
* ``sasrec_converged``: the same SASRec with no budget: constant learning rate after warm-up,
  validation after every epoch, early stopping after ``--patience`` validations without a gain;
  reports its training time. ``--converged-cap-s`` bounds one sitting (CPU or wall seconds in all):
  the run saves its state under the work home, and the same command with a larger cap continues it
  exactly where it stopped, so convergence that takes hours still runs in parts under an hour.
  (Its state lives in ``<work>/ml-1m/states/``; delete it to start over.)
* ``beauty_fm`` / ``beauty_sasrec``: the same two on Amazon Beauty (``fmpipe import beauty``), with
  the same defaults (no per-dataset tuning) and the same budget.
* ``popularity``: the most-popular floor (counts on the training part).
* ``taobao``: the Taobao multi-action log through ``fmpipe import events`` (pv/cart/fav/buy mapped to
  play/add_to_list/thumbs_up/complete): the next-action head's accuracy against the majority class
  and a count baseline (the user's most frequent action so far), and next-title NDCG@10 with the
  side heads on (detached, the default), off, and sharing the state.
* ``ablate:KEY=VALUE``: the product path with one recipe setting changed.
* ``sasrec:dropout=X`` / ``beauty_sasrec:dropout=X`` / ``sasrec_converged:ema=D`` (``+`` joins settings):
  the baseline with another dropout, or with the fit loop's weight average or weight decay (the
  options the FM's recipe uses; the README fixes dropout 0.2; SASRec's authors used 0.5 on sparse data). The merged report's SASRec for a dataset is
  the variant with the best *validation* NDCG@10, so the baseline gets the same choice the FM gets.

Each part writes ``<out>/quality/<part>-seed<K>.json`` (commit, command, machine, load); the merge
step gathers them into ``quality.md`` / ``quality.json`` (mean and standard deviation over seeds)
and prints one JSON line with the figures.
"""
from __future__ import annotations

import os
import sys

# Run as a script, Python puts bench/ first on sys.path, where sibling benchmarks (bench/tokenize.py)
# would shadow standard-library modules: use the repository root instead.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))
# Under a CPU-time budget OpenMP threads must sleep rather than spin while waiting, or a model is
# charged for its neighbours' load. Set before torch (and its OpenMP runtime) loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from types import SimpleNamespace  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.common import emit  # noqa: E402
from bench.quality_report import METRICS, TAOBAO_VARIANTS, merge  # noqa: E402
from bench.valid_test_gap import gap_split  # noqa: E402
from fm import protocol as P  # noqa: E402
from fm.data import Sequences, data_root  # noqa: E402
from fm.fit import FitConfig, fit  # noqa: E402
from fm.evaluate import one_vs_rest_auc  # noqa: E402
from fm.recipe import cold_calibration, held_out_back, validation_set  # noqa: E402
from fm.sasrec import SASRec, SASRecConfig  # noqa: E402
from fm.schema import ACTIONS, N_SPECIAL, vocab_index  # noqa: E402
from jobs import evaluate as ev  # noqa: E402
from jobs.tools import dataset_import, event_import  # noqa: E402
from jobs import tokenize  # noqa: E402
from jobs import train as train_job  # noqa: E402
from jobs.core.io import latest_partition_before, partition  # noqa: E402
from jobs.core.locks import exclusive  # noqa: E402
from jobs.core.settings import Paths, parse_overrides  # noqa: E402
from jobs.core.vocab import read_vocab, title_ids_by_idx  # noqa: E402

# The baseline as the data README fixes it (2 layers, d=64, dropout 0.2, full softmax CE; max length
# 200 on ML-1M, 50 on Beauty); lr / batch size chosen on validation (bench/results/quality.md history).
SASREC = {"model": dict(d_model=64, n_layers=2, n_heads=2, dropout=0.2), "fit": dict(lr=3e-3, batch_size=16)}
SASREC_MAX_LEN = {"ml-1m": 200, "beauty": 50}
DATASETS = {"ml-1m": "movielens", "beauty": "beauty"}
PARTS = ("popularity", "product", "sasrec", "sasrec_converged", "beauty_fm", "beauty_sasrec", "taobao", "cold_start",
         "beauty_cold_start")
COLD_START_PARTS = {"cold_start": "ml-1m", "beauty_cold_start": "beauty"}
# Taobao's behaviours as pipeline actions (a plain `fmpipe import events` mapping, no code)
TAOBAO_IMPORT = dict(user="user_id", item="item_id", timestamp="timestamp", action="behavior",
                     action_map="pv:play,cart:add_to_list,fav:thumbs_up,buy:complete")
# the heads on Taobao: defaults (heads trained on a detached state), heads off, heads sharing the state


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="300 ML-1M users, 1,500 Beauty users, 30 s budgets")
    ap.add_argument("--only", default="", help=f"comma-separated parts: {', '.join(PARTS)}, ablate:KEY=VALUE")
    ap.add_argument("--seeds", default="0,1,2", help="seeds to run each part with (default 0,1,2)")
    ap.add_argument("--seed", type=int, default=None, help="one seed (overrides --seeds)")
    ap.add_argument("--budget-s", type=float, default=None, help="training budget per model (default 1800; quick 30)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="cpu", help="what the budget counts")
    ap.add_argument("--patience", type=int, default=5, help="sasrec_converged: validations without a gain")
    ap.add_argument("--converged-lr", type=float, default=1e-3,
                    help="sasrec_converged: the constant learning rate (RecBole's 1e-3; 3e-3 unscheduled does not learn)")
    ap.add_argument("--converged-cap-s", type=float, default=float("inf"),
                    help="sasrec_converged: stop anyway after this many seconds in all (then stopped_by says budget); "
                         "the same command with a larger cap resumes the saved state")
    ap.add_argument("--cold-start-only", nargs="?", const="cold_start", default=None, choices=("cold_start", "beauty_cold_start"),
                    help="only a cold-start part (bench/cold_start.py): ML-1M (default) or beauty_cold_start")
    ap.add_argument("--rescore", action="store_true",
                    help="cold_start: re-score the models the part's previous run saved (no training)")
    ap.add_argument("--holdout-frac", type=float, default=0.2, help="cold_start: fraction of movies held out")
    ap.add_argument("--recipe", action="append", default=[], metavar="KEY=VALUE",
                    help="cold_start: a recipe setting for both of its models (repeatable)")
    ap.add_argument("--data", default=str(data_root()), help="folder holding ml-1m/ and amazon-beauty/")
    ap.add_argument("--work", default=str(Path(_HERE) / ".work"), help="scratch FMPIPE_HOMEs (tokenized once, reused)")
    ap.add_argument("--out", default=str(Path(_HERE) / "results"), help="results folder")
    ap.add_argument("--merge", action="store_true", help="only merge the part files into quality.md")
    ap.add_argument("--trained", default="", metavar="MODEL_DIR",
                    help="product parts: evaluate this model, which the product path trained with the part's exact "
                         "settings (e.g. the sweep run validation chose), instead of training again")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    a = ap.parse_args(argv)
    a.budget_s = a.budget_s if a.budget_s is not None else (30.0 if a.quick else 1800.0)
    a.seeds = [a.seed] if a.seed is not None else [int(s) for s in a.seeds.split(",") if s]
    a.parts = [a.cold_start_only] if a.cold_start_only else [p for p in a.only.split(",") if p] or list(PARTS)
    for p in a.parts:
        if p not in PARTS and not p.startswith(("ablate:", *SASREC_VARIANT_BASES)):
            ap.error(f"unknown part {p!r}; valid: {', '.join(PARTS)}, ablate:KEY=VALUE, "
                     "[beauty_]sasrec[_converged]:KEY=VALUE[+KEY=VALUE] (KEY: dropout, ema, weight_decay)")
        if p.startswith(SASREC_VARIANT_BASES):
            try:
                baseline_variant(p)
            except ValueError as e:
                ap.error(str(e))
    return a


# ---------------------------------------------------------------------------------------------
# Data: one scratch FMPIPE_HOME per dataset, imported and tokenized by the product
# ---------------------------------------------------------------------------------------------
QUICK_USERS = {"ml-1m": 300, "beauty": 1500}


def prepare(dataset: str, args: argparse.Namespace) -> tuple[Paths, str]:
    """Import and tokenize ``dataset`` with the product's jobs once; later parts reuse the history.

    Parts run as parallel processes (one per core) share the work home, so the first one prepares
    it under an exclusive lock and the others wait for it instead of importing over it."""
    home = Paths(Path(args.work) / f"{dataset}{'-quick' if args.quick else ''}")
    Path(args.work).mkdir(parents=True, exist_ok=True)
    with exclusive(Path(args.work) / f".{home.home.name}.prepare.lock", f"bench work home {home.home}",
                   "prepare", wait_s=7200.0):
        return _prepare(dataset, home, args)


def _prepare(dataset: str, home: Paths, args: argparse.Namespace) -> tuple[Paths, str]:
    if dataset == "taobao":
        return prepare_taobao(home, args)
    day = latest_partition_before(home.history, __import__("datetime").date.max) if home.history.exists() else None
    if day is not None:
        return home, day.isoformat()
    home.home.mkdir(parents=True, exist_ok=True)
    root = Path(args.data)
    if dataset == "ml-1m":
        out = dataset_import.import_movielens(home, str(root / "ml-1m"), users=QUICK_USERS[dataset] if args.quick else 0)
    else:
        out = dataset_import.import_beauty(home, str(root / "amazon-beauty"), users=QUICK_USERS[dataset] if args.quick else 0)
    last = out["last_day"]
    print(f"[{dataset}] imported {out['events']} events; tokenizing up to {last}", file=sys.stderr)
    tokenize.run(parse_overrides(tokenize.TokenizeConfig, {"date": last, "full": True}), home)
    return home, last


def prepare_taobao(home: Paths, args) -> tuple[Paths, str]:
    day = latest_partition_before(home.history, __import__("datetime").date.max) if home.history.exists() else None
    if day is not None:
        return home, day.isoformat()
    source = Path(args.data) / "taobao-815" / "UserBehavior_first815users.csv.gz"
    out = event_import.run(event_import.ImportConfig(source=str(source), **TAOBAO_IMPORT), home)
    tokenize.run(parse_overrides(tokenize.TokenizeConfig, {"date": out["last_day"], "full": True}), home)
    return home, out["last_day"]


def taobao(args, seed: int) -> dict:
    """Per-head accuracy vs baselines, and each head choice's effect on next-title quality."""
    home, day = prepare("taobao", args)
    out = {}
    for name, over in TAOBAO_VARIANTS.items():
        r = product("taobao", args, seed, over)
        out[name] = {**{k: r[k] for k in METRICS}, "heads": r["heads"], "train_cpu_s": r["train_cpu_s"]}
    seqs = Sequences.read(partition(home.history, __import__("datetime").date.fromisoformat(day)))
    out["action_count_baseline"] = count_baseline(seqs, P.eval_set(seqs, 1))
    return {**out["defaults"], "variants": out}


def count_baseline(seqs: Sequences, es: P.EvalSet) -> dict:
    """Each user's action counts so far: answering the most frequent (ties: the smallest id) gives
    ``accuracy``; ranking by each action's share of the user's earlier events gives ``auc`` (one vs rest)."""
    actions = seqs.values["action"]
    n = int(actions.max()) + 1 if len(actions) else N_SPECIAL
    counts = np.stack([np.bincount(actions[seqs.offsets[r]: seqs.offsets[r] + e], minlength=n)
                       for r, e in zip(es.rows, es.ends)]) if len(es) else np.zeros((0, n))
    truth = actions[seqs.offsets[es.rows] + es.ends]
    share = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    aucs = one_vs_rest_auc(share, truth, ACTIONS)
    return {"accuracy": float((counts.argmax(1) == truth).mean()) if len(es) else float("nan"),
            "auc": aucs, "macro_auc": float(np.mean(list(aucs.values()))) if aucs else None}


def eval_data(dataset: str, home: Paths, day: str, args) -> tuple[Sequences, np.ndarray]:
    """The sequences ``fmpipe evaluate`` scores on (ML-1M: the ratings file in protocol order mapped to
    the pipeline's ids; Beauty: the history table) and the candidate titles."""
    ids = title_ids_by_idx(read_vocab(home))
    if dataset == "ml-1m":
        seqs, _ = ev.movielens_data(ev.EvalConfig(data="movielens", path=str(Path(args.data) / "ml-1m")), ids)
        seqs.values.pop(ev.TS)
        if args.quick:
            seqs = seqs.take(np.flatnonzero(seqs.profile_id <= QUICK_USERS[dataset]))
    else:
        seqs = Sequences.read(partition(home.history, __import__("datetime").date.fromisoformat(day)))
    cand = np.unique(seqs.values["title"])
    return seqs, cand[cand >= N_SPECIAL]


# ---------------------------------------------------------------------------------------------
# Parts
# ---------------------------------------------------------------------------------------------
def trained(model_dir: str, cfg) -> dict:
    """``--trained DIR``: what ``train_job.run`` returned for a model the product path already trained
    (e.g. the sweep run validation chose), read back from its checkpoint, so it is evaluated without
    training it again. Refused unless it was trained with exactly this part's settings (``valid_users``
    aside: it only samples which validation targets pick the checkpoint)."""
    meta = json.loads((Path(model_dir) / "config.json").read_text())
    want = {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.__dict__.items() if k != "valid_users"}
    theirs = {"ema": 0.0, **meta["train_config"]}                       # trained before the option existed: off
    for d, c in ((want, cfg), (theirs, SimpleNamespace(**theirs))):    # "auto" compares as what it resolves to
        d["cold_bias_quantile"], d["cold_content_scale"] = cold_calibration(c)
    diff = {k: (theirs.get(k), v) for k, v in want.items() if theirs.get(k) != v}
    if diff:
        raise SystemExit(f"--trained {model_dir}: trained with other settings than this part's (theirs, ours): {diff}")
    m = meta["metrics"]
    return {"path": model_dir, "model_version": meta["model_version"], "n_params": meta["n_params"], "valid": m["best"],
            **{k: m[k] for k in ("train_s", "train_cpu_s", "steps", "epochs", "stopped_by")}}


def product(dataset: str, args, seed: int, overrides: dict | None = None) -> dict:
    """``fmpipe train leave_one_out=true`` with the defaults, then ``fmpipe evaluate``."""
    home, day = prepare(dataset, args)
    cfg = parse_overrides(train_job.TrainJobConfig, {"date": day, "leave_one_out": True, "promote": "never",
                                                     "time_budget_s": args.budget_s, "clock": args.clock,
                                                     "seed": seed, "checkpoint_every_s": 0, **(overrides or {})})
    out = trained(args.trained, cfg) if getattr(args, "trained", "") else train_job.run(cfg, home)
    data = {"data": "movielens", "path": str(Path(args.data) / "ml-1m")} if dataset == "ml-1m" else {"data": "history"}
    if args.quick and dataset == "ml-1m":
        data["users"] = f"1-{QUICK_USERS[dataset]}"
    e = ev.run(parse_overrides(ev.EvalConfig, {"model": out["path"], **data}), home)
    return {**{k: e["metrics"][k] for k in METRICS}, "users": e["metrics"]["users"],
            "train_s": out["train_s"], "train_cpu_s": out["train_cpu_s"], "steps": out["steps"],
            "epochs": out["epochs"], "stopped_by": out["stopped_by"], "valid_ndcg@10": out["valid"].get("ndcg@10"),
            "n_params": out["n_params"], "model_version": out["model_version"],
            "trained_on_eval_targets": e["trained_on_eval_targets"], "heads": e.get("heads"),
            "cold_start": e.get("cold_start"), "recipe": {k: v for k, v in cfg.__dict__.items()}}


def sasrec(dataset: str, args, seed: int, converged: bool = False, dropout: float | None = None,
           ema: float = 0.0, weight_decay: float = 0.0) -> dict:
    """Our SASRec on the product's history table: same fit loop, same validation targets, same budget
    (``dropout``: instead of the README's 0.2; ``ema`` and ``weight_decay``: the fit loop's options the
    foundation model's recipe uses, so the baseline may have them too)."""
    home, day = prepare(dataset, args)
    hist = Sequences.read(partition(home.history, __import__("datetime").date.fromisoformat(day)))
    n_titles = len(title_ids_by_idx(read_vocab(home)))
    max_len = SASREC_MAX_LEN[dataset]
    torch.manual_seed(seed)
    spec = {**SASREC["model"], **({"dropout": dropout} if dropout is not None else {})}
    model = SASRec(SASRecConfig(n_titles, max_len=max_len, **spec))
    back = held_out_back(True)
    train_seqs = P.truncate(hist, back)
    model.set_popularity(np.bincount(train_seqs.values["title"], minlength=n_titles)[:n_titles])
    actions = np.array([vocab_index(ACTIONS)[a] for a in train_job.dataset_target_actions(home) or ACTIONS])
    valid = validation_set(hist, back, actions, train_job.TrainJobConfig.valid_users, seed)

    def validate() -> dict:
        with P.selecting():
            return P.evaluate(model.scores, hist, valid, max_len)

    cfg = FitConfig(budget_s=args.converged_cap_s if converged else args.budget_s, clock=args.clock, seed=seed,
                    max_epochs=(30 if args.quick else 1000) if converged else 10_000,
                    patience=args.patience if converged else 0, schedule="constant" if converged else "cosine",
                    n_evals=8, desc=f"sasrec {dataset}", ema=ema, weight_decay=weight_decay, checkpoint_every_s=600.0 if converged else 0.0,
                    **{**SASREC["fit"], **({"lr": args.converged_lr} if converged else {})})
    # training to convergence goes on in sittings: a capped run saves its state, a larger cap resumes it
    state = home / "states" / (f"sasrec_converged-d{spec['dropout']}-ema{ema}-lr{cfg.lr}"
                                    f"{f'-wd{weight_decay}' if weight_decay else ''}-seed{seed}") if converged else None
    r = fit(model, train_seqs, max_len, cfg, validate=validate, state_dir=state, resume=converged)
    seqs, cand = eval_data(dataset, home, day, args)
    score = P.among(model.scores, cand, n_titles)          # the titles the protocol ranks, bound once
    test = P.evaluate(score, seqs, P.eval_set(seqs, 1), max_len)
    # post-hoc, after the checkpoint was chosen: the same-day / later split of bench/valid_test_gap.py
    # (it ranks the test targets once more: a minute, kept so the split has one definition)
    gaps = {"by_gap": gap_split(score, seqs, max_len)} if dataset == "beauty" else {}
    return {**{k: test[k] for k in METRICS}, "users": test["users"], "train_s": r.train_s, "train_cpu_s": r.train_cpu_s,
            "steps": r.steps, "epochs": r.epochs, "stopped_by": r.stopped_by, "valid_ndcg@10": r.best.get("ndcg@10"),
            "best_weights": r.best_weights, "n_params": model.n_params(), "resumed": r.resumed,
            "config": {**SASREC, "model": spec, "max_len": max_len, **({"lr": cfg.lr} if converged else {}),
                       **({"ema": ema} if ema else {}), **({"weight_decay": weight_decay} if weight_decay else {})}, **gaps}


SASREC_VARIANT_BASES = ("sasrec:", "sasrec_converged:", "beauty_sasrec:")
SASREC_VARIANT_KEYS = {"dropout": float, "ema": float, "weight_decay": float}


def baseline_variant(part: str) -> tuple[str, dict]:
    """``sasrec_converged:ema=0.999+dropout=0.5`` -> ("sasrec_converged", {"ema": 0.999, "dropout": 0.5}):
    the baseline with settings of its own (``dropout``: the model's; ``ema``: the fit loop's weight
    average, the option the foundation model's recipe has, so the two are compared with the same loop)."""
    base, _, spec = part.partition(":")
    settings = {}
    for item in spec.split("+"):
        key, _, value = item.partition("=")
        if key not in SASREC_VARIANT_KEYS or not value:
            raise ValueError(f"part {part!r}: expected {base}:KEY=VALUE[+KEY=VALUE] with KEY in {sorted(SASREC_VARIANT_KEYS)}")
        try:
            settings[key] = SASREC_VARIANT_KEYS[key](value)
        except ValueError:
            raise ValueError(f"part {part!r}: {key} needs a number, got {value!r}") from None
    return base, settings


def popularity(dataset: str, args, seed: int) -> dict:
    home, day = prepare(dataset, args)
    seqs, cand = eval_data(dataset, home, day, args)
    split = P.leave_one_out(seqs)
    n = int(seqs.values["title"].max()) + 1
    m = P.evaluate(P.popularity_scores(split.train, n), seqs, split.test, 200)
    return {**{k: m[k] for k in METRICS}, "users": m["users"]}


def run_part(part: str, args, seed: int) -> dict:
    if part == "product":
        return product("ml-1m", args, seed)
    if part == "sasrec":
        return sasrec("ml-1m", args, seed)
    if part == "sasrec_converged":
        return sasrec("ml-1m", args, seed, converged=True)
    if part == "beauty_fm":
        return product("beauty", args, seed)
    if part == "beauty_sasrec":
        return sasrec("beauty", args, seed)
    if part == "popularity":
        return popularity("ml-1m", args, seed)
    if part == "taobao":
        return taobao(args, seed)
    if part in COLD_START_PARTS:
        from bench import cold_start
        prev = None
        if args.rescore:                     # score the models a former run saved, without training
            prev = json.loads(part_file(args, part, seed).read_text())["result"]["models"]
        return cold_start.run(args, seed, prepare, eval_data, prev, dataset=COLD_START_PARTS[part])
    if part.startswith(SASREC_VARIANT_BASES):
        base, settings = baseline_variant(part)
        return sasrec("beauty" if base == "beauty_sasrec" else "ml-1m", args, seed, converged=base == "sasrec_converged",
                      **settings)
    key, _, value = part[len("ablate:"):].partition("=")
    return product("ml-1m", args, seed, {key: value})


# ---------------------------------------------------------------------------------------------
# Provenance, merge, report
# ---------------------------------------------------------------------------------------------
def provenance(argv) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=_HERE).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                    text=True, cwd=_HERE).stdout.strip())
    except OSError:
        commit, dirty = "unknown", True
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown") if Path("/proc/cpuinfo").exists() else "unknown"
    return {"commit": commit + ("+dirty" if dirty else ""),
            "command": " ".join([".venv/bin/python", "bench/quality.py", *(argv if argv is not None else sys.argv[1:])]),
            "machine": f"{os.cpu_count()}-core CPU ({cpu}), "
                       f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'}, torch {torch.__version__}",
            "loadavg_start": [round(x, 2) for x in os.getloadavg()]}


def part_file(args, part: str, seed: int) -> Path:
    name = part.replace(":", "_").replace("=", "-")
    if part in COLD_START_PARTS and args.recipe:
        name += "_" + "_".join(kv.replace("=", "-") for kv in args.recipe)
    return Path(args.out) / f"quality{'_quick' if args.quick else ''}" / f"{name}-seed{seed}.json"


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if not args.merge:
        for part in args.parts:
            for seed in ([0] if part == "popularity" else args.seeds):
                rec = {"part": part, "seed": seed, "budget_s": args.budget_s, "clock": args.clock,
                       "threads": args.threads, "converged_cap_s": args.converged_cap_s, **provenance(argv)}
                f = part_file(args, part, seed)
                if args.rescore and part in COLD_START_PARTS:     # the models come from the former run: say whose
                    old = json.loads(f.read_text())
                    rec["models_trained_by"] = old.get("models_trained_by") or {
                        k: old.get(k) for k in ("commit", "command", "machine", "budget_s", "clock")}
                t = time.perf_counter()
                print(f"== {part} seed {seed}", file=sys.stderr)
                rec["result"] = run_part(part, args, seed)
                rec["wall_s"] = round(time.perf_counter() - t, 1)
                rec["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
                f.parent.mkdir(parents=True, exist_ok=True)
                f.write_text(json.dumps(rec, indent=1, default=str))
    res = merge(args)
    emit(res)
    return res


if __name__ == "__main__":
    main()
