"""The daily pipeline's steps as plain functions of a date: what each Airflow task calls.

Each step builds its job config from the date plus optional overrides (Airflow Params), runs the
job, and records its result and wall time under ``reports/dt=D/steps/<step>.json`` so the report
(and a person) can see what happened without Airflow's UI. No Airflow imports here.

Each daily step holds the date's lock while it runs (:mod:`jobs.core.locks`), and steps that rewrite
state shared by every date also hold that state's lock, so a second run for the same date fails
with a message naming the date and the holder instead of racing the first one; ``fmpipe <step>``
from the command line takes the same locks (:func:`cli_locks`). Between steps the
lock is released: two runs may interleave step by step, which is safe because every step is a
pure, idempotent function of its inputs (the result equals one run's; tested).

:func:`backfill` runs a date range as the daily runs would, one whole day after the other
(``fmpipe backfill --start D1 --end D2``).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import time
from pathlib import Path
from typing import Any, Callable

from jobs.core import locks
from jobs.core.io import atomic_write_json, partition, raw_partition
from jobs.core.redact import redact
from jobs.core.settings import Paths, parse_date, parse_overrides, restrict_umask

STEPS = ("check_raw", "tokenize", "embed", "validate", "publish", "index", "report")
# state that every date reads and rewrites: tokenize grows the title vocabulary and chains the history
# states; validate updates the one GE file context; training moves models/CURRENT.json
SHARED_STATE = {"tokenize": "state-tokenize", "validate": "state-gx",
                "finetune": "state-models", "pretrain": "state-models", "train": "state-models"}
# the job configs whose CLI (``fmpipe <step>``, :func:`jobs.core.settings.run_cli`) runs a locked step
CLI_STEPS = {"TokenizeConfig": "tokenize", "EmbedConfig": "embed", "ValidateConfig": "validate",
             "PublishConfig": "publish", "IndexConfig": "index", "ReportConfig": "report", "TrainJobConfig": "train"}


def step_locks(paths: Paths, step: str, day: dt.date | None) -> contextlib.ExitStack:
    """The locks ``step`` holds for ``day``: the date's (daily steps), then its shared state's."""
    stack = contextlib.ExitStack()
    try:
        if step in STEPS and day is not None:
            stack.enter_context(locks.date_lock(paths, day, step))
        if step in SHARED_STATE:
            stack.enter_context(locks.shared_lock(paths, SHARED_STATE[step], step))
    except BaseException:
        stack.close()
        raise
    return stack


def cli_locks(paths: Paths, cfg: object) -> contextlib.ExitStack:
    """The locks a job run from its CLI holds: exactly those of the same step in :func:`_timed`.

    Why: ``fmpipe publish date=D`` racing the DAG's publish of D (or a second terminal) must be
    refused the same way two DAG runs are; a job without a locked step takes none."""
    step = CLI_STEPS.get(type(cfg).__name__)
    if step is None:
        return contextlib.ExitStack()
    date = getattr(cfg, "date", "") or None
    return step_locks(paths, step, parse_date(date) if date else None)


def _timed(step: str, date: str, fn: Callable[[Paths, dt.date], dict]) -> dict:
    paths, day = Paths.from_env(), parse_date(date)
    restrict_umask()
    with step_locks(paths, step, day):
        t0 = time.perf_counter()
        out = redact(fn(paths, day))            # the step record and the XCom never hold a credential
        out = {"step": step, "wall_s": round(time.perf_counter() - t0, 2), **out}
        atomic_write_json(out, partition(paths.reports, day) / "steps" / f"{step}.json")
    return out


def _with(cls: type, date: str, overrides: dict[str, Any] | None):
    return parse_overrides(cls, {**(overrides or {}), "date": date})


RAW_FILES = "*.parquet"            # a raw partition has landed when it holds these


def raw_glob(date: str) -> str:
    """The files whose arrival means the day's raw partition has landed (the DAG's sensor waits on it)."""
    return str(raw_partition(Paths.from_env(), parse_date(date)) / RAW_FILES)


def _raw_files(paths: Paths, day: dt.date) -> list[Path]:
    path = raw_partition(paths, day)
    return sorted(path.glob(RAW_FILES)) if path.is_dir() else []


def raw_files(date: str) -> list[Path]:
    return _raw_files(Paths.from_env(), parse_date(date))


def check_raw(date: str) -> dict:
    """Fail fast, naming the path, when the day's raw partition has not landed."""
    def go(paths: Paths, day: dt.date) -> dict:
        path = raw_partition(paths, day)
        files = _raw_files(paths, day)
        if not files:
            raise FileNotFoundError(f"raw partition missing for {day}: {path} (expected Parquet files)")
        return {"path": str(path), "files": len(files), "bytes": sum(f.stat().st_size for f in files)}
    return _timed("check_raw", date, go)


def tokenize(date: str, overrides: dict | None = None) -> dict:
    from jobs import tokenize as job
    return _timed("tokenize", date, lambda p, d: job.run(_with(job.TokenizeConfig, date, overrides), p))


def embed(date: str, overrides: dict | None = None) -> dict:
    from jobs import embed as job
    return _timed("embed", date, lambda p, d: job.run(_with(job.EmbedConfig, date, overrides), p))


