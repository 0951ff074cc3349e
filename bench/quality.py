"""MovieLens-1M quality benchmark: our FoundationModel vs a SASRec baseline, same data, same
leave-one-out protocol (``fm.protocol``), same wall-clock training budget per model.

    .venv/bin/python bench/quality.py --quick                 # smoke run, < 3 min on 2 cores
    .venv/bin/python bench/quality.py --budget-s 300          # the comparison
    .venv/bin/python bench/quality.py --budget-s 300 --ablations --scaling --ablation-budget-s 150

Every model trains under the same budget (wall seconds of training steps; validation passes are not
counted), keeps the checkpoint with the best validation NDCG@10, and is reported on test. Writes
``<out>/quality[_quick].md`` (+ ``.json``, and ``scaling[_quick].png`` with ``--scaling``) and prints
one JSON object as the last line of stdout.
"""
from __future__ import annotations

import os
import sys

# Run as a script, Python puts bench/ first on sys.path, where sibling benchmarks (bench/tokenize.py)
# would shadow standard-library modules: use the repository root instead.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))
# With a CPU-time budget (--clock cpu), OpenMP threads must sleep rather than spin while waiting:
# spinning burns CPU time without progress when other jobs share the machine, which would charge a
# model for its neighbours. Set before torch (and its OpenMP runtime) loads.
if "--clock=cpu" in sys.argv or ("--clock" in sys.argv and sys.argv[sys.argv.index("--clock") + 1:][:1] == ["cpu"]):
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from fm import movielens as M  # noqa: E402
from fm import protocol as P  # noqa: E402
from fm.data import Sequences  # noqa: E402
from fm.model import FoundationModel, ModelConfig, init_weights, regress_cold_titles  # noqa: E402
from fm.sasrec import SASRec, SASRecConfig  # noqa: E402
from fm.schema import N_SPECIAL  # noqa: E402

ALL_RATINGS = ("complete", "thumbs_up", "thumbs_down")

# Our model for ML-1M. "model" -> ModelConfig, "objective" -> protocol.FMObjective, "fit" -> FitConfig,
# "init": zero_fields starts every non-title field embedding (action, time, device, ...) at zero, so
# the title signal dominates the first steps and side features grow only where they help (five of
# the nine fields are constant on MovieLens).
FM = {
    "model": dict(d_model=64, n_layers=2, n_heads=2, max_len=200, dropout=0.1, mtp_k=1, content_dim=64,
                  emb_norm=True, target_actions=ALL_RATINGS),
    "objective": dict(n_negatives=512, alpha=1.0, title_bias=True, mask_history=True),
    "fit": dict(lr=3e-3, batch_size=16),
    "init": dict(zero_fields=True),
}
# The baseline as the issue fixes it (2 layers, d=64, dropout 0.2, max len 200, full softmax CE);
# lr / batch size chosen for it on validation the same way as for our model.
SASREC = {
    "model": dict(d_model=64, n_layers=2, n_heads=2, max_len=200, dropout=0.2),
    "fit": dict(lr=3e-3, batch_size=16),
}
SCALING = [  # (name, model overrides) for --scaling, at the same budget each
    ("xs", dict(d_model=32, n_layers=1, n_heads=1)),
    ("s", dict(d_model=64, n_layers=2, n_heads=2)),
    ("m", dict(d_model=128, n_layers=2, n_heads=4)),
    ("l", dict(d_model=192, n_layers=3, n_heads=4)),
]
METRICS = ("hr@10", "ndcg@10", "hr@50", "ndcg@50")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="600 users, short budgets: a smoke run under 3 minutes")
    ap.add_argument("--budget-s", type=float, default=None, help="training budget per model (default 300, quick 40)")
    ap.add_argument("--ablation-budget-s", type=float, default=None,
                    help="budget per ablation / cold-start / scaling model (default: --budget-s; quick: 20)")
    ap.add_argument("--data", default=None, help="ML-1M folder (default $FMPIPE_ML1M or /work/shared/data/ml-1m)")
    ap.add_argument("--users", type=int, default=None, help="subsample this many users (quick: 600)")
    ap.add_argument("--ablations", action="store_true", help="FM without content / MTP / extra heads, and cold start")
    ap.add_argument("--scaling", action="store_true", help="FM at several sizes: table + PNG")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"), help="folder for the markdown table")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall", help="what the budget counts")
    ap.add_argument("--n-evals", type=int, default=None, help="validation checkpoints per run (default 6, quick 2)")
    ap.add_argument("--valid-users", type=int, default=None,
                    help="validate (checkpoint choice) on a fixed random subset of users; test always uses all")
    ap.add_argument("--holdout-frac", type=float, default=0.05, help="share of movies held out for the cold-start test")
    ap.add_argument("--cold-id-dropout", type=float, default=0.5,
                    help="ID dropout of the cold-start variant trained to score titles by content alone")
    ap.add_argument("--cold-start-only", action="store_true",
                    help="only the cold-start comparison (budget --ablation-budget-s); writes cold_start.{md,json}")
    ap.add_argument("--skip-sasrec", action="store_true", help="only our model (tuning)")
    ap.add_argument("--set", nargs="*", default=[], metavar="MODEL.KEY=VALUE",
                    help="override a setting, e.g. fm.lr=0.01 fm.d_model=128 fm.n_negatives=0 sasrec.batch_size=64")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    a.budget_s = a.budget_s if a.budget_s is not None else (40.0 if a.quick else 300.0)
    a.ablation_budget_s = a.ablation_budget_s if a.ablation_budget_s is not None else (20.0 if a.quick else a.budget_s)
    a.users = a.users if a.users is not None else (600 if a.quick else None)
    a.n_evals = a.n_evals if a.n_evals is not None else (2 if a.quick else 6)
    return a


