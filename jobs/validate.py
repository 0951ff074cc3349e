"""The quality gate: Great Expectations suites over the day's token and embedding tables.

Suites are declared as JSON in ``expectations/`` (``tokens``, ``profile_embeddings``,
``title_embeddings``): table-level expectations plus templates expanded per column ("{col}": every
vector column, every token field), and a ``thresholds`` block of defaults that the job config can
override (``thresholds=min_mean_cosine=0.3,title_embeddings.max_duplicate_share=0``). Run-time
values (expected row counts, vector width, vocabulary ranges, learned bounds) and the thresholds
reach GE as suite parameters (``$PARAMETER``), so the saved results show the resolved numbers.

Array columns are checked through derived scalar columns, because GE's length expectations do not
apply to arrays: ``__dim``, ``__norm``, ``__nonfinite``, ``__zero`` and ``__duplicate`` (0/1; their
mean is the share of zero / repeated vectors) and, against the reference, ``__prev_cos``.

The *reference* is the previous publication (the latest publish or rollback of an earlier date;
before anything was published, the latest earlier date whose gate passed). With one, each vector
column's norms must lie in a range learned from the reference's norms (its ``norm_q_low`` /
``norm_q_high`` quantiles widened by ``norm_widen``), its median norm may move by at most
``max_median_norm_shift`` (relative), and the mean cosine between today's and the reference's vector
of every entity present in both must reach ``min_mean_cosine``: the embed job rotates a new model's
space onto the previous one (:mod:`fm.align`), so a low cosine means an unaligned space, a sign flip
or a broken model, which would silently break every consumer that stored or trained on yesterday's
vectors. Without a reference (the first publication) the static bounds apply.

Results (JSON) go to ``gx/results/dt=D/`` and Data Docs to the GE file context under ``gx/``.
A failed suite raises :class:`GateFailed` naming, for each failed expectation, the suite, the
expectation, the column, the observed value and the threshold, so the DAG stops before publishing.
``summary.json`` (the verdict publish reads) carries a checksum of exactly the partitions it judged
and is removed when validate starts, so publish refuses data changed after validation and never
reads an older success after a crash (:mod:`jobs.core.verdict`).
"""
from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from fm import schema as S
from jobs.core import verdict
from jobs.core.failpoints import failpoint
from jobs.core.io import atomic_write_json, partition
from jobs.core.vector_stats import cosine_to_reference, probability_stats, vector_columns, with_vector_stats
from jobs.core.ge_suites import Check, describe_failures, run_suite, thresholds
from jobs.core.settings import Paths, parse_date, run_cli
from jobs.core.vocab import known_on, read_vocab, released_titles, title_ids_by_idx
from jobs.core.verdict import GateFailed  # noqa: F401 (re-exported: the gate's failure type)


@dataclass(frozen=True)
class ValidateConfig:
    """Validate day ``date``; ``thresholds`` override suite defaults: ``name=value`` for every suite
    that declares ``name``, ``suite.name=value`` for one suite."""
    date: str = ""
    build_docs: bool = True
    thresholds: tuple[str, ...] = ()


# ------------------------------------------------------------------------------------------------
# Reference publication
# ------------------------------------------------------------------------------------------------
def reference_date(paths: Paths, day: dt.date) -> tuple[dt.date, str] | None:
    """The publication the day is compared with: the latest publish/rollback of an earlier date
    (what consumers were served), else the latest earlier date whose gate passed."""
    from jobs.core.publication import history
    for rec in reversed(history(paths)):
        d = dt.date.fromisoformat(rec["date"])
        if d < day and partition(paths.profile_embeddings, d).exists():
            return d, f"publication {rec['publication']}"
    results = paths.gx / "results"
    passed = []
    for p in results.glob("dt=*") if results.exists() else []:
        d = dt.date.fromisoformat(p.name[3:])
        summary = p / "summary.json"
        if d < day and summary.exists() and json.loads(summary.read_text()).get("success") \
                and partition(paths.profile_embeddings, d).exists():
            passed.append(d)
    return (max(passed), "last passed gate (nothing published before)") if passed else None


def reference_bounds(ref_stats: pd.DataFrame, col: str, t: dict) -> dict[str, float] | None:
    """Learned norm range and median band for ``col`` from the reference's norms (None: no norms)."""
    name = f"{col}__norm"
    if name not in ref_stats:
        return None
    norms = ref_stats[name].to_numpy()
    norms = norms[np.isfinite(norms) & (norms > 0)]
    if len(norms) == 0:
        return None
    lo, hi = np.quantile(norms, [t["norm_q_low"], t["norm_q_high"]])
    med = float(np.median(norms))
    return {f"norm_min__{col}": float(lo / t["norm_widen"]), f"norm_max__{col}": float(hi * t["norm_widen"]),
            f"median_min__{col}": med * (1 - t["max_median_norm_shift"]),
            f"median_max__{col}": med * (1 + t["max_median_norm_shift"])}


