"""One foundation model vs one specialised model per surface (issue 15, item 2: the claim itself).

    .venv/bin/python bench/surfaces.py --quick                 # smoke run (small world, 20 s per model)
    .venv/bin/python bench/surfaces.py --seed 0                # the generated world, 240 s CPU per model
    .venv/bin/python bench/surfaces.py --only taobao           # Taobao-815, the action type as the task

**generated**: the synthetic world with planted per-canvas behaviour (``fmpipe generate
canvas_behaviour=true``, deterministic: kids profiles browse a kids canvas that alone shows kids-only
titles, search follows the genres of the profile's last title, home shows what is popular), imported
and tokenized by the product's jobs. Models, all built and trained by the product's recipe
(``fm.recipe.build`` / ``fm.recipe.fit_model``: the defaults of ``fmpipe train``), each under the same
per-model budget (``--budget-s`` seconds of ``--clock`` time):

* ``fm``: the one foundation model with ``surfaces=home,search,kids`` (next-title targets on every
  canvas, the surface query trained from each next event's canvas); asked per canvas with that
  canvas's surface query;
* ``fm_plain``: the same without surface queries (``surfaces=``), asked with its plain query -- the
  conditioned vs unconditioned comparison;
* ``spec_<c>``: one specialist per canvas, ``target_canvases=<c>``: the same architecture and recipe,
  but only the next events on canvas c are next-title targets (every event stays context); asked
  with its plain query.

Targets (``fm.protocol.canvas_eval_set``): per canvas c and profile, the last target event (play,
complete, add to list, thumbs up) on c is the test target, the one before it on c the validation
target; the input is everything before the target. Every model trains on each profile's events
before the first of its held-out targets (``fm.protocol.before_targets``), so no model ever trains on
a validation or test event. Full ranking over every title, the profile's input history removed
(``fm.protocol.evaluate``). Checkpoints are chosen on validation only (``fm.protocol.selecting``):
a specialist on its canvas, the FMs on the mean over the canvases.

**taobao**: Taobao-815 (``fmpipe import events``, pv/cart/fav/buy as play/add_to_list/thumbs_up/
complete) with the action type as the task: next page view (``play``) vs next cart-or-buy
(``add_to_list``/``complete``). Targets per task as above (last event of that type: test; the one
before: validation). ``fm``: one model with every interaction as a target (it has no per-task query:
surface queries are per canvas and Taobao has one canvas); ``spec_view`` / ``spec_cart_buy``:
``target_actions=play`` / ``target_actions=add_to_list,complete``.

Results: ``bench/results/surfaces[_quick].md`` and ``.json`` (commit, command, machine, load); the
last output line is one JSON object with ``fm_over_specialists_min_ratio`` (min over canvases of
the FM's test NDCG@10 / the specialist's).
"""
from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))
# Under a CPU-time budget OpenMP threads must sleep rather than spin (bench/quality.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import datetime as dt  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, replace  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

from bench.common import emit, provenance, write_results  # noqa: E402
from fm import protocol as P  # noqa: E402
from fm.content import content_matrix, fit_encoder  # noqa: E402
from fm.data import Sequences, data_root  # noqa: E402
from fm.model import ModelConfig  # noqa: E402
from fm.recipe import Recipe, build, fit_model  # noqa: E402
from fm.schema import ACTIONS, CANVASES, vocab_index  # noqa: E402
from jobs.tools import event_import, generate  # noqa: E402
from jobs import tokenize  # noqa: E402
from jobs.core.io import latest_partition_before, partition  # noqa: E402
from jobs.core.settings import Paths, parse_overrides  # noqa: E402
from jobs.train import dataset_target_actions  # noqa: E402
from jobs.core.vocab import read_vocab, title_ids_by_idx  # noqa: E402

