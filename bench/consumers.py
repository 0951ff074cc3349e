"""How downstream consumers use the one foundation model (issue 15, items 3-4 and 6).

    .venv/bin/python bench/consumers.py --quick            # smoke run: small generated world, minutes on 2 cores
    .venv/bin/python bench/consumers.py                    # the larger generated world, longer budgets

The world is bench/surfaces.py's generated world with planted per-canvas behaviour (the same
scratch home, built once by the product's generate / tokenize jobs). The **teacher** is the product's
foundation model: built and trained by ``fm.recipe`` (the defaults of ``fmpipe train``) with the
leave-one-out split of ``fm.protocol``: each profile's last target event is the test target, the
one before it the validation target, training sees everything before them; checkpoints and every
setting below are chosen on validation only (``fm.protocol.selecting``); test is read once.

Parts (``--only``; a part not run, or not built yet, reports null -- never a made-up number):

* ``mmr`` -- diversity (``fm.diversity``, what ``fmpipe retrieve diversity=mmr lambda=...`` runs):
  per target, the teacher's top ``--pool`` titles under the protocol (history removed, target kept:
  ``fm.protocol.top_titles``) re-ranked by MMR over the published title vectors for each lambda
  of a grid; NDCG@10 of the re-ranked list and its intra-list similarity (mean pairwise cosine of
  the ten titles' vectors) against the plain top-10 (lambda = 1, equal to the protocol's NDCG@10).
  The reported lambda is chosen on validation: the largest similarity drop whose NDCG@10 drop is
  at most 3% (else the smallest NDCG drop); ``mmr_similarity_drop`` / ``mmr_ndcg_drop`` are its
  test figures (relative drops). The genre cap alone (``genre_cap=1,2,3``) is reported beside it.

* ``distill`` -- a student (``fm.distill``, what ``fmpipe distill`` runs: the same model class, one
  layer, d_model 32, one head, 50-event context) trained through the product's fit loop on the
  teacher's split with the teacher's next-title distribution as soft targets, under the teacher's
  budget; ``student_plain`` is the same small model trained by the recipe alone (no teacher), the
  control that says what distillation adds. ``student_quality_ratio`` = student / teacher test
  NDCG@10; ``student_speedup`` = student / teacher profiles per second through the product's
  inference encoder (``fm.stream.encode_sequences``, every profile of the world, ``--threads``
  threads, best of 3 interleaved runs, wall clock).

* ``finetune`` / ``prompt`` -- a downstream task on the same world: "does the profile's next event
  complete a title" (label 1 when its last event is a ``complete``; input: every event before it;
  profiles split 60/20/20 into train / validation / test, seeded). ``finetune``: ``fm.finetune.TaskHead``
  (an MLP head plus the top block and final LayerNorm of a copy of the teacher, what ``fmpipe
  finetune-task`` trains) and ``probe`` (a linear head on the frozen teacher) as the floor;
  ``prompt``: ``fm.prompts.PromptTask`` (4 soft tokens + a linear readout, the teacher frozen -- its
  weights checksum is compared before and after). Each fit under ``--task-budget-s``, checkpoint by
  validation AUC, learning rate chosen on validation AUC among ``TASK_LRS``; test AUC reported. ``prompt_over_finetune_ratio`` = prompt / head test AUC;
  ``prompt_param_share`` = the prompt's trainable parameters / the head's.

Results: ``bench/results/consumers[_quick].md`` and ``.json`` (commit, command, machine, load); the
last output line is one JSON object with ``student_quality_ratio``, ``student_speedup``,
``prompt_over_finetune_ratio``, ``prompt_param_share``, ``mmr_similarity_drop``, ``mmr_ndcg_drop``.
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
import json  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, replace  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.common import emit, provenance, write_results  # noqa: E402
from bench.surfaces import content, prepare_generated  # noqa: E402
from fm import protocol as P  # noqa: E402
from fm.data import Sequences  # noqa: E402
from fm.distill import StudentShape, agreement, distill  # noqa: E402
from fm.diversity import intra_list_similarity, rerank  # noqa: E402
from fm.finetune import TaskHead, auc, fit_task, labels_of, n_trainable, predict, task_sequences  # noqa: E402
from fm.prompts import PromptTask, weights_checksum  # noqa: E402
from fm.extract import ProfileEncoder, default_layers, title_embeddings  # noqa: E402
from fm.stream import encode_sequences  # noqa: E402
from fm.recipe import Recipe, build, target_ids, train  # noqa: E402
from jobs.core.io import partition  # noqa: E402
from jobs.tools.retrieve import title_genres  # noqa: E402
from jobs.core.settings import parse_overrides  # noqa: E402

PARTS = ("mmr", "distill", "finetune", "prompt")
KEYS = ("student_quality_ratio", "student_speedup", "prompt_over_finetune_ratio", "prompt_param_share",
        "mmr_similarity_drop", "mmr_ndcg_drop")
LAMBDAS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3)
MAX_NDCG_DROP = 0.03
TASK_LRS = (3e-3, 3e-4)
GENRE_CAPS = (1, 2, 3)        # `fmpipe retrieve genre_cap=N` (lambda 1), reported on test beside the MMR grid       # each task method's learning rate is chosen on validation among these          # the bar: similarity down >= 20% for <= 3% NDCG@10


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small world (800 profiles, 14 days), short budgets")
    ap.add_argument("--only", default="", help=f"comma-separated parts: {', '.join(PARTS)} (default: all)")
    ap.add_argument("--seed", type=int, default=0, help="training seed (the generated world is fixed)")
    ap.add_argument("--budget-s", type=float, default=None, help="teacher training budget (default 240; quick 30)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="cpu", help="what the budget counts")
    ap.add_argument("--recipe", action="append", default=[], metavar="KEY=VALUE",
                    help="a recipe setting of the teacher (repeatable)")
    ap.add_argument("--task-budget-s", type=float, default=None,
                    help="budget of each task fit (head, probe, prompt; per learning rate) (default 120; quick 15)")
    ap.add_argument("--pool", type=int, default=None, help="MMR candidate pool per target (default 500; quick 200)")
    ap.add_argument("--work", default=str(Path(_HERE) / ".work"), help="scratch FMPIPE_HOMEs (built once, reused)")
    ap.add_argument("--out", default=str(Path(_HERE) / "results"), help="results folder")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    a = ap.parse_args(argv)
    a.budget_s = a.budget_s if a.budget_s is not None else (30.0 if a.quick else 240.0)
    a.task_budget_s = a.task_budget_s if a.task_budget_s is not None else (15.0 if a.quick else 120.0)
    a.pool = a.pool or (200 if a.quick else 500)
    a.parts = [p for p in a.only.split(",") if p] or list(PARTS)
    for p in a.parts:
        if p not in PARTS:
            ap.error(f"unknown part {p!r}; valid: {', '.join(PARTS)}")
    return a


# ---------------------------------------------------------------------------------------------
# The world and the teacher
# ---------------------------------------------------------------------------------------------
class World:
    """The generated world's sequences, content vectors and the protocol's targets."""

    def __init__(self, args):
        home, day = prepare_generated(args)
        self.home, self.day = home, day
        self.seqs = Sequences.read(partition(home.history, day))
        self.recipe = parse_overrides(Recipe, {"time_budget_s": args.budget_s, "clock": args.clock, "seed": args.seed,
                                               **dict(kv.split("=", 1) for kv in args.recipe)})
        self.ids, self.content = content(home, self.recipe)


def train_teacher(w: World) -> tuple[torch.nn.Module, dict]:
    """The product's FM on the leave-one-out split (validation: second-last target event)."""
    model = build(w.recipe, len(w.ids), w.content)
    t0 = time.perf_counter()
    fitted, valid = train(w.recipe, model, w.seqs, leave_one_out=True, desc="teacher")
    w.valid = valid
    w.test = P.eval_set(w.seqs, 1, "test", target_ids(model))
    test = P.evaluate(P.fm_scores(model), w.seqs, w.test, model.cfg.max_len, ks=(10, 50))
    print(f"[teacher] {fitted.train_cpu_s:.0f} s CPU, {fitted.steps} steps, valid {fitted.best.get('ndcg@10', 0):.4f}, "
          f"test {test['ndcg@10']:.4f}", file=sys.stderr)
    return model.eval(), {"test": test, "valid_ndcg@10": fitted.best.get("ndcg@10"), "n_params": model.n_params(),
                          "max_len": model.cfg.max_len,
                          "train_cpu_s": fitted.train_cpu_s, "train_s": fitted.train_s, "steps": fitted.steps,
                          "epochs": fitted.epochs, "wall_s": round(time.perf_counter() - t0, 1),
                          "test_users": len(w.test), "valid_users": len(valid)}


