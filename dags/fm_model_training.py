"""Model DAGs: daily fine-tune (triggered by fresh tokens) and monthly pretraining from scratch.

Both train a candidate checkpoint and let the evaluation gate in ``jobs/train.py`` decide whether
it becomes ``models/CURRENT.json``; the next ``fm_embeddings_daily`` run embeds with whatever is
current. Wiring only: the work is in ``jobs.pipeline.finetune`` / ``jobs.pipeline.pretrain``.
"""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

from airflow.sdk import Asset, dag, task
from airflow.timetables.interval import CronDataIntervalTimetable

TOKENS = Asset("fmpipe://tokens")
MODEL = Asset("fmpipe://models/current")


@dag(
    dag_id="fm_finetune_daily",
    schedule=[TOKENS],
    start_date=datetime(2026, 1, 1, tzinfo=timezone.utc),
    catchup=False,
    max_active_runs=1,
    default_args={"retries": 1, "retry_delay": timedelta(minutes=10), "execution_timeout": timedelta(hours=2)},
    params={"train": {}},
    tags=["fm", "training"],
    doc_md=__doc__,
)
def fm_finetune_daily():
    @task(outlets=[MODEL])
    def finetune(**context) -> dict:
        from jobs import pipeline
        return pipeline.finetune(None, context["params"]["train"])

    finetune()


@dag(
    dag_id="fm_pretrain_monthly",
    schedule=CronDataIntervalTimetable("0 4 1 * *", timezone="UTC"),
    start_date=datetime(2026, 1, 1, tzinfo=timezone.utc),
    catchup=False,
    max_active_runs=1,
    default_args={"retries": 1, "retry_delay": timedelta(minutes=30), "execution_timeout": timedelta(hours=12)},
    params={"train": {}},
    tags=["fm", "training"],
    doc_md=__doc__,
)
def fm_pretrain_monthly():
    @task(outlets=[MODEL])
    def pretrain(**context) -> dict:
        from jobs import pipeline
        return pipeline.pretrain(pipeline.latest_history_date(context["data_interval_end"].date().isoformat()),
                                 context["params"]["train"])

    pretrain()


fm_finetune_daily()
fm_pretrain_monthly()