def model_change(table: pa.Table, ref_table: pa.Table) -> str | None:
    """``"A -> B"`` when today's vectors come from another model than the reference's.

    Alignment rotates a new model's space onto the published one but cannot rescale it, so on the
    day a retrained model takes over, norm bounds learned from the old model would block a healthy
    publication: that day uses the static norm bounds, while the drift (cosine) check still runs.
    """
    if "model_version" not in table.column_names or "model_version" not in ref_table.column_names:
        return None
    today = set(pc.unique(table["model_version"]).to_pylist())
    before = set(pc.unique(ref_table["model_version"]).to_pylist())
    return None if today == before else f"{','.join(sorted(map(str, before)))} -> {','.join(sorted(map(str, today)))}"


# ------------------------------------------------------------------------------------------------
# The three checks
# ------------------------------------------------------------------------------------------------
def active_profiles(paths: Paths, day: dt.date) -> int:
    hist = pq.read_table(partition(paths.history, day), columns=["last_dt"])
    return int(pc.sum(pc.equal(hist["last_dt"], pa.scalar(day, pa.date32()))).as_py() or 0)


def token_ranges(max_title_id: int) -> dict[str, tuple[int, int]]:
    """Closed id range of every token field: exactly what tokenize can emit (see fm.schema).

    Closed vocabularies fall back to OOV for unknown values, except actions (unknown actions are
    quarantined) and titles (unknown titles are quarantined)."""
    ranges = {
        "title": (S.N_SPECIAL, max_title_id),
        "action": (S.N_SPECIAL, S.vocab_size(S.ACTIONS) - 1),
        "duration": (S.NO_DURATION, S.N_DURATION - 1),
        "device": (S.OOV, S.vocab_size(S.DEVICES) - 1),
        "canvas": (S.OOV, S.vocab_size(S.CANVASES) - 1),
        "locale": (S.OOV, S.vocab_size(S.LOCALES) - 1),
        "row": (S.OOV, S.N_ROW - 1),
        "hour": (S.N_SPECIAL, S.N_HOUR - 1),
        "dow": (S.N_SPECIAL, S.N_DOW - 1),
        "gap": (S.OOV, S.N_GAP - 1),
    }
    if set(ranges) != set(S.TOKEN_FIELDS):
        raise RuntimeError(f"token_ranges covers {sorted(ranges)} but TOKEN_FIELDS is {sorted(S.TOKEN_FIELDS)}")
    return ranges


def tokens_check(paths: Paths, day: dt.date, t: dict) -> Check:
    """tokens/dt=D: one row per kept event, keys unique and present, every id inside its vocabulary."""
    part = partition(paths.tokens, day)
    if not part.exists():
        raise FileNotFoundError(f"tokens: partition {part} missing (run tokenize for {day} first)")
    vocab = read_vocab(paths)
    max_title = int(pc.max(vocab["idx"]).as_py()) if vocab.num_rows else S.N_SPECIAL - 1
    active = active_profiles(paths, day)
    params = {**t, "active_profiles": active, "min_rows": int(np.ceil(active * t["min_tokens_per_active_profile"]))}
    for f, (lo, hi) in token_ranges(max_title).items():
        params[f"min__{f}"], params[f"max__{f}"] = lo, hi
    df = pq.read_table(part).to_pandas()
    return Check("tokens", df, {"per_token_field": list(S.TOKEN_FIELDS)}, params,
                 {"vocab_titles": vocab.num_rows})