# ---------------------------------------------------------------------------------------------
# MMR: intra-list similarity vs NDCG@10
# ---------------------------------------------------------------------------------------------
def mmr_lists(model, w: World, es: P.EvalSet, pool: int, k: int = 10, caps: tuple[int, ...] = ()) -> dict:
    """Per lambda (and per genre cap at lambda 1, keys ``cap<N>``): NDCG@10 / HR@10 of the re-ranked
    top ``k`` and its mean intra-list similarity."""
    top, val = P.top_titles(P.fm_scores(model), w.seqs, es, model.cfg.max_len, pool)
    vectors = title_embeddings(model)
    genres = title_genres(w.home, [t or "" for t in w.ids]) if caps else None
    settings = {**{lam: (lam, 0) for lam in LAMBDAS}, **{f"cap{c}": (1.0, c) for c in caps}}
    out = {}
    for key, (lam, cap) in settings.items():
        gains, hits, sims = np.zeros(len(es)), np.zeros(len(es)), np.zeros(len(es))
        for i in range(len(es)):
            ok = np.isfinite(val[i])
            cand = top[i][ok]
            pick = cand[rerank(val[i][ok], vectors[cand], k, lam, [genres[c] for c in cand] if cap else None, cap)]
            at = np.flatnonzero(pick == es.targets[i])
            if len(at):
                gains[i], hits[i] = 1.0 / np.log2(at[0] + 2), 1.0
            sims[i] = intra_list_similarity(vectors[pick])
        out[key] = {"ndcg@10": float(gains.mean()), "hr@10": float(hits.mean()), "ils": float(sims.mean())}
    plain = out[1.0]
    for m in out.values():
        m["similarity_drop"] = round(1 - m["ils"] / plain["ils"], 4) if plain["ils"] else None
        m["ndcg_drop"] = round(1 - m["ndcg@10"] / plain["ndcg@10"], 4) if plain["ndcg@10"] else None
    return out


