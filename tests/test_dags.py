"""DAG folder hygiene and one full `dag.test()` run through real Airflow (SQLite metadata DB)."""
from __future__ import annotations

import datetime as dt
import json
import os
import sqlite3
from pathlib import Path

import pyarrow.parquet as pq

from jobs.io import partition

DAGS = Path(__file__).resolve().parents[1] / "dags"


def test_dag_folder_imports_without_errors():
    from airflow.dag_processing.dagbag import DagBag
    bag = DagBag(dag_folder=str(DAGS))
    assert bag.import_errors == {}
    assert {"fm_embeddings_daily", "fm_finetune_daily", "fm_pretrain_monthly"} <= set(bag.dag_ids)


def test_graph_shape():
    from airflow.dag_processing.dagbag import DagBag
    dag = DagBag(dag_folder=str(DAGS)).dags["fm_embeddings_daily"]
    order = ["check_raw", "tokenize", "embed", "validate", "publish", "index", "report"]
    assert set(dag.task_ids) == set(order)
    for up, down in zip(order, order[1:]):
        assert dag.get_task(up).downstream_task_ids == {down}
    assert dag.max_active_runs == 1 and dag.get_task("tokenize").retries == 2


def test_dag_test_run_publishes_the_day(world, spark, airflow_db):
    """One real Airflow run for the last day; the publication equals the direct pipeline's output."""
    from airflow.dag_processing.dagbag import DagBag
    paths = world["paths"]
    os.environ["FMPIPE_HOME"] = str(paths.home)
    day = dt.date.fromisoformat(world["days"][-1])
    dag = DagBag(dag_folder=str(DAGS)).dags["fm_embeddings_daily"]
    run = dag.test(logical_date=dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), tzinfo=dt.timezone.utc))
    assert str(run.state) in ("success", "DagRunState.SUCCESS")
    with sqlite3.connect(airflow_db) as db:
        states = db.execute("SELECT state FROM dag_run WHERE dag_id='fm_embeddings_daily' "
                            "AND date(data_interval_start)=?", (day.isoformat(),)).fetchall()
    assert ("success",) in states
    emb = pq.read_table(partition(paths.profile_embeddings, day))
    assert emb.num_rows > 0
    report = json.loads((partition(paths.reports, day) / "summary.json").read_text())
    assert report["validation"]["success"] and report["online_probe"]["dims"]["emb_layer2_last"] == 32
    for step in ("check_raw", "tokenize", "embed", "validate", "publish", "index"):
        assert report["wall_s"][step] >= 0
    assert (partition(paths.reports, day) / "steps" / "report.json").exists()
