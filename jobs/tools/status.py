"""``fmpipe status [runs=7] [--json]``: what is serving, from which model, and what the last runs did.

One place instead of files under ``var/``: the serving publication (date, model, when committed,
what it replaced), the current model (trained on which day, its validation figure), the last
``runs`` dates with each step's wall time, the gate verdict and the quarantine rate, and what is
stale: raw days not yet tokenized, tokenized days not yet served, a model older than
``stale_model_days``. Read-only: it takes no lock and never writes.
"""
from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path

from jobs.core import publication as pubs
from jobs.core.io import partition_dates
from jobs.core.settings import Paths, run_cli

STEPS = ("tokenize", "embed", "validate", "publish", "index", "report")


@dataclass
class StatusConfig:
    runs: int = 7                     # how many recent dates to list
    stale_model_days: int = 31        # a serving model older than this is reported stale
    json: bool = False                # machine-readable output (--json)


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def model_status(paths: Paths) -> dict | None:
    pointer = read_json(paths.models / "CURRENT.json")
    if not pointer:
        return None
    meta = read_json(paths.models / pointer["version"] / "config.json") or {}
    trained = (meta.get("data_range") or {}).get("history_state")
    best = (meta.get("metrics") or {}).get("best") or {}
    return {"version": pointer["version"], "trained_through": trained, "parent": meta.get("parent"),
            "valid_ndcg@10": best.get("ndcg@10"), "promoted_at": pointer.get("promoted_at")}


def run_status(paths: Paths, day: dt.date) -> dict:
    """One date: each step's wall time and status, the gate verdict, the quarantine rate."""
    steps_dir = paths.reports / f"dt={day.isoformat()}" / "steps"
    steps = {s: read_json(steps_dir / f"{s}.json") for s in STEPS}
    tok = steps.get("tokenize") or {}
    raw = tok.get("raw_events") or 0
    gate = read_json(paths.gx / "results" / f"dt={day.isoformat()}" / "summary.json")
    return {"date": day.isoformat(),
            "steps": {s: (round(r["wall_s"], 1) if r and "wall_s" in r else None) for s, r in steps.items()},
            "gate": None if gate is None else ("passed" if gate.get("success") else "FAILED"),
            "quarantine_rate": round(tok.get("quarantined", 0) / raw, 4) if raw else None,
            "events": raw or None}


def stale(paths: Paths, serving: dict | None, model: dict | None, max_model_days: int) -> list[str]:
    raw, hist = partition_dates(paths.raw), partition_dates(paths.history)
    out = []
    if raw and (not hist or hist[-1] < raw[-1]):
        out.append(f"raw data up to {raw[-1]} but history only up to {hist[-1] if hist else 'nothing'}: "
                   f"run `fmpipe backfill --start {(hist[-1] + dt.timedelta(days=1)) if hist else raw[0]} --end {raw[-1]}`")
    if hist and (serving is None or dt.date.fromisoformat(serving["date"]) < hist[-1]):
        out.append(f"history up to {hist[-1]} but serving {serving['date'] if serving else 'nothing'}")
    if model and model.get("trained_through") and hist:
        age = (hist[-1] - dt.date.fromisoformat(str(model["trained_through"])[:10])).days
        if age > max_model_days:
            out.append(f"the serving model was trained through {model['trained_through']}, {age} days before the "
                       f"latest data (> {max_model_days}): run the pretrain or fine-tune DAG")
    return out


def run(cfg: StatusConfig, paths: Paths) -> dict:
    serving = pubs.current(paths)
    model = model_status(paths)
    dates = sorted(set(partition_dates(paths.reports)) | set(partition_dates(paths.gx / "results")), reverse=True)[: cfg.runs]
    return {"home": str(paths.home), "serving": serving and {k: serving.get(k) for k in
                                                              ("date", "publication", "model_version", "committed_at",
                                                               "action", "previous")},
            "model": model, "runs": [run_status(paths, d) for d in dates],
            "stale": stale(paths, serving, model, cfg.stale_model_days)}


def render(out: dict) -> str:
    s, m = out["serving"], out["model"]
    lines = [f"home      {out['home']}",
             f"serving   {s['date']} ({s['publication']}, model {s['model_version']}, {s['action']} at "
             f"{s['committed_at']})" if s else "serving   nothing published yet",
             f"model     {m['version']} trained through {m['trained_through']} (validation NDCG@10 "
             f"{m['valid_ndcg@10']})" if m else "model     none"]
    lines += ["", f"{'date':<12}{'gate':<8}{'quarantine':>11}  " + "  ".join(f"{x:>9}" for x in STEPS)]
    for r in out["runs"]:
        q = f"{r['quarantine_rate']:.2%}" if r["quarantine_rate"] is not None else "-"
        cells = "  ".join(f"{(str(v) + ' s') if v is not None else '-':>9}" for v in r["steps"].values())
        lines.append(f"{r['date']:<12}{r['gate'] or '-':<8}{q:>11}  {cells}")
    lines += [""] + ([f"stale: {x}" for x in out["stale"]] or ["nothing stale"])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    import sys
    as_json = any(a in ("--json", "json=true") for a in (argv if argv is not None else sys.argv[1:]))
    return run_cli(StatusConfig, run, __doc__, argv, lambda out: json.dumps(out, indent=2, default=str)
                   if as_json else render(out))