def mmr_part(model, w: World, args, teacher: dict) -> dict:
    with P.selecting():
        valid = mmr_lists(model, w, w.valid, args.pool)
    ok = [lam for lam in LAMBDAS if lam < 1 and valid[lam]["ndcg_drop"] is not None
          and valid[lam]["ndcg_drop"] <= MAX_NDCG_DROP]
    chosen = max(ok, key=lambda lam: valid[lam]["similarity_drop"]) if ok else \
        min((lam for lam in LAMBDAS if lam < 1), key=lambda lam: valid[lam]["ndcg_drop"])
    test = mmr_lists(model, w, w.test, args.pool, caps=GENRE_CAPS)
    print(f"[mmr] lambda {chosen} (valid): test ILS {test[1.0]['ils']:.3f} -> {test[chosen]['ils']:.3f}, "
          f"NDCG@10 {test[1.0]['ndcg@10']:.4f} -> {test[chosen]['ndcg@10']:.4f}", file=sys.stderr)
    return {"pool": args.pool, "lambda": chosen, "chosen_on": "validation", "valid": valid, "test": test,
            "protocol_ndcg@10": teacher["test"]["ndcg@10"],
            "mmr_similarity_drop": test[chosen]["similarity_drop"], "mmr_ndcg_drop": test[chosen]["ndcg_drop"]}


# ---------------------------------------------------------------------------------------------
# Distillation: quality ratio vs speed
# ---------------------------------------------------------------------------------------------
def profiles_per_s(models: dict, seqs: Sequences, repeats: int = 3) -> dict[str, float]:
    """Profiles per second of each model through the product's inference encoder, best of
    ``repeats`` interleaved runs (the machine is shared: interleaving spreads the load evenly)."""
    encoders = {n: ProfileEncoder(m, default_layers(m.cfg.n_layers)) for n, m in models.items()}
    best = {n: float("inf") for n in models}
    for _ in range(repeats):
        for n, enc in encoders.items():
            t = time.perf_counter()
            encode_sequences(enc, seqs)
            best[n] = min(best[n], time.perf_counter() - t)
    return {n: round(len(seqs) / s, 1) for n, s in best.items()}


