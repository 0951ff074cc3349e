"""fm_embeddings_daily: yesterday's events -> tokens -> embeddings -> gate -> Feast -> FAISS -> report.

Wiring only: every task calls a plain function in ``jobs.pipeline`` (heavy imports happen inside
the task, never at parse time). The run for data interval [D, D+1) processes day D; tasks are
idempotent on D, so retries and re-runs are safe. Job settings come from DAG Params.

Spark: ``tokenize`` runs in this worker on a local Spark (``spark_mode=local``, the default) or
is submitted with ``SparkSubmitOperator`` to the master of the Airflow connection
``$FMPIPE_SPARK_CONN_ID`` (default ``spark_default``) as the application ``jobs/tokenize.py``
(``spark_mode=submit``). The mode is the run's ``spark_mode`` Param when it is not ``auto``, else
the Airflow Variable ``fmpipe_spark_mode``, else ``$FMPIPE_SPARK_MODE``, else ``local``; it is
resolved when the run starts, so parsing this file reads no database and no network.

A late raw partition waits: ``wait_for_raw`` defers to the triggerer until ``raw/dt=D`` holds
Parquet files (``$FMPIPE_RAW_POKE_S``, default 300 s between checks; fails after
``$FMPIPE_RAW_TIMEOUT_S``, default 6 h) instead of failing the run and stalling later days.

One date is never processed twice at once: ``max_active_runs=1``, ``depends_on_past`` keeps the
days in order (each builds on the previous day's history and publication, also in a backfill with
several active runs), and each step holds the date's lock (``jobs.core.locks``).
"""
from __future__ import annotations

import os
from datetime import datetime, timedelta, timezone
from pathlib import Path

import sys

from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator
from airflow.sdk import Asset, Param, dag, task
from airflow.timetables.interval import CronDataIntervalTimetable

TOKENS = Asset("fmpipe://tokens")
PROFILE_EMBEDDINGS = Asset("fmpipe://embeddings/profile")
TITLE_EMBEDDINGS = Asset("fmpipe://embeddings/title")
FEATURES = Asset("fmpipe://feast/fm_embeddings")
TITLE_INDEX = Asset("fmpipe://index/titles")

sys.path.insert(0, str(Path(__file__).resolve().parent))      # the sensor module beside this file
from raw_sensor import RawPartitionSensor  # noqa: E402

SPARK_MODES = ("local", "submit")
TOKENIZE_APP = os.environ.get("FMPIPE_TOKENIZE_APPLICATION",
                              str(Path(__file__).resolve().parents[1] / "jobs" / "tokenize.py"))
SPARK_CONN_ID = os.environ.get("FMPIPE_SPARK_CONN_ID", "spark_default")


def _day(context) -> str:
    return context["data_interval_start"].date().isoformat()


def resolve_spark_mode(param: str, variable: str | None, env: str | None) -> str:
    """The first of Param (unless ``auto``), Variable, env that is set; ``local`` when none is."""
    mode = next((m for m in (param if param != "auto" else None, variable, env) if m), "local")
    if mode not in SPARK_MODES:
        raise ValueError(f"spark_mode must be one of {SPARK_MODES}, got {mode!r}")
    return mode


@dag(
    dag_id="fm_embeddings_daily",
    schedule=CronDataIntervalTimetable("0 0 * * *", timezone="UTC"),
    start_date=datetime(2026, 1, 1, tzinfo=timezone.utc),
    catchup=False,
    max_active_runs=1,
    default_args={"retries": 2, "retry_delay": timedelta(minutes=5), "execution_timeout": timedelta(hours=3),
                  "depends_on_past": True},
    params={
        "tokenize": {}, "embed": {}, "index": {},
        "spark_mode": Param("auto", enum=["auto", *SPARK_MODES],
                            description="auto: Variable fmpipe_spark_mode, then $FMPIPE_SPARK_MODE, then local"),
        "fmpipe_home": Param("", type="string",
                             description="FMPIPE_HOME passed to the submitted Spark job ('' = the worker's)"),
    },
    tags=["fm", "embeddings"],
    doc_md=__doc__,
)
def fm_embeddings_daily():
    @task(retries=0)
    def check_raw(**context) -> dict:
        from jobs import pipeline
        return pipeline.check_raw(_day(context))

    @task.branch(retries=0)
    def spark_mode(_raw: dict, **context) -> str:
        from airflow.sdk import Variable
        mode = resolve_spark_mode(context["params"]["spark_mode"], Variable.get("fmpipe_spark_mode", default=None),
                                  os.environ.get("FMPIPE_SPARK_MODE"))
        return f"tokenize_{mode}"

    @task(outlets=[TOKENS])
    def tokenize_local(**context) -> dict:
        from jobs import pipeline
        return pipeline.tokenize(_day(context), context["params"]["tokenize"])

    tokenize_submit = SparkSubmitOperator(
        task_id="tokenize_submit",
        application=TOKENIZE_APP,
        conn_id=SPARK_CONN_ID,
        name="fmpipe-tokenize",
        application_args=["--date", "{{ data_interval_start | ds }}", "--home", "{{ params.fmpipe_home }}",
                          "--overrides", "{{ params.tokenize | tojson }}"],
        outlets=[TOKENS],
    )

    @task(outlets=[PROFILE_EMBEDDINGS, TITLE_EMBEDDINGS], trigger_rule="none_failed_min_one_success")
    def embed(**context) -> dict:
        from jobs import pipeline
        return pipeline.embed(_day(context), context["params"]["embed"])

    @task(retries=0)
    def validate(_emb: dict, **context) -> dict:
        from jobs import pipeline
        return pipeline.validate(_day(context))

    @task(outlets=[FEATURES])
    def publish(_gate: dict, **context) -> dict:
        from jobs import pipeline
        return pipeline.publish(_day(context))

    @task(outlets=[TITLE_INDEX])
    def index(_pub: dict, **context) -> dict:
        from jobs import pipeline
        return pipeline.index(_day(context), context["params"]["index"])

    @task
    def report(_idx: dict, **context) -> dict:
        from jobs import pipeline
        return pipeline.report(_day(context))

    wait_for_raw = RawPartitionSensor(task_id="wait_for_raw", retries=0,
                                      poke_interval=float(os.environ.get("FMPIPE_RAW_POKE_S", 300)),
                                      timeout=float(os.environ.get("FMPIPE_RAW_TIMEOUT_S", 6 * 3600)))
    raw = check_raw()
    wait_for_raw >> raw
    choose = spark_mode(raw)
    tokenized = [tokenize_local(), tokenize_submit]
    embedded = embed()
    choose >> tokenized >> embedded
    report(index(publish(validate(embedded))))


fm_embeddings_daily()
