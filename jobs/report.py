"""The day's summary: rows per table, gate result, a read-back from Feast, a FAISS lookup, timings,
trends across the last two weeks (``jobs.report_trends``) and ``fmpipe status``.

Everything is read from what the steps wrote (their step records, the tables, the online store,
the index), so the report checks the publication rather than echoing the steps' own claims.
Writes ``reports/dt=D/summary.json``, a plain-text ``summary.txt`` and ``report.html`` (with plots).
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import pyarrow.parquet as pq

from jobs import report_trends
from jobs.tools import status
from jobs.core.io import atomic_write_json, atomic_write_text, partition
from jobs.core.settings import Paths, parse_date, run_cli


@dataclass(frozen=True)
class ReportConfig:
    date: str = ""


def _steps(paths: Paths, day) -> dict:
    out = {}
    for f in sorted((partition(paths.reports, day) / "steps").glob("*.json")):
        out[f.stem] = json.loads(f.read_text())
    return out


def _online_probe(paths: Paths, day) -> dict:
    """Read one active profile's vectors back through Feast's online API, as a ranker would."""
    from jobs.core.feast_store import get_store
    table = pq.read_table(partition(paths.profile_embeddings, day), columns=["profile_id"])
    pid = int(table["profile_id"][0].as_py())
    store = get_store(paths)
    fv = store.get_feature_view("profile_embeddings")
    names = [f"profile_embeddings:{f.name}" for f in fv.features]
    got = store.get_online_features(features=names, entity_rows=[{"profile_id": pid}]).to_dict()
    vectors = {k: v[0] for k, v in got.items() if isinstance(v[0], list)}
    return {"profile_id": pid, "model_version": got.get("model_version", [None])[0],
            "dims": {k: (len(v) if v is not None else None) for k, v in vectors.items()},
            "head": {k: [round(x, 4) for x in v[:4]] for k, v in vectors.items() if v is not None}}


def _index_probe(paths: Paths) -> dict:
    from jobs.index import TitleIndex
    ix = TitleIndex.current(paths)
    probe = ix.title_ids[len(ix.title_ids) // 3]
    return {"title_id": probe, "index_type": ix.meta["type"], "recall_at_10": ix.meta["recall_at_10"],
            "nearest": [(t, round(s, 4)) for t, s in ix.similar_titles(probe, 10)]}


def run(cfg: ReportConfig, paths: Paths) -> dict:
    day = parse_date(cfg.date)
    steps = _steps(paths, day)
    tok = steps.get("tokenize", {})
    rows = {
        "raw_events": tok.get("raw_events"), "tokens": tok.get("tokens"), "quarantined": tok.get("quarantined"),
        "profile_embeddings": pq.read_metadata(next(partition(paths.profile_embeddings, day).glob("*.parquet"))).num_rows,
        "title_embeddings": pq.read_metadata(next(partition(paths.title_embeddings, day).glob("*.parquet"))).num_rows,
    }
    gate = json.loads((partition(paths.gx / "results", day) / "summary.json").read_text())
    out = {"date": day.isoformat(), "rows": rows, "quarantine_reasons": tok.get("quarantine_reasons", {}),
           "validation": {"success": gate["success"], "data_docs": gate.get("data_docs"),
                          "suites": {s["suite"]: s["statistics"] for s in gate["suites"]}},
           "online_probe": _online_probe(paths, day), "index_probe": _index_probe(paths),
           "wall_s": {k: v.get("wall_s") for k, v in steps.items()},
           "trends": report_trends.trends(paths, day), "status": status.run(status.StatusConfig(), paths)}
    from jobs.report_html import render as render_html
    out["html"] = str(render_html(paths, day, out))
    atomic_write_json(out, partition(paths.reports, day) / "summary.json")
    text = render(out)
    atomic_write_text(text, partition(paths.reports, day) / "summary.txt")
    print(text)
    return {"summary": str(partition(paths.reports, day) / "summary.json"), "html": out["html"]}


def render(s: dict) -> str:
    lines = [f"== fm_embeddings_daily {s['date']} =="]
    lines += [f"rows        {k:<20} {v}" for k, v in s["rows"].items()]
    lines += [f"quarantine  {k:<20} {v}" for k, v in s["quarantine_reasons"].items()]
    v = s["validation"]
    lines.append(f"validation  {'PASSED' if v['success'] else 'FAILED'}  docs: {v['data_docs']}")
    p = s["online_probe"]
    lines.append(f"feast       profile {p['profile_id']} ({p['model_version']}): dims {p['dims']}")
    for k, head in p["head"].items():
        lines.append(f"            {k}[:4] = {head}")
    ix = s["index_probe"]
    lines.append(f"faiss       {ix['index_type']} recall@10={ix['recall_at_10']}; 10 nearest of {ix['title_id']}:")
    lines.append("            " + ", ".join(f"{t} ({sc:.3f})" for t, sc in ix["nearest"]))
    lines += [f"wall_s      {k:<20} {w}" for k, w in s["wall_s"].items()]
    q = s["trends"][-1]["retrieval"] if s.get("trends") else None
    if q:
        lines.append(f"quality     NDCG@10 {q['ndcg@10']} / HR@10 {q['hr@10']} of today's first target events under "
                     f"the {q['publication_date']} publication ({q['profiles']} profiles)")
    lines += [f"stale       {x}" for x in s.get("status", {}).get("stale", [])]
    lines.append(f"report      {s.get('html')}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    return run_cli(ReportConfig, run, __doc__, argv, lambda out: out["summary"])