def distill_part(teacher, w: World, args, tinfo: dict) -> dict:
    shape = StudentShape()
    out = {"shape": asdict(shape)}
    for name, (w_kl, w_hard) in {"student": (1.0, 0.5), "student_plain": (0.0, 1.0)}.items():
        student, fitted, _ = distill(teacher, w.seqs, w.recipe, shape, w_kl=w_kl, w_hard=w_hard, leave_one_out=True,
                                     desc=name)
        test = P.evaluate(P.fm_scores(student), w.seqs, w.test, student.cfg.max_len, ks=(10, 50))
        out[name] = {"test": test, "valid_ndcg@10": fitted.best.get("ndcg@10"), "n_params": student.n_params(),
                     "train_cpu_s": fitted.train_cpu_s, "steps": fitted.steps, "epochs": fitted.epochs,
                     "w_kl": w_kl, "w_hard": w_hard, "top10_overlap_with_teacher": agreement(teacher, student, w.seqs, w.test)}
        out[f"_{name}_model"] = student
        print(f"[{name}] {fitted.train_cpu_s:.0f} s CPU, {fitted.steps} steps, valid {fitted.best.get('ndcg@10', 0):.4f}, "
              f"test {test['ndcg@10']:.4f}", file=sys.stderr)
    speed = profiles_per_s({"teacher": teacher, "student": out.pop("_student_model")}, w.seqs)
    out.pop("_student_plain_model")
    out["profiles_per_s"] = speed
    out["student_quality_ratio"] = round(out["student"]["test"]["ndcg@10"] / tinfo["test"]["ndcg@10"], 4)
    out["student_plain_quality_ratio"] = round(out["student_plain"]["test"]["ndcg@10"] / tinfo["test"]["ndcg@10"], 4)
    out["student_speedup"] = round(speed["student"] / speed["teacher"], 2)
    return out


# ---------------------------------------------------------------------------------------------
# A downstream task: fine-tuned head vs soft prompt
# ---------------------------------------------------------------------------------------------
def completion_task(w: World, seed: int) -> dict[str, Sequences]:
    """Label: the profile's last event is a ``complete``; input: every event before it."""
    from fm.schema import ACTIONS, vocab_index
    keep = np.flatnonzero(w.seqs.lengths >= 3)
    last = w.seqs.values["action"][w.seqs.offsets[keep + 1] - 1]
    labels = (last == vocab_index(ACTIONS)["complete"]).astype(np.int32)
    inputs = P.truncate(w.seqs, 1)
    perm = np.random.default_rng(seed + 11).permutation(len(keep))
    cut = [int(0.6 * len(keep)), int(0.8 * len(keep))]
    parts = dict(zip(("train", "valid", "test"), np.split(perm, cut)))
    return {name: task_sequences(inputs, w.seqs.profile_id[keep[idx]], labels[idx]) for name, idx in parts.items()}


def auc_se(a: float, y: np.ndarray) -> float:
    """Standard error of an AUC (Hanley & McNeil, 1982): how far two test AUCs may differ by chance."""
    n1, n0 = int(y.sum()), int(len(y) - y.sum())
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    return round(float(np.sqrt((a * (1 - a) + (n1 - 1) * (q1 - a * a) + (n0 - 1) * (q2 - a * a)) / (n1 * n0))), 4)


def task_part(teacher, w: World, args, parts: list[str]) -> dict:
    data = completion_task(w, args.seed)
    out = {"task": "next event completes a title", "positive_rate": {k: round(float(labels_of(v).mean()), 4)
                                                                        for k, v in data.items()},
           "profiles": {k: len(v) for k, v in data.items()}}
    models = {}
    if "finetune" in parts:
        models["head"] = lambda: TaskHead(teacher, hidden=64, top_layers=1)
        models["probe"] = lambda: TaskHead(teacher, hidden=0, top_layers=0)
    if "prompt" in parts:
        models["prompt"] = lambda: PromptTask(teacher, n_tokens=4, seed=args.seed)
    before = weights_checksum(teacher)
    for name, make in models.items():
        tried = {}
        for lr in TASK_LRS:                                    # the learning rate: chosen on validation AUC
            m = make()
            fitted = fit_task(m, data["train"], data["valid"], replace(w.recipe, lr=lr, time_budget_s=args.task_budget_s),
                              desc=f"{name} lr={lr}")
            tried[lr] = (fitted.best.get("auc", float("nan")), m, fitted)
        lr = max(tried, key=lambda x: tried[x][0] if np.isfinite(tried[x][0]) else -1.0)
        _, m, fitted = tried[lr]
        test = auc(labels_of(data["test"]), predict(m, data["test"], teacher.cfg.max_len))
        out[name] = {"test_auc": round(test, 4), "test_auc_se": auc_se(test, labels_of(data["test"])),
                     "valid_auc": fitted.best.get("auc"), "lr": lr,
                     "valid_auc_by_lr": {str(k): v[0] for k, v in tried.items()}, "trainable_params": n_trainable(m),
                     "train_cpu_s": fitted.train_cpu_s, "steps": fitted.steps, "epochs": fitted.epochs}
        print(f"[{name}] lr {lr}: {fitted.train_cpu_s:.0f} s CPU, {fitted.steps} steps, valid AUC "
              f"{fitted.best.get('auc', 0):.4f}, test AUC {test:.4f}, {n_trainable(m):,} trainable", file=sys.stderr)
    out["fm_weights_unchanged"] = weights_checksum(teacher) == before
    if "head" in out and "prompt" in out:
        out["prompt_over_finetune_ratio"] = round(out["prompt"]["test_auc"] / out["head"]["test_auc"], 4)
        out["prompt_param_share"] = round(out["prompt"]["trainable_params"] / out["head"]["trainable_params"], 5)
    return out


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
def headline(res: dict) -> dict:
    line = {k: None for k in KEYS}
    for part in res.values():
        if isinstance(part, dict):
            line.update({k: part[k] for k in KEYS if k in part})
    return line