SURFACES = ("home", "search", "kids")
PARTS = ("generated", "taobao")
METRICS = ("ndcg@10", "hr@10", "ndcg@50", "hr@50")
# the world: fixed (the bench's --seed seeds training, not the data); quick is a smaller world
WORLD = dict(profiles=3000, titles=1500, days=28, new_titles_per_day=10, seed=7)
WORLD_QUICK = dict(profiles=800, titles=400, days=14, new_titles_per_day=5, seed=7)
# Taobao's behaviours as pipeline actions (bench/quality.py's mapping) and the two tasks
TAOBAO_IMPORT = dict(user="user_id", item="item_id", timestamp="timestamp", action="behavior",
                     action_map="pv:play,cart:add_to_list,fav:thumbs_up,buy:complete")
TAOBAO_TASKS = {"view": ("play",), "cart_buy": ("add_to_list", "complete")}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small world (800 profiles, 14 days), 20 s per model")
    ap.add_argument("--only", default="", help=f"comma-separated parts: {', '.join(PARTS)} (default: generated)")
    ap.add_argument("--seed", type=int, default=0, help="training seed (the generated world is fixed)")
    ap.add_argument("--budget-s", type=float, default=None, help="training budget per model (default 240; quick 20)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="cpu", help="what the budget counts")
    ap.add_argument("--recipe", action="append", default=[], metavar="KEY=VALUE",
                    help="a recipe setting for every model (repeatable)")
    ap.add_argument("--data", default=str(data_root()), help="folder holding taobao-815/")
    ap.add_argument("--work", default=str(Path(_HERE) / ".work"), help="scratch FMPIPE_HOMEs (built once, reused)")
    ap.add_argument("--out", default=str(Path(_HERE) / "results"), help="results folder")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    a = ap.parse_args(argv)
    a.budget_s = a.budget_s if a.budget_s is not None else (20.0 if a.quick else 240.0)
    a.parts = [p for p in a.only.split(",") if p] or ["generated"]
    for p in a.parts:
        if p not in PARTS:
            ap.error(f"unknown part {p!r}; valid: {', '.join(PARTS)}")
    return a


# ---------------------------------------------------------------------------------------------
# Data: the product's jobs into a scratch FMPIPE_HOME, once
# ---------------------------------------------------------------------------------------------
def latest(home: Paths) -> dt.date | None:
    return latest_partition_before(home.history, dt.date.max) if home.history.exists() else None


def prepare_generated(args) -> tuple[Paths, dt.date]:
    world = WORLD_QUICK if args.quick else WORLD
    home = Paths(Path(args.work) / ("surfaces-" + "-".join(f"{k}{v}" for k, v in world.items())))
    if latest(home) is None:
        home.home.mkdir(parents=True, exist_ok=True)
        out = generate.run(generate.GenerateConfig(canvas_behaviour=True, **world), home)
        last = max(out["days"])
        print(f"[generated] {out['events']} events; tokenizing up to {last}", file=sys.stderr)
        tokenize.run(parse_overrides(tokenize.TokenizeConfig, {"date": last, "full": True}), home)
    return home, latest(home)


def prepare_taobao(args) -> tuple[Paths, dt.date]:
    home = Paths(Path(args.work) / "taobao")                  # the same scratch home bench/quality.py uses
    if latest(home) is None:
        source = Path(args.data) / "taobao-815" / "UserBehavior_first815users.csv.gz"
        out = event_import.run(event_import.ImportConfig(source=str(source), **TAOBAO_IMPORT), home)
        tokenize.run(parse_overrides(tokenize.TokenizeConfig, {"date": out["last_day"], "full": True}), home)
    return home, latest(home)


def content(home: Paths, r: Recipe) -> tuple[list, np.ndarray]:
    """Vocabulary ids and the content vectors every model of a part shares (fitted like ``fmpipe train``)."""
    vocab = read_vocab(home)
    ids = title_ids_by_idx(vocab)
    cat = pq.read_table(home.catalogue)
    enc = fit_encoder(r.content_encoder, cat.filter(pc.is_in(cat["title_id"], vocab["title_id"])),
                      dim=r.content_dim, seed=r.seed)
    return ids, content_matrix(enc, ids, cat, cache=home.content_cache)


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------
def train_and_test(name: str, r: Recipe, ask, seqs: Sequences, train_seqs: Sequences, n_titles: int,
                   content_vectors: np.ndarray, dataset_actions: tuple, valid: dict, test: dict) -> dict:
    """Build and train one model by the recipe; choose its checkpoint on ``valid`` (mean over the
    tasks it is selected on), then test it once on every task of ``test``. ``ask(model, task)`` is
    the score function the model answers a task with."""
    model = build(r, n_titles, content_vectors, dataset_actions)

    def validate() -> dict:
        with P.selecting():
            got = P.per_task(lambda t: ask(model, t), seqs, valid, model.cfg.max_len, ks=(10,))
        return {"ndcg@10": got["mean"].get("ndcg@10", 0.0), "tasks": {t: m.get("ndcg@10") for t, m in got.items()}}

    t0 = time.perf_counter()
    fitted = fit_model(r, model, train_seqs, validate, desc=name)
    res = P.per_task(lambda t: ask(model, t), seqs, test, model.cfg.max_len, ks=(10, 50))
    print(f"[{name}] {fitted.train_cpu_s:.0f} s CPU, {fitted.steps} steps, valid {fitted.best.get('ndcg@10', 0):.4f}, "
          f"test " + ", ".join(f"{t} {m.get('ndcg@10', float('nan')):.4f}" for t, m in res.items()), file=sys.stderr)
    return {"test": res, "valid_ndcg@10": fitted.best.get("ndcg@10"), "valid_tasks": fitted.best.get("tasks"),
            "n_params": model.n_params(), "train_cpu_s": fitted.train_cpu_s, "train_s": fitted.train_s,
            "eval_s": fitted.eval_s, "steps": fitted.steps, "epochs": fitted.epochs, "stopped_by": fitted.stopped_by,
            "best_step": fitted.best_step, "wall_s": round(time.perf_counter() - t0, 1),
            "model_config": model.cfg.to_dict() | {"field_sizes": None}}


def plain(model, task: str) -> P.ScoreFn:
    return P.fm_scores(model)


def surface(model, task: str) -> P.ScoreFn:
    return P.fm_scores(model, task)


def base_recipe(args) -> Recipe:
    return parse_overrides(Recipe, {"time_budget_s": args.budget_s, "clock": args.clock, "seed": args.seed,
                                    **dict(kv.split("=", 1) for kv in args.recipe)})


def generated(args) -> dict:
    home, day = prepare_generated(args)
    seqs = Sequences.read(partition(home.history, day))
    r = base_recipe(args)
    ids, vectors = content(home, r)
    names = tuple(r.target_actions) or dataset_target_actions(home) or ModelConfig.target_actions
    actions = np.array([vocab_index(ACTIONS)[a] for a in names])           # what every model predicts
    canvas = vocab_index(CANVASES)
    test = {c: P.canvas_eval_set(seqs, canvas[c], 1, "test", actions) for c in SURFACES}
    valid = {c: P.canvas_eval_set(seqs, canvas[c], 2, "valid", actions) for c in SURFACES}
    train_seqs = P.before_targets(seqs, *valid.values(), *test.values())
    models = {"fm": (replace(r, surfaces=",".join(SURFACES)), surface, valid),
              "fm_plain": (replace(r, surfaces=""), plain, valid),
              **{f"spec_{c}": (replace(r, surfaces="", target_canvases=c), plain, {c: valid[c]}) for c in SURFACES}}
    out = {name: train_and_test(name, rr, ask, seqs, train_seqs, len(ids), vectors, (), sel, test)
           for name, (rr, ask, sel) in models.items() if name in args.models}
    data = {"world": WORLD_QUICK if args.quick else WORLD, "profiles": len(seqs), "titles": len(ids) - 2,
            "tokens": int(seqs.offsets[-1]), "train_tokens": int(train_seqs.offsets[-1]),
            "test_users": {c: len(es) for c, es in test.items()}, "valid_users": {c: len(es) for c, es in valid.items()}}
    return {"data": data, "models": out, "recipe": asdict(r), **summary(out, SURFACES, "fm")}


def taobao(args) -> dict:
    home, day = prepare_taobao(args)
    seqs = Sequences.read(partition(home.history, day))
    r = base_recipe(args)
    ids, vectors = content(home, r)
    ds_actions = dataset_target_actions(home)
    index = vocab_index(ACTIONS)
    keep = {t: np.isin(seqs.values["action"], [index[a] for a in acts]) for t, acts in TAOBAO_TASKS.items()}
    test = {t: P.eval_set_where(seqs, k, 1, "test") for t, k in keep.items()}
    valid = {t: P.eval_set_where(seqs, k, 2, "valid") for t, k in keep.items()}
    train_seqs = P.before_targets(seqs, *valid.values(), *test.values())
    models = {"fm": (r, plain, valid),
              **{f"spec_{t}": (replace(r, target_actions=acts), plain, {t: valid[t]}) for t, acts in TAOBAO_TASKS.items()}}
    out = {name: train_and_test(name, rr, ask, seqs, train_seqs, len(ids), vectors, ds_actions, sel, test)
           for name, (rr, ask, sel) in models.items()}
    fm_actions = out["fm"]["model_config"]["target_actions"]
    data = {"profiles": len(seqs), "titles": len(ids) - 2, "tokens": int(seqs.offsets[-1]),
            "train_tokens": int(train_seqs.offsets[-1]), "fm_target_actions": fm_actions,
            "test_users": {t: len(es) for t, es in test.items()}, "valid_users": {t: len(es) for t, es in valid.items()}}
    return {"data": data, "models": out, "recipe": asdict(r), **summary(out, tuple(TAOBAO_TASKS), "fm")}


def summary(out: dict, tasks: tuple[str, ...], fm: str) -> dict:
    """Per task: the FM's and its specialist's test figures and their ratio; the two approaches' totals."""
    specs = {t: out.get(f"spec_{t}") for t in tasks}
    per_task = {}
    for t in tasks:
        row = {f"{name} {k}": m["test"][t].get(k) for name, m in out.items() for k in ("ndcg@10", "hr@10")}
        if fm in out and specs[t]:
            row["fm_over_specialist"] = round(out[fm]["test"][t]["ndcg@10"] / specs[t]["test"][t]["ndcg@10"], 3) \
                if specs[t]["test"][t]["ndcg@10"] else None
        if "fm_plain" in out and fm in out:
            row["conditioned_over_plain"] = round(out[fm]["test"][t]["ndcg@10"] / out["fm_plain"]["test"][t]["ndcg@10"], 3) \
                if out["fm_plain"]["test"][t]["ndcg@10"] else None
        per_task[t] = row
    ratios = [row["fm_over_specialist"] for row in per_task.values() if row.get("fm_over_specialist") is not None]
    have = [s for s in specs.values() if s]
    totals = {"fm": {"n_params": out[fm]["n_params"], "train_cpu_s": out[fm]["train_cpu_s"]} if fm in out else None,
              "specialists": {"models": len(have), "n_params": sum(s["n_params"] for s in have),
                              "train_cpu_s": round(sum(s["train_cpu_s"] for s in have), 2)}}
    return {"per_task": per_task, "totals": totals,
            "fm_over_specialists_min_ratio": min(ratios) if len(ratios) == len(tasks) else None}


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
def section(title: str, res: dict, tasks: tuple[str, ...], ask_note: str) -> list[str]:
    models = res["models"]
    lines = [f"## {title}", "", ask_note, "",
             "| model | " + " | ".join(f"{t} NDCG@10 | {t} HR@10" for t in tasks) + " | valid NDCG@10 (selection) | params | train s (CPU) | steps | epochs |",
             "|---|" + "---:|---:|" * len(tasks) + "---:|---:|---:|---:|---:|"]
    for name, m in models.items():
        cells = []
        for t in tasks:
            own = name == "fm" or name == "fm_plain" or name == f"spec_{t}"
            x = m["test"][t]
            f = (lambda v: f"**{v:.4f}**") if own else (lambda v: f"({v:.4f})")  # noqa: E731
            cells += [f(x["ndcg@10"]), f(x["hr@10"])]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {m['valid_ndcg@10']:.4f} | {m['n_params']:,} | "
                     f"{m['train_cpu_s']:.0f} | {m['steps']} | {m['epochs']:.1f} |")
    tot = res["totals"]
    lines += ["", "Bold: the task a model is for; in brackets a specialist's figure on another canvas's targets "
              "(it was not trained or selected for them).", ""]
    lines += ["| task | test users | FM / specialist (NDCG@10) |" + (" conditioned / plain FM |" if "fm_plain" in models else ""),
              "|---|---:|---:|" + ("---:|" if "fm_plain" in models else "")]
    for t, row in res["per_task"].items():
        lines.append(f"| {t} | {res['data']['test_users'][t]} | {row.get('fm_over_specialist')} |" +
                     (f" {row.get('conditioned_over_plain')} |" if "fm_plain" in models else ""))
    if tot["fm"]:
        lines += ["", f"**One FM**: {tot['fm']['n_params']:,} parameters, {tot['fm']['train_cpu_s']:.0f} s CPU. "
                  f"**{tot['specialists']['models']} specialists**: {tot['specialists']['n_params']:,} parameters, "
                  f"{tot['specialists']['train_cpu_s']:.0f} s CPU in all. "
                  f"min over tasks of FM / specialist NDCG@10: **{res['fm_over_specialists_min_ratio']}**.", ""]
    d = {k: v for k, v in res["data"].items() if k not in ("test_users",)}
    lines += [f"Data: `{json.dumps(d)}`", ""]
    return lines


