"""Great Expectations machinery of the gate: the JSON suite specs in ``expectations/`` expanded into
GE suites, their thresholds with the job's overrides, one suite run through a file-context
Checkpoint, and failures turned into one line each for people.

Kept apart from :mod:`jobs.validate` (which decides what is checked against what: the reference
publication, derived columns, run-time parameters) so that module reads as the gate's rules.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from jobs.core.settings import REPO_ROOT, Paths

SUITES_DIR = REPO_ROOT / "expectations"
LONG_LIST = 10            # lists longer than this are summarised in failure messages

@dataclass
class Check:
    """One suite run: the table as a DataFrame, template expansions, parameters, and context for people."""
    suite: str
    df: pd.DataFrame
    expansions: dict[str, list[str]]
    params: dict
    context: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------
# Suite specs and thresholds
# ------------------------------------------------------------------------------------------------
def read_spec(name: str) -> dict:
    return json.loads((SUITES_DIR / f"{name}.json").read_text())


def expectation_configs(spec: dict, expansions: dict[str, list[str]]) -> list[dict]:
    """``table`` as is, plus every ``per_*`` template section repeated for each of its columns.

    A template section with no entry in ``expansions`` expands to nothing: that is how the static
    or the reference-based norm checks are chosen per column."""
    configs = [dict(c) for c in spec["table"]]
    for section, columns in expansions.items():
        for col in columns:
            for tmpl in spec.get(section, []):
                kwargs = json.loads(json.dumps(tmpl["kwargs"]).replace("{col}", col))
                configs.append({"type": tmpl["type"], "kwargs": kwargs})
    return configs


def load_suite_spec(name: str, expansions: dict[str, list[str]]):
    """Expand a JSON suite spec into a GE ExpectationSuite."""
    import great_expectations as gx
    from great_expectations.expectations.expectation_configuration import ExpectationConfiguration

    spec = read_spec(name)
    expectations = [ExpectationConfiguration(type=c["type"], kwargs=c["kwargs"]).to_domain_obj()
                    for c in expectation_configs(spec, expansions)]
    return gx.ExpectationSuite(name=spec["name"], expectations=expectations)


def thresholds(suite: str, overrides: tuple[str, ...]) -> dict[str, float]:
    """The suite's ``thresholds`` block with the job's overrides applied (unknown names rejected)."""
    values = dict(read_spec(suite).get("thresholds", {}))
    known = {s: set(read_spec(s).get("thresholds", {})) for s in ("tokens", "profile_embeddings", "title_embeddings")}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"threshold override {item!r}: expected name=value or suite.name=value")
        name, raw = item.split("=", 1)
        target, _, key = name.rpartition(".")
        if target and target not in known:
            raise ValueError(f"threshold override {item!r}: unknown suite {target!r}; suites: {sorted(known)}")
        owners = [target] if target else [s for s, keys in known.items() if key in keys]
        if not owners or key not in known[owners[0]]:
            valid = sorted(known[target]) if target else sorted(set().union(*known.values()))
            raise ValueError(f"threshold override {item!r}: unknown threshold {key!r}; valid: {valid}")
        if suite in owners:
            values[key] = float(raw)
    return values


# ------------------------------------------------------------------------------------------------
# Running GE
# ------------------------------------------------------------------------------------------------
def _context(paths: Paths):
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    paths.gx.mkdir(parents=True, exist_ok=True)
    return gx.get_context(mode="file", project_root_dir=str(paths.gx))


def run_suite(paths: Paths, check: Check, build_docs: bool = True) -> dict:
    """Validate one DataFrame with one suite through a Checkpoint; return a compact summary."""
    import great_expectations as gx
    from great_expectations.checkpoint import UpdateDataDocsAction

    ctx = _context(paths)
    ds = ctx.data_sources.add_or_update_pandas(name="fmpipe")
    asset = ds.add_dataframe_asset(name=check.suite)
    batch_def = asset.add_batch_definition_whole_dataframe("whole_table")
    suite = ctx.suites.add_or_update(load_suite_spec(check.suite, check.expansions))
    vd = ctx.validation_definitions.add_or_update(gx.ValidationDefinition(name=check.suite, data=batch_def, suite=suite))
    actions = [UpdateDataDocsAction(name="data_docs")] if build_docs else []
    cp = ctx.checkpoints.add_or_update(gx.Checkpoint(name=f"{check.suite}_gate", validation_definitions=[vd],
                                                     actions=actions, result_format="SUMMARY"))
    result = cp.run(batch_parameters={"dataframe": check.df}, expectation_parameters=check.params)
    vr = next(iter(result.run_results.values()))
    shown = {k: (_short(v) if isinstance(v, list) else v) for k, v in check.params.items()}
    return {"suite": check.suite, "success": bool(result.success), "params": shown, "context": check.context,
            "statistics": dict(vr.statistics), "failures": _failures(vr), "result": vr.to_json_dict()}


def _short(value):
    """Long lists (value sets) as a count plus a few examples, so messages stay readable."""
    if isinstance(value, (list, tuple, set)) and len(value) > LONG_LIST:
        items = sorted(value, key=str)
        return f"<{len(items)} values: {', '.join(map(str, items[:3]))}, ...>"
    return value


def _number(x):
    """numpy scalars as plain numbers; whole floats as ints (GE turns integer thresholds into floats)."""
    if isinstance(x, bool) or not isinstance(x, (int, float, np.integer, np.floating)):
        return x
    return int(x) if float(x).is_integer() and abs(x) < 2**53 else float(x)


def observed(res: dict):
    """The observed value of a result in one plain form: an aggregate (mean, median, count), the
    titles missing from a required set, or the rows violating a per-row expectation."""
    if res.get("observed_value") is not None:
        v = res["observed_value"]
        return _short(v) if isinstance(v, list) else _number(v)
    if "partial_missing_list" in res:
        return {"missing": _number(res.get("missing_count")), "examples": res["partial_missing_list"][:5]}
    if "unexpected_count" in res:
        return {"unexpected_rows": _number(res["unexpected_count"]), "of_rows": _number(res.get("element_count")),
                "unexpected_percent": round(float(res.get("unexpected_percent") or 0.0), 3)}
    return None


def _kwarg_order(item: tuple[str, object]) -> tuple[int, str]:
    """Thresholds read in one order: bounds first, then ``mostly``, then the rest."""
    first = ("column", "value", "min_value", "max_value", "value_set", "mostly")
    return (first.index(item[0]) if item[0] in first else len(first), item[0])


def _failures(vr) -> list[dict]:
    out = []
    for r in vr.results:
        if r.success:
            continue
        cfg = r.expectation_config
        kw = {k: _short(_number(v)) for k, v in sorted(cfg.kwargs.items(), key=_kwarg_order) if k not in ("batch_id",)}
        res = r.result or {}
        out.append({"expectation": cfg.type, "column": kw.pop("column", None), "observed": observed(res),
                    "threshold": kw, "unexpected_examples": (res.get("partial_unexpected_list") or [])[:5],
                    "exception": exception_message(r.exception_info)})
    return out


def exception_message(info: dict | None) -> str | None:
    """GE 1.x nests exception info per metric (``{metric_id: {exception_message: ...}}``); flatten it."""
    if not info:
        return None
    if "exception_message" in info:
        return info["exception_message"] if info.get("raised_exception", True) else None
    msgs = sorted({v.get("exception_message") for v in info.values() if isinstance(v, dict) and v.get("exception_message")})
    return "; ".join(msgs) or None


def describe_failure(suite: str, f: dict) -> str:
    """``[suite] expectation on column C: observed X; threshold k=v, ...`` (one line)."""
    thr = ", ".join(f"{k}={v}" for k, v in f["threshold"].items()) or "(none)"
    obs = f["observed"]
    if isinstance(obs, dict):
        obs = ", ".join(f"{k}={v}" for k, v in obs.items())
    line = f"  [{suite}] {f['expectation']} on column {f['column'] or '(table)'}: observed {obs}; threshold {thr}"
    if f.get("unexpected_examples"):
        line += f"; e.g. {f['unexpected_examples'][:3]}"
    if f.get("exception"):
        line += f"; error: {f['exception']}"
    return line


def describe_failures(summaries: list[dict]) -> str:
    lines = ["validation failed; nothing will be published:"]
    for s in summaries:
        lines.extend(describe_failure(s["suite"], f) for f in s["failures"])
    return "\n".join(lines)