def write_report(rec: dict, args) -> Path:
    suffix = "_quick" if args.quick else ""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res, t = rec["result"], rec["result"]["teacher"]
    lines = [f"# Consumers of the one foundation model{' (quick smoke run: not a result)' if args.quick else ''}", "",
             "`bench/consumers.py` (issue 15). Teacher: the product's FM (`fm.recipe`, defaults of `fmpipe train`), "
             f"{args.budget_s:.0f} s {args.clock} time, {args.threads} thread(s), seed {args.seed}; leave-one-out "
             "targets, full ranking, input history removed, choices on validation only.", "",
             f"Teacher: test NDCG@10 **{t['test']['ndcg@10']:.4f}** (HR@10 {t['test']['hr@10']:.4f}), "
             f"{t['n_params']:,} parameters, {t['train_cpu_s']:.0f} s CPU, {t['test_users']} test users.", "",
             "## Headline", "", "| key | value |", "|---|---|"]
    lines += [f"| `{k}` | {v} |" for k, v in headline(res).items()] + [""]
    if res.get("mmr"):
        m = res["mmr"]
        lines += ["## MMR: intra-list similarity vs NDCG@10", "",
                  f"Teacher's top {m['pool']} per target (protocol: history removed), re-ranked by `fm.diversity.rerank`; "
                  f"lambda **{m['lambda']}** chosen on validation (largest similarity drop with NDCG@10 drop "
                  f"<= {MAX_NDCG_DROP:.0%}). Drops are relative to lambda = 1 (the plain top-10).", "",
                  "| lambda | valid NDCG@10 | valid ILS | test NDCG@10 | test HR@10 | test ILS | ILS drop | NDCG drop |",
                  "|---|---|---|---|---|---|---|---|"]
        for lam in LAMBDAS:
            v, s = m["valid"][lam], m["test"][lam]
            lines.append(f"| {lam} | {v['ndcg@10']:.4f} | {v['ils']:.3f} | {s['ndcg@10']:.4f} | {s['hr@10']:.4f} | "
                         f"{s['ils']:.3f} | {s['similarity_drop']:.1%} | {s['ndcg_drop']:.1%} |")
        lines += ["", f"lambda = 1 reproduces the protocol's NDCG@10 ({m['protocol_ndcg@10']:.4f}). Genre cap alone "
                  "(`genre_cap=N`, lambda 1; a title counts against each of its genres), test: "
                  + "; ".join(f"N={c}: ILS {m['test'][f'cap{c}']['ils']:.3f} ({m['test'][f'cap{c}']['similarity_drop']:.1%} "
                              f"drop), NDCG@10 {m['test'][f'cap{c}']['ndcg@10']:.4f} ({m['test'][f'cap{c}']['ndcg_drop']:.1%} drop)"
                              for c in GENRE_CAPS if f"cap{c}" in m["test"]) + ".", ""]
    if res.get("distill"):
        d = res["distill"]
        lines += ["## Distillation: student vs teacher", "",
                  f"Student shape `{json.dumps(d['shape'])}`, trained through `fm.fit` under the teacher's budget. "
                  "Profiles/s: the product's inference encoder over every profile, best of 3, wall clock.", "",
                  "| model | params | test NDCG@10 | HR@10 | / teacher | top-10 overlap with teacher | profiles/s |",
                  "|---|---|---|---|---|---|---|",
                  f"| teacher | {t['n_params']:,} | {t['test']['ndcg@10']:.4f} | {t['test']['hr@10']:.4f} | 1 | 1 | "
                  f"{d['profiles_per_s']['teacher']:,.0f} |"]
        for name in ("student", "student_plain"):
            s = d[name]
            lines.append(f"| {name} (w_kl {s['w_kl']}, w_hard {s['w_hard']}) | {s['n_params']:,} | {s['test']['ndcg@10']:.4f} | "
                         f"{s['test']['hr@10']:.4f} | {s['test']['ndcg@10'] / t['test']['ndcg@10']:.3f} | "
                         f"{s['top10_overlap_with_teacher']:.3f} | {format(d['profiles_per_s'][name], ',.0f') if name in d['profiles_per_s'] else ''} |")
        lines += ["", f"Speed-up (student / teacher profiles/s): **{d['student_speedup']}x**; quality ratio "
                  f"**{d['student_quality_ratio']}** (goal: >= 0.9x quality at >= 5x speed). The speed comes from the "
                  f"shape as a whole (one layer, width 32, a {d['shape']['max_len']}-event context against the teacher's "
                  f"{t.get('max_len', '?')}); `student_plain` (the same shape, no teacher) reaches "
                  f"{d['student_plain_quality_ratio']} of the teacher: what the soft targets add is the difference.", ""]
    if res.get("task"):
        k = res["task"]
        lines += ["## Downstream task: fine-tuned head vs soft prompt", "",
                  f"Task: {k['task']}; profiles {json.dumps(k['profiles'])}, positive rate {json.dumps(k['positive_rate'])}. "
                  f"FM weights unchanged by prompt tuning (checksum): **{k['fm_weights_unchanged']}**.", "",
                  "| method | trainable params | lr (valid) | valid AUC | test AUC ± s.e. | CPU s | steps |",
                  "|---|---|---|---|---|---|---|"]
        for name in ("head", "probe", "prompt"):
            if name in k:
                m = k[name]
                lines.append(f"| {name} | {m['trainable_params']:,} | {m['lr']} | {m['valid_auc']:.4f} | "
                             f"{m['test_auc']:.4f} ± {m['test_auc_se']:.3f} | "
                             f"{m['train_cpu_s']:.0f} | {m['steps']} |")
        if "prompt_over_finetune_ratio" in k:
            lines += ["", f"prompt / head test AUC **{k['prompt_over_finetune_ratio']}** with "
                      f"**{k['prompt_param_share']:.2%}** of its trainable parameters (goal: within 3% with <= 1%). "
                      "Read with the standard errors: differences smaller than about two of them are noise, and "
                      "`probe` (a linear head on the frozen FM's vector) is the floor both adaptations must beat.", ""]
    return write_results(out, f"consumers{suffix}", lines, rec)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    rec = {"budget_s": args.budget_s, "task_budget_s": args.task_budget_s, "pool": args.pool, "clock": args.clock, "threads": args.threads, "seed": args.seed,
           "parts": args.parts, **provenance("bench/consumers.py", argv)}
    t = time.perf_counter()
    w = World(args)
    teacher, tinfo = train_teacher(w)
    res = {"teacher": tinfo, "recipe": asdict(w.recipe),
           "data": {"profiles": len(w.seqs), "titles": len(w.ids) - 2, "tokens": int(w.seqs.offsets[-1])}}
    if "mmr" in args.parts:
        res["mmr"] = mmr_part(teacher, w, args, tinfo)
    if "distill" in args.parts:
        res["distill"] = distill_part(teacher, w, args, tinfo)
    if {"finetune", "prompt"} & set(args.parts):
        res["task"] = task_part(teacher, w, args, args.parts)
    rec["result"] = res
    rec["wall_s"] = round(time.perf_counter() - t, 1)
    rec["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    write_report(rec, args)
    line = {**headline(res), "quick": args.quick, "teacher_ndcg@10": tinfo["test"]["ndcg@10"],
            "mmr_lambda": res.get("mmr", {}).get("lambda")}
    emit(line)
    return line


if __name__ == "__main__":
    main()
