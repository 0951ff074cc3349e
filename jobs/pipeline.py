"""The daily pipeline's steps as plain functions of a date: what each Airflow task calls.

Each step builds its job config from the date plus optional overrides (Airflow Params), runs the
job, and records its result and wall time under ``reports/dt=D/steps/<step>.json`` so the report
(and a person) can see what happened without Airflow's UI. No Airflow imports here.
"""
from __future__ import annotations

import datetime as dt
import time
from typing import Any, Callable

from jobs.io import atomic_write_json, partition, raw_partition
from jobs.settings import Paths, parse_date, parse_overrides

STEPS = ("check_raw", "tokenize", "embed", "validate", "publish", "index", "report")


def _timed(step: str, date: str, fn: Callable[[Paths, dt.date], dict]) -> dict:
    paths, day = Paths.from_env(), parse_date(date)
    t0 = time.perf_counter()
    out = fn(paths, day)
    out = {"step": step, "wall_s": round(time.perf_counter() - t0, 2), **out}
    atomic_write_json(out, partition(paths.reports, day) / "steps" / f"{step}.json")
    return out


def _with(cls: type, date: str, overrides: dict[str, Any] | None):
    return parse_overrides(cls, {**(overrides or {}), "date": date})


def check_raw(date: str) -> dict:
    """Fail fast, naming the path, when the day's raw partition has not landed."""
    def go(paths: Paths, day: dt.date) -> dict:
        path = raw_partition(paths, day)
        files = sorted(path.glob("*.parquet")) if path.is_dir() else []
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


def run_all(date: str) -> list[dict]:
    """The whole day without Airflow (same order as the DAG); used by tests and ad-hoc reruns."""
    return [check_raw(date), tokenize(date), embed(date), validate(date), publish(date), index(date), report(date)]


def latest_history_date(at_most: str | None = None) -> str:
    """The newest history state (optionally not after ``at_most``): what the model DAGs train on."""
    from jobs.io import latest_partition_before
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
    cfg = {"init": "current", "promote": "if_better", "time_budget_s": 120.0, "epochs": 3, **(overrides or {})}
    return _timed("finetune", date, lambda p, d: job.run(_with(job.TrainJobConfig, date, cfg), p))


def pretrain(date: str | None = None, overrides: dict | None = None) -> dict:
    """Train from scratch on the latest history; gated like the fine-tune before it becomes current."""
    from jobs import train as job
    date = date or latest_history_date()
    cfg = {"init": "scratch", "promote": "if_better", "time_budget_s": 1800.0, **(overrides or {})}
    return _timed("pretrain", date, lambda p, d: job.run(_with(job.TrainJobConfig, date, cfg), p))
