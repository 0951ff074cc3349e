"""One SparkSession per job, configured from the environment rather than code.

Local mode (``local[2]``) is the default; production points ``FMPIPE_SPARK_MASTER`` at a cluster
(``spark://host:7077``, ``yarn``, ``k8s://...``) or runs the job through ``spark-submit`` /
Airflow's ``SparkSubmitOperator``, in which case the master that spark-submit set is kept. The
partition writers live here too: every Spark output is staged beside its target and swapped in.
"""
from __future__ import annotations

import datetime as dt
import os
import shutil
import sys
from pathlib import Path

from pyspark.sql import DataFrame, SparkSession

from jobs.core.io import partition, swap_dir, temp_sibling


def submitted() -> bool:
    """True when spark-submit started this Python process (it hands over its JVM through
    ``PYSPARK_GATEWAY_PORT``): the master, deploy mode and ``--conf`` values are then spark-submit's."""
    return "PYSPARK_GATEWAY_PORT" in os.environ or "spark.master" in os.environ.get("PYSPARK_SUBMIT_ARGS", "")


# part of the tables' contract (hour-of-day tokens, timestamp type): set even under spark-submit
CONTRACT = {"spark.sql.session.timeZone": "UTC", "spark.sql.parquet.outputTimestampType": "TIMESTAMP_MICROS"}


def _defaults() -> dict[str, str]:
    """Tunables: under spark-submit, whatever its ``--conf`` set wins."""
    return {
        "spark.sql.shuffle.partitions": os.environ.get("FMPIPE_SPARK_SHUFFLE_PARTITIONS", "4"),
        "spark.ui.enabled": "false",
        "spark.ui.showConsoleProgress": "false",
        "spark.sql.adaptive.enabled": "true",
        "spark.driver.memory": os.environ.get("FMPIPE_SPARK_DRIVER_MEMORY", "4g"),
    }


def get_spark(app: str = "fmpipe") -> SparkSession:
    """Return the active session or build one. Workers must use this interpreter (torch lives here).

    Under spark-submit our defaults only fill in what spark-submit's ``--conf`` left unset, and the
    master is never overridden; otherwise the master is ``FMPIPE_SPARK_MASTER`` (``local[2]``).
    """
    active = SparkSession.getActiveSession()
    if active is not None:
        return active
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    if submitted():
        spark = SparkSession.builder.appName(app).getOrCreate()
        given = spark.sparkContext.getConf()
        for key, value in _defaults().items():
            if not given.contains(key) and not key.startswith(("spark.ui.", "spark.driver.")):
                spark.conf.set(key, value)           # runtime SQL settings only; the rest is fixed at launch
        for key, value in CONTRACT.items():
            spark.conf.set(key, value)
    else:
        builder = SparkSession.builder.appName(app).master(os.environ.get("FMPIPE_SPARK_MASTER", "local[2]"))
        for key, value in {**_defaults(), **CONTRACT}.items():
            builder = builder.config(key, value)
        spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    return spark


def write_partition(df: DataFrame, final: Path, sort_by: tuple[str, ...] = (),
                    options: dict[str, str] | None = None) -> None:
    """Write a DataFrame aside, then swap it in as ``final`` (idempotent per date).

    One file per (adaptively coalesced) partition, rows sorted inside each file: a local sort and no
    ``coalesce(1)``, which would squeeze every upstream stage into a single task. ``options``: Parquet
    writer options (e.g. row-group bounds).
    """
    staging = temp_sibling(final)
    out = df.sortWithinPartitions(*sort_by) if sort_by else df
    out.write.mode("overwrite").options(**(options or {})).parquet(str(staging))
    swap_dir(staging, final)


def write_days(df: DataFrame, root: Path, days: list[dt.date], sort_by: tuple[str, ...] = ()) -> None:
    """Write many ``dt`` partitions in one Spark job, then swap each into place.

    A day without rows loses its old partition, so a rebuild never leaves stale rows behind.
    """
    staging = temp_sibling(root)
    df.repartition("dt").sortWithinPartitions("dt", *sort_by).write.partitionBy("dt").parquet(str(staging))
    for d in days:
        part = partition(staging, d)
        if part.exists():
            swap_dir(part, partition(root, d))
        elif partition(root, d).exists():
            shutil.rmtree(partition(root, d))
    shutil.rmtree(staging, ignore_errors=True)