def embedding_check(suite: str, key: str, table: pa.Table, params: dict, t: dict,
                    ref: tuple[dt.date, str, pa.Table] | None) -> Check:
    """Derived columns, static or learned norm bounds per column, and drift against ``ref``."""
    vcols = vector_columns(table)
    df = with_vector_stats(table)
    params = {**t, **params, **{f"dim__{c}": params.get(f"dim__{c}", params["dim"]) for c in vcols}}
    probs = [c for c in vcols if c.startswith("head_")]          # class probabilities (fm.extract.head_column)
    for col in probs:
        for stat, values in probability_stats(table[col].combine_chunks()).items():
            df[f"{col}__{stat}"] = values
    if probs:
        params.update(psum_min=1 - t["prob_sum_tol"], psum_max=1 + t["prob_sum_tol"])
    context: dict = {"reference": None}
    learned, drift = [], []
    if ref is not None:
        ref_day, why, ref_table = ref
        ref_stats = with_vector_stats(ref_table.select([c for c in ref_table.column_names if c in (key, *vcols)]))
        context["reference"] = {"date": ref_day.isoformat(), "source": why, "columns": {}}
        changed = model_change(table, ref_table)
        if changed:
            context["reference"]["model_changed"] = changed
        for col in vcols:
            if col not in ref_table.column_names:
                continue
            bounds = reference_bounds(ref_stats, col, t)
            if bounds is None:
                continue
            if not changed:
                learned.append(col)
                params.update(bounds)
            cos = cosine_to_reference(table, ref_table, key, col)
            shared = int(np.isfinite(cos).sum())
            info = {**(bounds if not changed else {}), "shared": shared}
            if shared >= t["min_shared"]:
                drift.append(col)
                df[f"{col}__prev_cos"] = cos
                info["mean_cosine"] = float(np.nanmean(cos))
            else:
                info["drift"] = f"not checked: {shared} shared entities < min_shared {t['min_shared']:g}"
            context["reference"]["columns"][col] = info
    static = [c for c in vcols if c not in learned]
    context["norm_bounds"] = {"learned": learned, "static": static}
    expansions = {"per_vector_column": vcols, "per_probability_column": probs, "per_vector_column_static": static,
                  "per_vector_column_learned": learned, "per_vector_column_drift": drift}
    return Check(suite, df, expansions, params, context)


def embedding_checks(paths: Paths, day: dt.date, overrides: tuple[str, ...]) -> list[Callable[[], Check]]:
    """The profile and title checks (built lazily: one table in memory at a time)."""
    ref = reference_date(paths, day)
    specs = (("profile_embeddings", "profile_id", paths.profile_embeddings),
             ("title_embeddings", "title_id", paths.title_embeddings))
    checks = []
    for suite, key, root in specs:
        part = partition(root, day)

        def build(suite=suite, key=key, root=root, part=part) -> Check:
            if not part.exists():
                raise FileNotFoundError(f"{suite}: partition {part} missing (run embed for {day} first)")
            table = pq.read_table(part)
            manifest = json.loads((part / "_manifest.json").read_text())
            params = {"dim": manifest["dim"], **{f"dim__{c}": d for c, d in (manifest.get("dims") or {}).items()}}
            if suite == "profile_embeddings":
                params["expected_rows"] = active_profiles(paths, day)
            else:
                params["expected_rows"] = int(known_on(paths, title_ids_by_idx(read_vocab(paths))[S.N_SPECIAL:], day).sum())
                params["catalogue_titles"] = released_titles(paths, day)
            ref_part = partition(root, ref[0]) if ref else None
            ref_arg = (ref[0], ref[1], pq.read_table(ref_part)) if ref_part is not None and ref_part.exists() else None
            return embedding_check(suite, key, table, params, thresholds(suite, overrides), ref_arg)
        checks.append(build)
    return checks


def run(cfg: ValidateConfig, paths: Paths) -> dict:
    """Run every suite over ``cfg.date``'s tables; store the verdict bound to the inputs it checked
    (:mod:`jobs.core.verdict`): the old verdict is removed first, the new one written atomically last."""
    day = parse_date(cfg.date)
    verdict.invalidate(paths, day)
    failpoint("validate.invalidated")                 # old verdict removed, suites not yet run
    checked = verdict.inputs(paths, day)
    builders = [lambda: tokens_check(paths, day, thresholds("tokens", cfg.thresholds)),
                *embedding_checks(paths, day, cfg.thresholds)]
    summaries = []
    for build in builders:
        check = build()
        s = run_suite(paths, check, cfg.build_docs)
        del check
        atomic_write_json(s, partition(paths.gx / "results", day) / f"{s['suite']}.json")
        summaries.append({k: v for k, v in s.items() if k != "result"})
    docs = paths.gx / "gx" / "uncommitted" / "data_docs" / "local_site" / "index.html"
    out = {"date": day.isoformat(), "success": all(s["success"] for s in summaries), "suites": summaries,
           "data_docs": str(docs) if docs.exists() else None}
    verdict.require_unchanged(checked, paths, day)
    bound = verdict.bind(out, checked)
    atomic_write_json(bound, verdict.summary_path(paths, day))
    failpoint("validate.verdict_written")             # verdict committed, step record not yet written
    out["inputs_sha256"] = bound["inputs_sha256"]
    if not out["success"]:
        raise GateFailed(describe_failures(summaries))
    return out


def main(argv: list[str] | None = None) -> dict:
    return run_cli(ValidateConfig, run, __doc__, argv, lambda out: {k: v for k, v in out.items() if k != "suites"})