def validate(date: str, overrides: dict | None = None) -> dict:
    """The gate over the day's token table and embedding tables (one step: a failure names the suite)."""
    from jobs import validate as job
    return _timed("validate", date, lambda p, d: {k: v for k, v in job.run(_with(job.ValidateConfig, date, overrides), p).items()
                                                  if k != "suites"})


def publish(date: str, overrides: dict | None = None) -> dict:
    from jobs import publish as job
    return _timed("publish", date, lambda p, d: job.run(_with(job.PublishConfig, date, overrides), p))


def index(date: str, overrides: dict | None = None) -> dict:
    from jobs import index as job
    return _timed("index", date, lambda p, d: job.run(_with(job.IndexConfig, date, overrides), p))


def report(date: str) -> dict:
    from jobs import report as job
    return _timed("report", date, lambda p, d: job.run(job.ReportConfig(date=date), p))


def run_all(date: str, overrides: dict[str, dict] | None = None) -> list[dict]:
    """The whole day without Airflow (same order as the DAG); used by tests, reruns and backfills.

    ``overrides`` maps a step to its options, like the DAG's Params (``{"embed": {"engine": "spark"}}``).
    """
    o = overrides or {}
    unknown = set(o) - {"tokenize", "embed", "validate", "publish", "index"}
    if unknown:
        raise ValueError(f"no options for step(s) {sorted(unknown)}; steps with options: tokenize, embed, "
                         f"validate, publish, index")
    return [check_raw(date), tokenize(date, o.get("tokenize")), embed(date, o.get("embed")),
            validate(date, o.get("validate")), publish(date, o.get("publish")), index(date, o.get("index")),
            report(date)]


def days_in(start: str, end: str) -> list[str]:
    """Every date from ``start`` to ``end``, both included, in order."""
    first, last = parse_date(start), parse_date(end)
    if last < first:
        raise ValueError(f"backfill range is empty: end {last} is before start {first}")
    return [(first + dt.timedelta(days=i)).isoformat() for i in range((last - first).days + 1)]


def backfill(start: str, end: str, overrides: dict[str, dict] | None = None) -> list[dict]:
    """Run the daily pipeline for every date in ``[start, end]``, one whole day after the other.

    Why day-major and not step-major (all tokenizes, then all embeds, ...): each day builds on the
    one before it (tokenize on the previous history state, embed aligns to the previous publication,
    publish carries the online state forward and moves the serving pointer), and only the last few
    history states are kept. So a backfill is exactly the sequence of daily runs, which is what
    makes its publications equal to theirs (tested). A failed day stops the backfill there: later
    days would build on a missing state; re-running the same range is safe (every step is idempotent).
    Airflow's own backfill gives the same order with ``--max-active-runs 1`` (see the README).
    """
    results = []
    for date in days_in(start, end):
        steps = run_all(date, overrides)
        results.append({"date": date, "steps": {s["step"]: s.get("wall_s") for s in steps}})
    return results


def _step_overrides(items: list[str]) -> dict[str, dict[str, str]]:
    """``["embed.engine=spark", ...]`` -> ``{"embed": {"engine": "spark"}}`` (values coerced by each job)."""
    out: dict[str, dict[str, str]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        step, dot, name = key.partition(".")
        if not sep or not dot:
            raise ValueError(f"expected step.key=value (e.g. embed.engine=spark), got {item!r}")
        out.setdefault(step, {})[name] = value
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    """``fmpipe backfill --start D1 --end D2 [step.key=value ...]``: the daily runs of a date range."""
    ap = argparse.ArgumentParser(prog="fmpipe backfill", description=main.__doc__)
    ap.add_argument("--start", required=True, help="first date, YYYY-MM-DD")
    ap.add_argument("--end", required=True, help="last date (included), YYYY-MM-DD")
    ap.add_argument("overrides", nargs="*", help="per-step options, e.g. embed.engine=spark")
    args = ap.parse_args(argv)
    out = backfill(args.start, args.end, _step_overrides(args.overrides))
    print(json.dumps(redact(out)))
    return out


def latest_history_date(at_most: str | None = None) -> str:
    """The newest history state (optionally not after ``at_most``): what the model DAGs train on."""
    from jobs.core.io import latest_partition_before
    paths = Paths.from_env()
    bound = parse_date(at_most) + dt.timedelta(days=1) if at_most else dt.date.max
    day = latest_partition_before(paths.history, bound)
    if day is None:
        raise FileNotFoundError(f"no history state under {paths.history}: run the daily DAG first")
    return day.isoformat()


def finetune(date: str | None = None, overrides: dict | None = None) -> dict:
    """Continue training the serving model on the days since its checkpoint, growing the vocabulary;
    the candidate becomes current only if it passes the evaluation gate."""
    from jobs import train as job
    date = date or latest_history_date()
    cfg = {"init": "current", "promote": "if_better", "time_budget_s": 120.0, "max_epochs": 3, **(overrides or {})}
    return _timed("finetune", date, lambda p, d: job.run(_with(job.TrainJobConfig, date, cfg), p))


def pretrain(date: str | None = None, overrides: dict | None = None) -> dict:
    """Train from scratch on the latest history; gated like the fine-tune before it becomes current."""
    from jobs import train as job
    date = date or latest_history_date()
    cfg = {"init": "scratch", "promote": "if_better", "time_budget_s": 1800.0, **(overrides or {})}
    return _timed("pretrain", date, lambda p, d: job.run(_with(job.TrainJobConfig, date, cfg), p))
