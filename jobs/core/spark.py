"""One SparkSession per job, configured from the environment rather than code.

Local mode (``local[2]``) is the default; production points ``FMPIPE_SPARK_MASTER`` at a cluster
(``spark://host:7077``, ``yarn``, ``k8s://...``) or runs the job through ``spark-submit`` /
Airflow's ``SparkSubmitOperator``, in which case the master that spark-submit set is kept.
"""
from __future__ import annotations

import os
import sys

from pyspark.sql import SparkSession


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