def apply_overrides(pairs: list[str]) -> None:
    """``fm.lr=0.01`` -> FM["fit"]["lr"] = 0.01; the section (model / objective / fit) is found by the key."""
    import inspect
    sections = {
        "fm": [(FM["init"], ("zero_fields",)), (FM["model"], ModelConfig.__dataclass_fields__),
               (FM["objective"], inspect.signature(P.FMObjective.__init__).parameters),
               (FM["fit"], P.FitConfig.__dataclass_fields__)],
        "sasrec": [(SASREC["model"], SASRecConfig.__dataclass_fields__), (SASREC["fit"], P.FitConfig.__dataclass_fields__)],
    }
    for pair in pairs:
        key, _, raw = pair.partition("=")
        model, _, name = key.partition(".")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        target = next((d for d, fields in sections[model] if name in fields), None)
        if target is None:
            raise SystemExit(f"unknown setting {key!r}")
        target[name] = tuple(value) if isinstance(value, list) else value


# ---------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------
class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        t = time.perf_counter()
        self.ml = M.load(args.data, users=args.users, seed=args.seed)
        self.split = P.leave_one_out(self.ml.seqs)
        self.content = M.content_vectors(self.ml, args.data, dim=FM["model"].get("content_dim", 64), seed=args.seed)
        self.counts = np.bincount(self.split.train.values["title"], minlength=self.ml.n_titles)
        self.valid = self._valid_subset(self.split.valid)
        self.load_s = round(time.perf_counter() - t, 1)

    def _valid_subset(self, es: P.EvalSet) -> P.EvalSet:
        n = self.args.valid_users
        if not n or n >= len(es):
            return es
        keep = np.zeros(len(es), bool)
        keep[np.random.default_rng(self.args.seed + 7).choice(len(es), n, replace=False)] = True
        return es.subset(keep)

    def fit_cfg(self, spec: dict, budget: float, desc: str) -> P.FitConfig:
        return P.FitConfig(budget_s=budget, n_evals=self.args.n_evals, seed=self.args.seed, clock=self.args.clock,
                           desc=desc, **spec["fit"])

    def build_fm(self, model_over: dict | None = None, objective_over: dict | None = None,
                 exclude_titles: np.ndarray | None = None, counts: np.ndarray | None = None):
        torch.manual_seed(self.args.seed)
        mcfg = {**FM["model"], **(model_over or {})}
        cfg = ModelConfig(n_titles=self.ml.n_titles, **mcfg)
        model = FoundationModel(cfg)
        init_weights(model)
        if FM["init"].get("zero_fields"):
            with torch.no_grad():
                for emb in model.fields.values():
                    emb.weight.zero_()
        model.title.content.copy_(torch.from_numpy(self.content[:, : cfg.content_dim]))
        obj = P.FMObjective(model, self.counts if counts is None else counts, exclude_titles=exclude_titles,
                            **{**FM["objective"], **(objective_over or {})})
        return model, obj, P.fm_scores(model, obj.bias)

    def train_eval(self, name: str, trainee: torch.nn.Module, score, max_len: int, spec: dict, budget: float,
                   split: P.Split | None = None, valid: P.EvalSet | None = None) -> dict:
        sp = split or self.split
        va = valid if valid is not None else (self.valid if split is None else sp.valid)
        r = P.fit(trainee, sp.train, max_len, self.fit_cfg(spec, budget, name),
                  validate=lambda: P.evaluate(score, sp.seqs, va, max_len))
        t = time.perf_counter()
        test = P.evaluate(score, self.split.seqs, self.split.test, max_len)
        row = {k: round(test[k], 4) for k in METRICS}
        row.update(train_s=r.train_s, train_cpu_s=r.train_cpu_s, eval_s=round(r.eval_s + time.perf_counter() - t, 1),
                   steps=r.steps, epochs=r.epochs, valid_ndcg10=round(r.best.get("ndcg@10", float("nan")), 4),
                   best_step=r.best_step, users=test["users"],
                   valid_curve=[(h[1], round(h[3]["ndcg@10"], 4)) for h in r.history])
        return row

    def run_fm(self, name: str, budget: float, model_over: dict | None = None, objective_over: dict | None = None):
        model, obj, score = self.build_fm(model_over, objective_over)
        row = self.train_eval(name, obj, score, model.cfg.max_len, FM, budget)
        row["params"] = P.n_params(model) + (obj.bias.numel() if obj.bias is not None else 0)
        return row, model, score

    def run_sasrec(self, budget: float, model_over: dict | None = None, name: str = "sasrec") -> dict:
        torch.manual_seed(self.args.seed)
        model = SASRec(SASRecConfig(self.ml.n_titles, **{**SASREC["model"], **(model_over or {})}))
        model.set_popularity(self.counts)
        row = self.train_eval(name, model, model.scores, model.cfg.max_len, SASREC, budget)
        row["params"] = model.n_params()
        return row

    # --- cold start ---------------------------------------------------------------------------
    def cold_start(self, budget: float, warm_score=None) -> dict:
        """Hold ~5% of movies out of training entirely (their events removed from training and
        validation inputs, and from every softmax); afterwards their ID rows are zero, so they are
        scored through the content path only (their bias, if any, is set to the median). Report test
        users whose target is a held-out movie, full ranking as usual."""
        rng = np.random.default_rng(self.args.seed + 1)
        movies = np.arange(N_SPECIAL, self.ml.n_titles)
        held = rng.choice(movies, size=max(1, round(self.args.holdout_frac * len(movies))), replace=False)
        is_held = np.zeros(self.ml.n_titles, bool)
        is_held[held] = True
        seqs = self.ml.seqs
        keep = ~is_held[seqs.values["title"]]
        lens = np.add.reduceat(keep.astype(np.int64), seqs.offsets[:-1]) if len(keep) else np.zeros(0, np.int64)
        filtered = Sequences(seqs.profile_id, np.concatenate([[0], np.cumsum(lens)]).astype(np.int64),
                             {f: v[keep] for f, v in seqs.values.items()})
        sp = P.leave_one_out(filtered)
        counts = np.bincount(sp.train.values["title"], minlength=self.ml.n_titles)
        cold = self.split.test.subset(is_held[self.split.test.targets])
        out = {"held_out_movies": int(len(held)), "users": int(len(cold))}
        if warm_score is not None:
            out["fm_trained_on_them"] = _metrics(P.evaluate(warm_score, seqs, cold, FM["model"]["max_len"]))
        warm = self.split.test.subset(~is_held[self.split.test.targets])
        held_t, trained = torch.as_tensor(held), torch.as_tensor(~is_held)
        trained[:N_SPECIAL] = False

        def scored(score, max_len: int) -> dict:
            """Cold users' metrics, and what the variant costs the other users."""
            m, w = P.evaluate(score, seqs, cold, max_len), P.evaluate(score, seqs, warm, max_len)
            return {**_metrics(m), "warm_ndcg@10": round(w["ndcg@10"], 4), "warm_hr@10": round(w["hr@10"], 4)}

        variants = (("fm_content_only", {"use_content": True}),
                    ("fm_content_id_dropout", {"use_content": True, "id_dropout": self.args.cold_id_dropout}),
                    ("fm_no_content", {"use_content": False}))
        for key, over in variants:
            model, obj, score = self.build_fm(over, exclude_titles=is_held, counts=counts)
            r = P.fit(obj, sp.train, model.cfg.max_len, self.fit_cfg(FM, budget, f"cold {key}"),
                      validate=lambda: P.evaluate(score, sp.seqs, sp.valid, model.cfg.max_len))
            with torch.no_grad():
                model.title.id.weight[held_t] = 0.0
                if obj.bias is not None:
                    obj.bias[held_t] = obj.bias[trained].median()
            out[key] = {**scored(score, model.cfg.max_len), "train_s": r.train_s, **over}
            if over["use_content"]:                                        # same model, cold rows regressed from content
                regress_cold_titles(model, held_t, trained)
                out[key.replace("fm_content", "fm_regressed")] = {**scored(score, model.cfg.max_len), **over}
        return out


