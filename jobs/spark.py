"""One SparkSession per job, configured from the environment rather than code.

Local mode (``local[2]``) is the default; production points ``FMPIPE_SPARK_MASTER`` at a cluster
(``spark://host:7077``, ``yarn``, ``k8s://...``) or runs the job through ``spark-submit`` /
Airflow's ``SparkSubmitOperator``, in which case the master that spark-submit set is kept.
"""
from __future__ import annotations

import os
import sys

from pyspark.sql import SparkSession


def get_spark(app: str = "fmpipe") -> SparkSession:
    """Return the active session or build one. Workers must use this interpreter (torch lives here)."""
    active = SparkSession.getActiveSession()
    if active is not None:
        return active
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    builder = (
        SparkSession.builder.appName(app)
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.sql.shuffle.partitions", os.environ.get("FMPIPE_SPARK_SHUFFLE_PARTITIONS", "4"))
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.sql.adaptive.enabled", "true")
        .config("spark.driver.memory", os.environ.get("FMPIPE_SPARK_DRIVER_MEMORY", "4g"))
        .config("spark.sql.parquet.outputTimestampType", "TIMESTAMP_MICROS")
    )
    if "spark.master" not in os.environ.get("PYSPARK_SUBMIT_ARGS", "") and not os.environ.get("SPARK_SUBMITTED"):
        builder = builder.master(os.environ.get("FMPIPE_SPARK_MASTER", "local[2]"))
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    return spark
