"""``make demo``: the whole daily pipeline on generated data, end to end through Airflow.

1. generate a synthetic world (catalogue + 14 daily raw partitions),
2. backfill the token history for every day but the last (Spark, ``full`` rebuild),
3. train a small foundation model on that history,
4. run the ``fm_embeddings_daily`` DAG for the last day with ``airflow dags test`` against the
   SQLite metadata DB under ``$FMPIPE_HOME/airflow``, and check that Airflow recorded success,
5. print the report (rows, gate, Feast read-back, FAISS neighbours, wall time per step).

Starts from an empty ``$FMPIPE_HOME`` each time, so a second run is a clean, identical re-run.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time

from jobs.tools import generate
from jobs import tokenize, train
from jobs.core.io import partition
from jobs.core.settings import REPO_ROOT, Paths, parse_overrides


def airflow_env(paths: Paths) -> dict[str, str]:
    """Airflow settings for a local run: SQLite metadata under FMPIPE_HOME, our dags/ folder."""
    env = dict(os.environ)
    env.update({
        "FMPIPE_HOME": str(paths.home), "AIRFLOW_HOME": str(paths.home / "airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO_ROOT / "dags"), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False", "GX_ANALYTICS_ENABLED": "false",
    })
    env.setdefault("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", f"sqlite:///{paths.home / 'airflow' / 'airflow.db'}")
    return env


def airflow(args: list[str], paths: Paths) -> subprocess.CompletedProcess:
    exe = os.path.join(os.path.dirname(sys.executable), "airflow")
    return subprocess.run([exe, *args], env=airflow_env(paths), check=True, text=True, capture_output=False)


def run_state(paths: Paths, dag_id: str, day: dt.date) -> str:
    """State Airflow's metadata DB recorded for the run whose data interval starts on ``day``."""
    with sqlite3.connect(paths.home / "airflow" / "airflow.db") as db:
        row = db.execute("SELECT state FROM dag_run WHERE dag_id = ? AND date(data_interval_start) = ? "
                         "ORDER BY id DESC LIMIT 1", (dag_id, day.isoformat())).fetchone()
    return row[0] if row else "none"


def run(gen_cfg: generate.GenerateConfig, train_budget_s: float, paths: Paths) -> dict:
    timings: dict[str, float] = {}
    if paths.home.exists():
        shutil.rmtree(paths.home)
    paths.home.mkdir(parents=True)
    t = time.perf_counter()
    generate.run(gen_cfg, paths)
    timings["generate"] = time.perf_counter() - t
    last = dt.date.fromisoformat(gen_cfg.start) + dt.timedelta(days=gen_cfg.days - 1)
    prev = (last - dt.timedelta(days=1)).isoformat()

    t = time.perf_counter()
    print(tokenize.run(tokenize.TokenizeConfig(date=prev, full=True), paths))
    timings["backfill_tokenize"] = time.perf_counter() - t
    t = time.perf_counter()
    print({k: v for k, v in train.run(train.TrainJobConfig(date=prev, time_budget_s=train_budget_s), paths).items()})
    timings["train"] = time.perf_counter() - t

    t = time.perf_counter()
    airflow(["db", "migrate"], paths)
    # The run triggered at the end of the interval [D, D+1) processes day D.
    airflow(["dags", "test", "fm_embeddings_daily", (last + dt.timedelta(days=1)).isoformat()], paths)
    timings["airflow_dag"] = time.perf_counter() - t
    state = run_state(paths, "fm_embeddings_daily", last)
    summary = json.loads((partition(paths.reports, last) / "summary.json").read_text())
    print("\n" + (partition(paths.reports, last) / "summary.txt").read_text())
    print(f"airflow     dag run state: {state} (metadata DB {paths.home / 'airflow' / 'airflow.db'})")
    print("demo steps  " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
    if state != "success":
        raise SystemExit(f"DAG run for {last} ended in state {state!r}")
    return {"date": last.isoformat(), "dag_state": state, "timings": timings, "summary": summary}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train-budget-s", type=float, default=150.0)
    ap.add_argument("overrides", nargs="*", help="key=value overrides of GenerateConfig")
    args = ap.parse_args(argv)
    overrides = {"malformed_per_day": "12"}          # show the quarantine path in the demo
    overrides.update(dict(o.split("=", 1) for o in args.overrides))
    return run(parse_overrides(generate.GenerateConfig, overrides), args.train_budget_s, Paths.from_env())