def _metrics(m: dict) -> dict:
    return {k: round(m[k], 4) for k in METRICS if k in m}


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()}-core CPU ({cpu}), {gpu}, torch {torch.__version__}"


def table(rows: dict[str, dict]) -> list[str]:
    lines = ["| model | params | HR@10 | NDCG@10 | HR@50 | NDCG@50 | valid NDCG@10 | train s (wall) | train s (CPU) | steps | epochs |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r.get('params', 0):,} | {r['hr@10']:.4f} | {r['ndcg@10']:.4f} | {r['hr@50']:.4f} | "
                     f"{r['ndcg@50']:.4f} | {r.get('valid_ndcg10', float('nan')):.4f} | {r.get('train_s', 0):.0f} | "
                     f"{r.get('train_cpu_s', 0):.0f} | {r.get('steps', 0)} | {r.get('epochs', 0):.2f} |")
    return lines


def plot_scaling(rows: dict[str, dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(rows)
    x = [rows[n]["params"] for n in names]
    fig, ax = plt.subplots(figsize=(6, 4))
    for k, style in (("ndcg@10", "o-"), ("hr@10", "s--")):
        ax.plot(x, [rows[n][k] for n in names], style, label=k.upper())
    for n, xi in zip(names, x):
        ax.annotate(n, (xi, rows[n]["ndcg@10"]), textcoords="offset points", xytext=(4, -12), fontsize=8)
    ax.set_xscale("log"), ax.set_xlabel("parameters"), ax.set_ylabel("test metric")
    ax.set_title("FM on ML-1M: quality vs size at a fixed training budget", fontsize=9)
    ax.grid(alpha=0.3), ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cold_start_lines(c: dict) -> list[str]:
    lines = [f"## Cold start ({c['held_out_movies']} movies held out of training; {c['users']} test users "
             "whose target is one of them; full ranking over all movies)", "",
             "| variant | HR@10 | NDCG@10 | HR@50 | NDCG@50 | hits@50 | other users' NDCG@10 |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    dropout = c.get("fm_content_id_dropout", {}).get("id_dropout")
    for k, label in (("fm_content_only", "FM, held-out movies scored by content only"),
                     ("fm_regressed_only", "same FM, held-out movies' vectors regressed from content on the trained ones"),
                     ("fm_content_id_dropout", f"FM trained with ID dropout {dropout}, held-out movies by content only"),
                     ("fm_regressed_id_dropout", f"FM trained with ID dropout {dropout}, held-out movies regressed from content"),
                     ("fm_no_content", "FM without content (held-out movies have no vector)"),
                     ("fm_trained_on_them", "reference: main FM, trained with these movies")):
        if k in c:
            warm = c[k].get("warm_ndcg@10")
            lines.append(f"| {label} | " + " | ".join(f"{c[k][m]:.4f}" for m in METRICS) +
                         f" | {round(c[k]['hr@50'] * c['users'])} | {'' if warm is None else f'{warm:.4f}'} |")
    return lines + [""]


def write_cold_start(res: dict, args: argparse.Namespace, out: Path) -> Path:
    """``--cold-start-only``: its own file, so the main quality table is not replaced by a partial run."""
    suffix = "_quick" if args.quick else ""
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# ML-1M cold start{' (quick smoke run — not a result)' if args.quick else ''}", "",
             f"- command: `{res['command']}`", f"- machine: {res['machine']}; torch threads {args.threads}; "
             f"load average at start / end: {res['loadavg_start']} / {res['loadavg_end']}",
             f"- wall time: {res['wall_s']:.0f} s; budget per model {args.ablation_budget_s:.0f} s ({args.clock} clock); "
             f"FM config as in quality.md (`{json.dumps(res['fm_config']['model'])}`)", "",
             *cold_start_lines(res["cold_start"])]
    path = out / f"cold_start{suffix}.md"
    path.write_text("\n".join(lines))
    (out / f"cold_start{suffix}.json").write_text(json.dumps(res, indent=1))
    return path


def write_report(res: dict, args: argparse.Namespace, out: Path) -> Path:
    suffix = "_quick" if args.quick else ""
    out.mkdir(parents=True, exist_ok=True)
    main_rows = {"FM (ours)": res["fm"]}
    if "sasrec" in res:
        main_rows["SASRec"] = res["sasrec"]
    if "popularity" in res:
        main_rows["most popular"] = res["popularity"]
    lines = [f"# ML-1M quality{' (quick smoke run: subsampled users, tiny budgets — not a result)' if args.quick else ''}",
             "", f"- command: `{res['command']}`",
             f"- machine: {res['machine']}; torch threads {args.threads}; load average at start / end: "
             f"{res['loadavg_start']} / {res['loadavg_end']}",
             f"- wall time of the whole run: {res['wall_s']:.0f} s; data: {res['users']} users, {res['titles']} movies ranked",
             f"- protocol: leave-one-out by time, full ranking, whole input history removed (fm/protocol.py); "
             f"budget per model {args.budget_s:.0f} s of training ({args.clock} clock, validation passes not counted), "
             f"checkpoint chosen on validation NDCG@10"
             + (f" over {args.valid_users} users" if args.valid_users else ""), "",
             *table(main_rows), ""]
    if "sasrec" in res:
        lines += [f"NDCG@10 ratio FM / SASRec: **{res['ratio_ndcg10']:.3f}** (goal ≥ 1.15). "
                  "Peer reference (RecBole SASRec, 25-min budget, same protocol): HR@10 0.2618 / NDCG@10 0.1498.", ""]
    lines += ["FM config: `" + json.dumps(res["fm_config"]) + "`", "",
              "SASRec config: `" + json.dumps(res["sasrec_config"]) + "`", ""]
    if "ablations" in res:
        lines += [f"## Ablations (budget {args.ablation_budget_s:.0f} s each)", "", *table(res["ablations"]), ""]
    if "cold_start" in res:
        lines += cold_start_lines(res["cold_start"])
    if "scaling" in res:
        lines += [f"## Scaling (budget {args.ablation_budget_s:.0f} s each)", "", *table(res["scaling"]), "",
                  f"![scaling](scaling{suffix}.png)", ""]
    path = out / f"quality{suffix}.md"
    path.write_text("\n".join(lines))
    (out / f"quality{suffix}.json").write_text(json.dumps(res, indent=1))
    return path


def main(argv=None) -> dict:
    args = parse_args(argv)
    apply_overrides(args.set)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    res = {"command": " ".join([".venv/bin/python", "bench/quality.py", *(argv if argv is not None else sys.argv[1:])]),
           "machine": machine(), "loadavg_start": [round(x, 2) for x in os.getloadavg()]}
    bench = Bench(args)
    ml, sp = bench.ml, bench.split
    res.update(users=len(ml.seqs), titles=ml.n_titles - N_SPECIAL, load_s=bench.load_s,
               fm_config=FM, sasrec_config=SASREC)
    print(f"loaded {len(ml.seqs)} users, {int(ml.seqs.lengths.sum())} ratings, {ml.n_titles - N_SPECIAL} movies "
          f"in {bench.load_s}s", file=sys.stderr)
    pop = P.evaluate(P.popularity_scores(sp.train, ml.n_titles), sp.seqs, sp.test, 200)
    res["popularity"] = {**_metrics(pop), "params": 0}

    plan = ["fm"] + ([] if args.skip_sasrec else ["sasrec"])
    if args.cold_start_only:
        plan = ["cold_start"]
    elif args.ablations:
        plan += ["no_content", "mtp1" if FM["model"]["mtp_k"] > 1 else "mtp2", "no_heads", "no_emb_norm",
                 "no_mask_history", "sasrec_recipe", "cold_start"]
    if args.scaling and not args.cold_start_only:
        plan += [f"scale_{n}" for n, _ in SCALING]
    outer = tqdm(plan, desc="bench", unit="run")
    fm_score = None
    for step in outer:
        outer.set_postfix_str(step)
        ab = args.ablation_budget_s
        if step == "fm":
            res["fm"], _, fm_score = bench.run_fm("fm", args.budget_s)
        elif step == "sasrec":
            res["sasrec"] = bench.run_sasrec(args.budget_s)
            res["ratio_ndcg10"] = round(res["fm"]["ndcg@10"] / max(res["sasrec"]["ndcg@10"], 1e-12), 3)
        elif step == "no_content":
            res.setdefault("ablations", {})["FM without content embeddings"] = bench.run_fm(step, ab, {"use_content": False})[0]
        elif step in ("mtp1", "mtp2"):
            k = 1 if step == "mtp1" else 2
            res.setdefault("ablations", {})[f"FM with mtp_k={k}"] = bench.run_fm(step, ab, {"mtp_k": k})[0]
        elif step == "no_heads":
            res.setdefault("ablations", {})["FM without action/duration/device heads"] = bench.run_fm(
                step, ab, {"w_action": 0.0, "w_duration": 0.0, "w_device": 0.0})[0]
        elif step == "no_emb_norm":
            res.setdefault("ablations", {})["FM without embedding LayerNorm"] = bench.run_fm(step, ab, {"emb_norm": False})[0]
        elif step == "no_mask_history":
            res.setdefault("ablations", {})["FM without history masking in the training softmax"] = bench.run_fm(
                step, ab, None, {"mask_history": False})[0]
        elif step == "sasrec_recipe":
            # control: the baseline trained with our model's objective (sampled softmax + title bias)
            obj = FM["objective"]
            res.setdefault("ablations", {})["SASRec trained with FM's objective (control)"] = bench.run_sasrec(
                ab, {k: obj[k] for k in ("n_negatives", "alpha", "title_bias", "mask_history") if k in obj}, step)
        elif step == "cold_start":
            res["cold_start"] = bench.cold_start(ab, fm_score)
        elif step.startswith("scale_"):
            name = step[len("scale_"):]
            over = dict(SCALING)[name]
            same_as_main = ab == args.budget_s and all(FM["model"].get(k) == v for k, v in over.items())
            res.setdefault("scaling", {})[f"{name} (d={over['d_model']}, {over['n_layers']} layers)"] = \
                res["fm"] if same_as_main else bench.run_fm(step, ab, over)[0]   # the main run is this size
        if args.ablations and step == "fm" and ab == args.budget_s:
            res.setdefault("ablations", {})["FM (main run)"] = res["fm"]
    outer.close()
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    res["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    out = Path(args.out)
    if "scaling" in res:
        plot_scaling(res["scaling"], out.mkdir(parents=True, exist_ok=True) or out / f"scaling{'_quick' if args.quick else ''}.png")
    path = write_cold_start(res, args, out) if args.cold_start_only else write_report(res, args, out)
    print(f"wrote {path}", file=sys.stderr)
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
