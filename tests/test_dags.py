"""DAG folder hygiene and one full `dag.test()` run through real Airflow (SQLite metadata DB)."""
from __future__ import annotations

import datetime as dt
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from jobs.core.io import partition

DAGS = Path(__file__).resolve().parents[1] / "dags"


def test_dag_folder_imports_without_errors():
    from airflow.dag_processing.dagbag import DagBag
    bag = DagBag(dag_folder=str(DAGS))
    assert bag.import_errors == {}
    assert {"fm_embeddings_daily", "fm_finetune_daily", "fm_pretrain_monthly"} <= set(bag.dag_ids)


def _daily_dag():
    from airflow.dag_processing.dagbag import DagBag
    return DagBag(dag_folder=str(DAGS)).dags["fm_embeddings_daily"]


def test_graph_shape():
    dag = _daily_dag()
    order = ["check_raw", "spark_mode", "embed", "validate", "publish", "index", "report"]
    assert set(dag.task_ids) == set(order) | {"tokenize_local", "tokenize_submit", "wait_for_raw"}
    assert dag.get_task("wait_for_raw").downstream_task_ids == {"check_raw"}
    assert dag.get_task("check_raw").downstream_task_ids == {"spark_mode"}
    assert dag.get_task("spark_mode").downstream_task_ids == {"tokenize_local", "tokenize_submit"}
    for tok in ("tokenize_local", "tokenize_submit"):
        assert dag.get_task(tok).downstream_task_ids == {"embed"}
        assert dag.get_task(tok).retries == 2
    assert str(dag.get_task("embed").trigger_rule) in ("none_failed_min_one_success",
                                                       "TriggerRule.NONE_FAILED_MIN_ONE_SUCCESS")
    for up, down in zip(order[2:], order[3:]):
        assert dag.get_task(up).downstream_task_ids == {down}
    # one date at a time, days in order (each builds on the previous day's state)
    assert dag.max_active_runs == 1 and all(t.depends_on_past for t in dag.tasks)


PARSE_PROBE = """
import json, socket, sys
calls = []
def refuse(what):
    def f(*a, **k):
        calls.append(what)
        raise RuntimeError(what + " at parse time")
    return f
socket.socket.connect = refuse("socket.connect")
socket.create_connection = refuse("socket.create_connection")
socket.getaddrinfo = refuse("socket.getaddrinfo")
import sqlalchemy.engine
sqlalchemy.engine.Engine.connect = refuse("database connect")
sqlalchemy.engine.Engine.raw_connection = refuse("database connect")
from airflow.sdk import Connection, Variable
Variable.get = staticmethod(refuse("Variable.get"))
Connection.get = classmethod(refuse("Connection.get"))
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder=sys.argv[1])
print(json.dumps({"errors": {k: str(v) for k, v in bag.import_errors.items()}, "dags": sorted(bag.dag_ids),
                  "calls": calls}))
"""


def test_parsing_the_dags_touches_no_database_and_no_network(tmp_path):
    """Parse the folder in a fresh interpreter where every DB connection, Variable/Connection lookup
    and socket raises and is recorded (the raise alone could be swallowed by a fallback)."""
    env = {**os.environ, "AIRFLOW_HOME": str(tmp_path / "airflow"), "AIRFLOW__CORE__LOAD_EXAMPLES": "False"}
    out = subprocess.run([sys.executable, "-c", PARSE_PROBE, str(DAGS)], check=False, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["errors"] == {} and got["calls"] == []
    assert {"fm_embeddings_daily", "fm_finetune_daily", "fm_pretrain_monthly"} <= set(got["dags"])


def test_submit_mode_runs_tokenize_py_through_spark_submit_with_the_date_and_paths():
    from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator
    dag = _daily_dag()
    task = dag.get_task("tokenize_submit")
    assert isinstance(task, SparkSubmitOperator)
    app = Path(task.application)
    assert app == DAGS.parent / "jobs" / "tokenize.py" and app.is_file()
    assert task._conn_id == "spark_default"                    # the master comes from this connection
    context = {"data_interval_start": dt.datetime(2026, 11, 14, tzinfo=dt.timezone.utc),
               "params": {"tokenize": {"history_len": 64}, "fmpipe_home": "/data/fmpipe"}}
    args = task.render_template(task.application_args, context, jinja_env=dag.get_template_env())
    assert args == ["--date", "2026-11-14", "--home", "/data/fmpipe", "--overrides", '{"history_len": 64}']
    assert dag.params["spark_mode"] == "auto"


def test_spark_mode_comes_from_param_then_variable_then_env():
    import importlib.util
    spec = importlib.util.spec_from_file_location("fm_embeddings_daily", DAGS / "fm_embeddings_daily.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    resolve = mod.resolve_spark_mode
    assert resolve("auto", None, None) == "local"
    assert resolve("auto", None, "submit") == "submit"
    assert resolve("auto", "submit", "local") == "submit"
    assert resolve("local", "submit", "submit") == "local"
    with pytest.raises(ValueError, match="spark_mode must be one of"):
        resolve("auto", "yarn", None)


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
    with sqlite3.connect(airflow_db) as db:
        tis = dict(db.execute("SELECT task_id, state FROM task_instance WHERE dag_id='fm_embeddings_daily' "
                              "AND run_id=?", (run.run_id,)).fetchall())
    assert tis["tokenize_local"] == "success" and tis["tokenize_submit"] == "skipped"      # spark_mode auto -> local
    emb = pq.read_table(partition(paths.profile_embeddings, day))
    assert emb.num_rows > 0
    report = json.loads((partition(paths.reports, day) / "summary.json").read_text())
    assert report["validation"]["success"] and report["online_probe"]["dims"]["emb_layer2_last"] == 32
    for step in ("check_raw", "tokenize", "embed", "validate", "publish", "index"):
        assert report["wall_s"][step] >= 0
    assert (partition(paths.reports, day) / "steps" / "report.json").exists()


def test_a_late_raw_partition_defers_then_fires_when_it_lands(tmp_path, monkeypatch):
    """The sensor defers (no worker slot held) while raw/dt=D is missing, with its timeout; the
    trigger fires once the day's Parquet file lands; present data passes without deferring."""
    import asyncio

    from airflow.sdk.exceptions import TaskDeferred
    monkeypatch.setenv("FMPIPE_HOME", str(tmp_path))
    sensor = _daily_dag().get_task("wait_for_raw")
    ctx = {"data_interval_start": dt.datetime(2026, 11, 5, tzinfo=dt.timezone.utc)}
    with pytest.raises(TaskDeferred) as deferred:
        sensor.execute(ctx)
    trigger = deferred.value.trigger
    assert trigger.filepath == str(tmp_path / "raw" / "dt=2026-11-05" / "*.parquet")
    assert deferred.value.timeout.total_seconds() == sensor.timeout

    async def first_event():
        gen = trigger.run()
        return await asyncio.wait_for(gen.__anext__(), timeout=30)

    async def land_then_wait():
        task = asyncio.ensure_future(first_event())
        await asyncio.sleep(0.3)
        assert not task.done()                                # still waiting: nothing landed
        part = tmp_path / "raw" / "dt=2026-11-05"
        part.mkdir(parents=True)
        (part / "part-x-0.parquet").write_bytes(b"PAR1")
        return await task

    trigger.poke_interval = 0.1
    event = asyncio.run(land_then_wait())
    assert event is not None
    assert sensor.execute(ctx) == {"date": "2026-11-05", "waited": False}
