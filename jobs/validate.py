"""The quality gate: Great Expectations suites over the day's embedding tables.

Suites are declared as JSON in ``expectations/`` (table-level expectations plus a template applied
to every vector column); run-time values such as the expected row count and the vector width are
passed as suite parameters. Array columns are checked through derived scalar columns (length,
L2 norm, count of NaN/Inf), because GE's length expectations do not apply to arrays.

Results (JSON) go to ``gx/results/dt=D/`` and Data Docs to the GE file context under ``gx/``.
A failed suite raises :class:`GateFailed` naming each failed expectation, the observed value and
the threshold, so the DAG stops before publishing.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from jobs.io import atomic_write_json, partition
from jobs.settings import REPO_ROOT, Paths, parse_date, run_cli

SUITES_DIR = REPO_ROOT / "expectations"


class GateFailed(RuntimeError):
    """The day's tables did not pass validation; nothing may be published."""


@dataclass(frozen=True)
class ValidateConfig:
    date: str = ""
    build_docs: bool = True


def vector_columns(table: pa.Table) -> list[str]:
    return [f.name for f in table.schema if pa.types.is_list(f.type) and pa.types.is_floating(f.type.value_type)]


def with_vector_stats(table: pa.Table) -> pd.DataFrame:
    """Scalar columns per vector column: ``__dim`` (null if the vector is null), ``__norm``, ``__nonfinite``."""
    cols = {n: table[n] for n in table.column_names if n not in vector_columns(table)}
    for name in vector_columns(table):
        arr = table[name].combine_chunks()
        dim = pc.list_value_length(arr)
        flat = arr.flatten().to_numpy(zero_copy_only=False).astype(np.float64)
        owner = np.repeat(np.arange(len(arr)), dim.fill_null(0).to_numpy())
        sq = np.bincount(owner, weights=np.nan_to_num(flat, nan=0.0, posinf=0.0, neginf=0.0) ** 2, minlength=len(arr))
        bad = np.bincount(owner, weights=(~np.isfinite(flat)).astype(float), minlength=len(arr))
        cols[f"{name}__dim"] = dim
        cols[f"{name}__norm"] = pa.array(np.sqrt(sq))
        cols[f"{name}__nonfinite"] = pa.array(bad.astype(np.int64))
    return pa.table(cols).to_pandas()


def load_suite_spec(name: str, vector_cols: list[str]):
    """Expand a JSON suite spec into a GE ExpectationSuite."""
    import great_expectations as gx
    from great_expectations.expectations.expectation_configuration import ExpectationConfiguration

    spec = json.loads((SUITES_DIR / f"{name}.json").read_text())
    configs = list(spec["table"])
    for col in vector_cols:
        for tmpl in spec["per_vector_column"]:
            kwargs = json.loads(json.dumps(tmpl["kwargs"]).replace("{col}", col))
            configs.append({"type": tmpl["type"], "kwargs": kwargs})
    expectations = [ExpectationConfiguration(type=c["type"], kwargs=c["kwargs"]).to_domain_obj() for c in configs]
    return gx.ExpectationSuite(name=spec["name"], expectations=expectations)


def _context(paths: Paths):
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    paths.gx.mkdir(parents=True, exist_ok=True)
    return gx.get_context(mode="file", project_root_dir=str(paths.gx))


def run_suite(paths: Paths, suite_name: str, df: pd.DataFrame, vector_cols: list[str], params: dict, build_docs: bool = True) -> dict:
    """Validate one DataFrame with one suite through a Checkpoint; return a compact summary."""
    import great_expectations as gx
    from great_expectations.checkpoint import UpdateDataDocsAction

    ctx = _context(paths)
    ds = ctx.data_sources.add_or_update_pandas(name="fmpipe")
    asset = ds.add_dataframe_asset(name=suite_name)
    batch_def = asset.add_batch_definition_whole_dataframe("whole_table")
    suite = ctx.suites.add_or_update(load_suite_spec(suite_name, vector_cols))
    vd = ctx.validation_definitions.add_or_update(gx.ValidationDefinition(name=suite_name, data=batch_def, suite=suite))
    actions = [UpdateDataDocsAction(name="data_docs")] if build_docs else []
    cp = ctx.checkpoints.add_or_update(gx.Checkpoint(name=f"{suite_name}_gate", validation_definitions=[vd],
                                                     actions=actions, result_format="SUMMARY"))
    result = cp.run(batch_parameters={"dataframe": df}, expectation_parameters=params)
    vr = next(iter(result.run_results.values()))
    return {"suite": suite_name, "success": bool(result.success), "params": params,
            "statistics": dict(vr.statistics), "failures": _failures(vr), "result": vr.to_json_dict()}


def _failures(vr) -> list[dict]:
    out = []
    for r in vr.results:
        if r.success:
            continue
        cfg = r.expectation_config
        kw = {k: v for k, v in cfg.kwargs.items() if k not in ("batch_id",)}
        res = r.result or {}
        observed = res.get("observed_value", res.get("unexpected_count"))
        out.append({"expectation": cfg.type, "column": kw.pop("column", None), "observed": observed,
                    "threshold": kw, "unexpected_examples": (res.get("partial_unexpected_list") or [])[:5],
                    "exception": (r.exception_info or {}).get("exception_message")})
    return out


def expected_counts(paths: Paths, day) -> dict[str, int]:
    hist = pq.read_table(partition(paths.history, day), columns=["last_dt"])
    active = int(pc.sum(pc.equal(hist["last_dt"], pa.scalar(day, pa.date32()))).as_py() or 0)
    vocab = pq.read_metadata(paths.title_vocab).num_rows
    return {"profile_embeddings": active, "title_embeddings": vocab}


def run(cfg: ValidateConfig, paths: Paths) -> dict:
    day = parse_date(cfg.date)
    expected = expected_counts(paths, day)
    summaries = []
    for suite, root in (("profile_embeddings", paths.profile_embeddings), ("title_embeddings", paths.title_embeddings)):
        part = partition(root, day)
        if not part.exists():
            raise FileNotFoundError(f"{suite}: partition {part} missing (run embed for {day} first)")
        table = pq.read_table(part)
        manifest = json.loads((part / "_manifest.json").read_text())
        vcols = vector_columns(table)
        s = run_suite(paths, suite, with_vector_stats(table), vcols,
                      {"expected_rows": expected[suite], "dim": manifest["dim"]}, cfg.build_docs)
        atomic_write_json(s, partition(paths.gx / "results", day) / f"{suite}.json")
        summaries.append({k: v for k, v in s.items() if k != "result"})
    docs = paths.gx / "gx" / "uncommitted" / "data_docs" / "local_site" / "index.html"
    out = {"date": day.isoformat(), "success": all(s["success"] for s in summaries), "suites": summaries,
           "data_docs": str(docs) if docs.exists() else None}
    atomic_write_json(out, partition(paths.gx / "results", day) / "summary.json")
    if not out["success"]:
        raise GateFailed(describe_failures(summaries))
    return out


def describe_failures(summaries: list[dict]) -> str:
    lines = ["validation failed; nothing will be published:"]
    for s in summaries:
        for f in s["failures"]:
            lines.append(f"  [{s['suite']}] {f['expectation']} on {f['column'] or 'table'}: observed "
                         f"{f['observed']!r}, expected {f['threshold']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    return run_cli(ValidateConfig, run, __doc__, argv, lambda out: {k: v for k, v in out.items() if k != "suites"})
