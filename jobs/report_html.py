"""The daily HTML report: one self-contained page (plots inlined as PNG) per date.

Status (what serves, which model, what is stale), step timings, row and quarantine counts, the
gate's summary, L2-norm histograms per layer, drift of stable profiles against earlier
publications, trends over two weeks (volume, quarantine, events per token, next-day retrieval
quality; ``jobs.report_trends``), and the index's recall — what an on-call data
engineer looks at first. Plots are matplotlib (Agg backend, no display needed).
"""
from __future__ import annotations

import base64
import datetime as dt
import html
import io
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from jobs import report_trends
from jobs.core.io import atomic_write_text, partition, partition_dates
from jobs.core.settings import Paths

MAX_PROFILES = 20_000          # drift and histograms sample this many profiles per day


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90)
    import matplotlib.pyplot as plt
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _vectors(paths: Paths, day: dt.date) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    table = pq.read_table(partition(paths.profile_embeddings, day))
    table = table.slice(0, MAX_PROFILES)
    cols = [f.name for f in table.schema if f.name.startswith("emb_")]
    return (table["profile_id"].to_numpy(),
            {c: np.stack(table[c].to_numpy(zero_copy_only=False)).astype(np.float32) for c in cols})


def drift_series(paths: Paths, day: dt.date, max_days: int = 14) -> dict[str, list[tuple[str, float, int]]]:
    """Per layer: (date, mean cosine vs the previous published date, stable profiles) for recent days."""
    days = partition_dates(paths.profile_embeddings, day)[-(max_days + 1):]
    out: dict[str, list] = {}
    prev = None
    for d in days:
        ids, vecs = _vectors(paths, d)
        if prev is not None:
            common, a, b = np.intersect1d(prev[0], ids, return_indices=True)
            for col, v in vecs.items():
                if col in prev[1] and len(common):
                    x, y = prev[1][col][a], v[b]
                    cos = (x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1) + 1e-12)
                    out.setdefault(col, []).append((d.isoformat(), float(cos.mean()), int(len(common))))
        prev = (ids, vecs)
    return out


def _plots(paths: Paths, day: dt.date, summary: dict) -> dict[str, str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    imgs = {}
    fig, ax = plt.subplots(figsize=(6, 2.6))
    steps = {k: v for k, v in summary["wall_s"].items() if v is not None}
    ax.barh(list(steps), list(steps.values()), color="#4c72b0")
    ax.set_xlabel("seconds"), ax.set_title("wall time per step")
    imgs["timings"] = _png(fig)

    _, vecs = _vectors(paths, day)
    fig, axes = plt.subplots(1, len(vecs), figsize=(3.2 * len(vecs), 2.6), squeeze=False)
    for ax, (col, v) in zip(axes[0], vecs.items()):
        ax.hist(np.linalg.norm(v, axis=1), bins=40, color="#55a868")
        ax.set_title(col, fontsize=9), ax.set_xlabel("L2 norm")
    imgs["norms"] = _png(fig)

    drift = drift_series(paths, day)
    fig, ax = plt.subplots(figsize=(6, 2.6))
    for col, series in drift.items():
        ax.plot([s[0] for s in series], [s[1] for s in series], marker="o", label=col)
    ax.set_ylim(-1.05, 1.05), ax.set_ylabel("mean cosine vs previous day"), ax.set_title("drift of stable profiles")
    if drift:
        ax.legend(fontsize=7), ax.tick_params(axis="x", labelrotation=45, labelsize=7)
    else:
        ax.text(0.5, 0.5, "first publication: no earlier day to compare", ha="center", transform=ax.transAxes)
    imgs["drift"] = _png(fig)
    summary["drift"] = drift
    imgs["trends"] = _png(report_trends.plot(summary.get("trends") or [], drift))
    return imgs


def _table(rows: dict, id_: str) -> str:
    body = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows.items())
    return f'<table id="{id_}">{body}</table>'


def _trends_table(rows: list[dict]) -> str:
    head = "<tr><th>date</th><th>events</th><th>quarantine</th><th>events/token</th><th>active</th><th>gate</th>" \
           "<th>next-day NDCG@10</th><th>HR@10</th></tr>"
    cell = lambda v: "-" if v is None else html.escape(str(v))  # noqa: E731
    body = "".join(
        f"<tr><td>{r['date']}</td><td>{cell(r['events'])}</td><td>{cell(r['quarantine_rate'])}</td>"
        f"<td>{cell(r['events_per_token'])}</td><td>{cell(r['profiles_active'])}</td>"
        f"<td>{'-' if r['gate'] is None else ('passed' if r['gate'] else 'FAILED')}</td>"
        f"<td>{cell((r['retrieval'] or {}).get('ndcg@10'))}</td><td>{cell((r['retrieval'] or {}).get('hr@10'))}</td></tr>"
        for r in rows)
    return f'<table id="trends">{head}{body}</table>'


def _status_table(st: dict) -> str:
    s, m = st.get("serving"), st.get("model")
    rows = {"serving": f"{s['date']} ({s['publication']}, model {s['model_version']}, {s['action']} at {s['committed_at']})"
            if s else "nothing published", "model": f"{m['version']} trained through {m['trained_through']} "
            f"(validation NDCG@10 {m['valid_ndcg@10']})" if m else "none",
            "stale": "; ".join(st.get("stale") or []) or "nothing stale"}
    return _table(rows, "status")


def render(paths: Paths, day: dt.date, summary: dict) -> Path:
    imgs = _plots(paths, day, summary)
    v, ix = summary["validation"], summary["index_probe"]
    gate = "PASSED" if v["success"] else "FAILED"
    suites = {name: f"{s.get('successful_expectations')}/{s.get('evaluated_expectations')} expectations passed"
              for name, s in v["suites"].items()}
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>fm_embeddings_daily {day}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:60em}} table{{border-collapse:collapse;margin:.5em 0}}
th,td{{border:1px solid #ccc;padding:2px 8px;text-align:left}} .ok{{color:#2a7}} .bad{{color:#c33}}</style></head>
<body><h1>fm_embeddings_daily — {day}</h1>
<p id="gate" class="{'ok' if v['success'] else 'bad'}">Gate {gate}; model {html.escape(str(summary['online_probe']['model_version']))}</p>
<h2>Status</h2>{_status_table(summary.get('status') or {})}
<h2>Rows</h2>{_table(summary['rows'], 'rows')}
<h2>Quarantine</h2>{_table(summary['quarantine_reasons'] or {'(none)': 0}, 'quarantine')}
<h2>Validation</h2>{_table(suites, 'validation')}
<h2>Index</h2>{_table({'type': ix['index_type'], 'recall@10': ix['recall_at_10'], 'probe': ix['title_id'],
                        'nearest': ', '.join(t for t, _ in ix['nearest'])}, 'index')}
<h2>Step timings</h2><img alt="wall time per step" src="data:image/png;base64,{imgs['timings']}">
<h2>Embedding norms per layer</h2><img alt="norm histograms" src="data:image/png;base64,{imgs['norms']}">
<h2>Drift</h2><img alt="drift over time" src="data:image/png;base64,{imgs['drift']}">
<h2>Trends</h2><img alt="trends over days" src="data:image/png;base64,{imgs['trends']}">
{_trends_table(summary.get('trends') or [])}
</body></html>"""
    out = partition(paths.reports, day) / "report.html"
    atomic_write_text(page, out)
    return out
