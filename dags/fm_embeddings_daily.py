"""fm_embeddings_daily: yesterday's events -> tokens -> embeddings -> gate -> Feast -> FAISS -> report.

Wiring only: every task calls a plain function in ``jobs.pipeline`` (heavy imports happen inside
the task, never at parse time). The run for data interval [D, D+1) processes day D; tasks are
idempotent on D, so retries and re-runs are safe. Job settings come from DAG Params.
"""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

from airflow.sdk import Asset, dag, task
from airflow.timetables.interval import CronDataIntervalTimetable

TOKENS = Asset("fmpipe://tokens")
PROFILE_EMBEDDINGS = Asset("fmpipe://embeddings/profile")
TITLE_EMBEDDINGS = Asset("fmpipe://embeddings/title")
FEATURES = Asset("fmpipe://feast/fm_embeddings")
TITLE_INDEX = Asset("fmpipe://index/titles")


def _day(context) -> str:
    return context["data_interval_start"].date().isoformat()


@dag(
    dag_id="fm_embeddings_daily",
    schedule=CronDataIntervalTimetable("0 0 * * *", timezone="UTC"),
    start_date=datetime(2026, 1, 1, tzinfo=timezone.utc),
    catchup=False,
    max_active_runs=1,
    default_args={"retries": 2, "retry_delay": timedelta(minutes=5), "execution_timeout": timedelta(hours=3)},
    params={"tokenize": {}, "embed": {}, "index": {}},
    tags=["fm", "embeddings"],
    doc_md=__doc__,
)
def fm_embeddings_daily():
    @task(retries=0)
    def check_raw(**context) -> dict:
        from jobs import pipeline
        return pipeline.check_raw(_day(context))

    @task(outlets=[TOKENS])
    def tokenize(_raw: dict, **context) -> dict:
        from jobs import pipeline
        return pipeline.tokenize(_day(context), context["params"]["tokenize"])

    @task(outlets=[PROFILE_EMBEDDINGS, TITLE_EMBEDDINGS])
    def embed(_tok: dict, **context) -> dict:
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

    report(index(publish(validate(embed(tokenize(check_raw()))))))


fm_embeddings_daily()
