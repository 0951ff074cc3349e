"""The quality report: merge every part file of ``bench/quality.py`` into means and spreads over
seeds, the issue's summary keys (the SASRec variant per dataset chosen by validation, never test)
and the Markdown / JSON results files.

Kept apart from :mod:`bench.quality` (which runs parts through the product's code) because merging
trains nothing: ``bench/quality.py --merge`` re-reads what the parts wrote.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

METRICS = ("hr@10", "ndcg@10", "hr@50", "ndcg@50")
# the Taobao head variants (name -> recipe overrides); bench.quality trains them, the report reads them back
TAOBAO_VARIANTS = {"defaults": {}, "no side heads": {"w_action": 0.0, "w_duration": 0.0, "w_device": 0.0},
                   "heads not detached": {"detach_heads": False}}


def _budget(rec: dict) -> str:
    """The budget a part ran under, e.g. '1800 s cpu' (older records: read off the command)."""
    if "budget_s" in rec:
        b = rec["budget_s"]
    else:
        words = rec["command"].split()
        b = float(words[words.index("--budget-s") + 1]) if "--budget-s" in words else float("nan")
    if rec["part"] == "popularity":
        return "none"
    if rec["part"].split(":")[0] == "sasrec_converged":
        cap = rec.get("converged_cap_s", float("inf"))
        return "none (early stopping)" if not math.isfinite(cap) else f"early stopping, cap {cap:.0f} s {rec.get('clock', 'cpu')}"
    return f"{b:.0f} s {rec.get('clock', 'cpu')}"


def stats(rows: list[dict], key: str) -> tuple[float, float]:
    vals = [r[key] for r in rows if r.get(key) is not None]
    if not vals:
        return float("nan"), float("nan")
    return float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0


def best_variant(valid: dict[str, dict[int, float]], base: str) -> str:
    """``base`` or its ``base:KEY=X`` variant (dropout, ema, weight_decay) with the best mean validation
    NDCG@10 (test unread). ``valid``: part -> seed -> validation NDCG@10, unrounded (two variants may
    agree to four places). The mean is over the seeds every variant ran, so a variant run on more
    seeds is not judged on seeds the others lack (over all of each one's seeds if they share none)."""
    names = [p for p in valid if (p == base or p.startswith(base + ":")) and valid[p]]
    if not names:
        return base
    common = set.intersection(*(set(valid[p]) for p in names))
    return max(names, key=lambda p: float(np.mean([v for k, v in valid[p].items() if not common or k in common])))


def merge(args) -> dict:
    """Every part file -> per part: mean/sd of the metrics over seeds; the issue's summary keys."""
    folder = Path(args.out) / f"quality{'_quick' if args.quick else ''}"
    parts: dict[str, list[dict]] = {}
    for f in sorted(folder.glob("*.json")):
        rec = json.loads(f.read_text())
        parts.setdefault(rec["part"], []).append(rec)
    from bench import cold_start
    cold = cold_start.report(parts.pop("cold_start", []), Path(args.out), args.quick)
    cold_beauty = cold_start.report(parts.pop("beauty_cold_start", []), Path(args.out), args.quick, dataset="beauty")
    summary = {}
    valid = {part: {r["seed"]: r["result"]["valid_ndcg@10"] for r in recs if r["result"].get("valid_ndcg@10") is not None}
             for part, recs in parts.items()}
    for part, recs in parts.items():
        rows = [r["result"] for r in recs]
        s = {"seeds": len(rows), "budget": ", ".join(sorted({_budget(r) for r in recs}))}
        for k in (*METRICS, "valid_ndcg@10", "train_s", "train_cpu_s", "epochs"):
            mean, sd = stats(rows, k)
            if not math.isnan(mean):
                s[k], s[f"{k}_sd"] = round(mean, 4), round(sd, 4)
        summary[part] = s
    res = {"parts": summary, **({"cold_start": cold} if cold else {}),
           **({"cold_start_beauty": cold_beauty} if cold_beauty else {})}
    pick = lambda p: {k: summary[p][k] for k in summary[p] if k.startswith(("ndcg@10", "hr@10", "seeds", "train"))} \
        if p in summary else None  # noqa: E731
    res["product"], res["sasrec"], res["sasrec_converged"] = pick("product"), pick(best_variant(valid, "sasrec")), \
        pick(best_variant(valid, "sasrec_converged"))
    res["beauty"] = {"fm": pick("beauty_fm"), "sasrec": pick(best_variant(valid, "beauty_sasrec"))}
    res["sasrec_variants_chosen"] = {b: best_variant(valid, b) for b in ("sasrec", "sasrec_converged", "beauty_sasrec")}
    if res["product"] and res["sasrec_converged"]:
        res["ratio_vs_converged_sasrec"] = round(res["product"]["ndcg@10"] / res["sasrec_converged"]["ndcg@10"], 3)
    if res["product"] and res["sasrec"]:
        res["ratio_vs_sasrec"] = round(res["product"]["ndcg@10"] / res["sasrec"]["ndcg@10"], 3)
    if res["beauty"]["fm"] and res["beauty"]["sasrec"]:
        res["beauty"]["ratio"] = round(res["beauty"]["fm"]["ndcg@10"] / res["beauty"]["sasrec"]["ndcg@10"], 3)
    write_report(res, parts, args)
    return res


def taobao_lines(recs: list[dict]) -> list[str]:
    """The heads on Taobao: next-title quality per variant, and the action head's accuracy and AUC
    (purchase = ``complete``, cart = ``add_to_list``) vs the majority class and the per-user counts."""
    if not recs:
        return []
    lines = ["## Taobao-815: multi-task heads", "",
             "| variant (seed) | NDCG@10 | HR@10 | action acc. | majority | count acc. | action AUC (macro) | "
             "count AUC (macro) | buy AUC | count buy AUC | train s (CPU) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    nan = float("nan")
    for rec in recs:
        v = rec["result"]["variants"]
        base = v["action_count_baseline"]
        base = base if isinstance(base, dict) else {"accuracy": base}          # runs before the AUCs
        for name in TAOBAO_VARIANTS:
            h = (v[name].get("heads") or {}).get("action", {})
            lines.append(f"| {name} ({rec['seed']}) | {v[name]['ndcg@10']:.4f} | {v[name]['hr@10']:.4f} | "
                         f"{h.get('accuracy', nan):.4f} | {h.get('majority', nan):.4f} | {base['accuracy']:.4f} | "
                         f"{h.get('macro_auc') or nan:.4f} | {base.get('macro_auc') or nan:.4f} | "
                         f"{h.get('auc', {}).get('complete', nan):.4f} | {base.get('auc', {}).get('complete', nan):.4f} | "
                         f"{v[name]['train_cpu_s']:.0f} |")
    return lines + ["", "At each user's last event (the test position). AUC: one action vs the rest, by the head's "
                    "probability (count: by the action's share of the user's earlier events); 0.5 = no signal. "
                    "With the heads off the action head is untrained, so its figures are a floor.", ""]


def write_report(res: dict, parts: dict[str, list[dict]], args) -> Path:
    out = Path(args.out)
    suffix = "_quick" if args.quick else ""
    lines = [f"# Quality: the product's training path vs SASRec{' (quick smoke run — not a result)' if args.quick else ''}", "",
             "Protocol: leave-one-out by time, full ranking over every title of the data, whole input history "
             "removed (`fm/protocol.py`, the code `fmpipe evaluate` runs). Checkpoints chosen on validation "
             "(second-last event), test reported once. Mean ± sd over seeds.", "",
             "| part | seeds | budget | HR@10 | NDCG@10 | HR@50 | NDCG@50 | train s (CPU) | train s (wall) | epochs | stopped by |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for part, s in res["parts"].items():
        f = lambda k: (f"{s[k]:.4f} ± {s[k + '_sd']:.4f}" if s["seeds"] > 1 else f"{s[k]:.4f}") if k in s else ""  # noqa: E731
        g = lambda k: f"{s[k]:.0f}" if k in s else ""  # noqa: E731
        stops = ", ".join(sorted({r["result"].get("stopped_by") or "" for r in parts[part]} - {""}))
        lines.append(f"| {part} | {s['seeds']} | {s['budget']} | {f('hr@10')} | {f('ndcg@10')} | {f('hr@50')} | {f('ndcg@50')} | "
                     f"{g('train_cpu_s')} | {g('train_s')} | {s.get('epochs', float('nan')):.1f} | {stops} |")
    lines += ["", "Ratios (NDCG@10): " + ", ".join(f"{k} **{v}**" for k, v in res.items() if k.startswith("ratio")) +
              (f", Beauty FM / SASRec **{res['beauty'].get('ratio')}**" if res["beauty"].get("ratio") else ""), "",
              "References (data README, same protocol): RecBole SASRec on this ML-1M slice NDCG@10 0.1498 "
              "(25-min budget); on Beauty 0.0455 (15-min budget, not converged).", ""]
    lines += taobao_lines(parts.get("taobao", []))
    lines += ["## Runs", ""]
    for part, recs in parts.items():
        for r in recs:
            lines.append(f"- `{part}` seed {r['seed']}: commit `{r['commit']}`, `{r['command']}`, {r['machine']}, "
                         f"load {r['loadavg_start']} → {r['loadavg_end']}, wall {r['wall_s']:.0f} s")
    path = out / f"quality{suffix}.md"
    path.write_text("\n".join(lines) + "\n")
    (out / f"quality{suffix}.json").write_text(json.dumps({"summary": res, "runs": parts}, indent=1, default=str))
    return path