def write_report(rec: dict, args) -> Path:
    suffix = "_quick" if args.quick else ""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# One foundation model vs a specialist per surface{' (quick smoke run: not a result)' if args.quick else ''}", "",
             "`bench/surfaces.py` (issue 15, item 2). Every model is built and trained by the product's recipe "
             "(`fm.recipe`, the defaults of `fmpipe train`) under the **same per-model budget: "
             f"{args.budget_s:.0f} s {args.clock} time, {args.threads} thread(s)**, seed {args.seed}; a specialist differs "
             "from the FM only in which next events are next-title targets (`target_canvases=` / `target_actions=`). "
             "Test targets: per task and profile the last event of that task; validation: the one before "
             "(checkpoints chosen on it only); training stops before each profile's first held-out target. "
             "Full ranking over every title, input history removed.", ""]
    res = rec["result"]
    if "generated" in res:
        lines += section("Generated world with planted per-canvas behaviour", res["generated"], SURFACES,
                         "The FM (`surfaces=home,search,kids`) is asked with the canvas's surface query; `fm_plain` "
                         "(no surfaces) and the specialists (`target_canvases=<canvas>`) with their plain query.")
    if "taobao" in res:
        lines += section("Taobao-815: the action type as the task", res["taobao"], tuple(TAOBAO_TASKS),
                         "`view` = next page view (pv), `cart_buy` = next cart or buy. The FM trains on every "
                         "interaction and has no per-task query (one plain query for both tasks); the specialists "
                         "`target_actions=play` / `target_actions=add_to_list,complete`.")
    return write_results(out, f"surfaces{suffix}", lines, rec)


def main(argv=None) -> dict:
    args = parse_args(argv)
    args.models = ("fm", "fm_plain", *(f"spec_{c}" for c in SURFACES))
    torch.set_num_threads(args.threads)
    rec = {"budget_s": args.budget_s, "clock": args.clock, "threads": args.threads, "seed": args.seed,
           **provenance("bench/surfaces.py", argv)}
    t = time.perf_counter()
    rec["result"] = {p: (generated if p == "generated" else taobao)(args) for p in args.parts}
    rec["wall_s"] = round(time.perf_counter() - t, 1)
    rec["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    write_report(rec, args)
    res = rec["result"]
    line = {"fm_over_specialists_min_ratio": res.get("generated", {}).get("fm_over_specialists_min_ratio"),
            "quick": args.quick, "budget_s": args.budget_s, "clock": args.clock}
    for p, r in res.items():
        line[p] = {"per_task": r["per_task"], "totals": r["totals"],
                   "fm_over_specialists_min_ratio": r["fm_over_specialists_min_ratio"]}
    emit(line)
    return line


if __name__ == "__main__":
    main()
