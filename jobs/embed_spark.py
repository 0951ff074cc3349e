"""The Spark-distributed engine of the embed job (``fmpipe embed engine=spark``).

Spark reads the day's history partition and keeps the profiles active on the day; ``mapInArrow``
hands each task an iterator of Arrow record batches, and the task

* loads the checkpoint **once** (safetensors + today's new-title content vectors, which the driver
  computed and verified against the vocabulary before any task started); the driver ships the
  checkpoint with the job (``SparkContext.addFile``), so workers need no shared storage,
* runs the same streaming core as the single-process engine (:func:`fm.stream.embed_batches`:
  token-budgeted length buckets, the same :class:`~fm.extract.ProfileEncoder`, the same rotation),
* yields Arrow record batches of vectors (no pandas round trip for the list columns).

Spark then adds ``event_timestamp``/``model_version`` and writes the Parquet files into the
staging directory that :func:`jobs.embed.run` swaps into place, so both engines publish the same
table under ``embeddings/profile/dt=D`` (the Feast FileSource layout). ``mapInArrow`` is used
rather than ``mapInPandas`` because list<float> columns cross the Arrow boundary without a copy.
"""
from __future__ import annotations

import datetime as dt
import functools
import itertools
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa

from fm.extract import LayerSpec

ARROW_BATCH_ROWS = 1024


def ship_checkpoint(spark, ckpt: Path) -> tuple[str, Path]:
    """Add a copy of the checkpoint to the job's files under a name unique to this run, so every
    executor fetches it from the driver (``SparkFiles``): no storage shared between the driver and
    the workers is needed. Returns (the name tasks resolve, the staged copy to remove afterwards)."""
    tmp = Path(tempfile.mkdtemp(prefix="fmpipe-ship-"))
    staged = tmp / f"ckpt-{uuid.uuid4().hex[:12]}"
    shutil.copytree(ckpt, staged, ignore=shutil.ignore_patterns("export", ".*"))
    # a cluster master accepts files and archives, not directories: ship one zip, unpacked per executor
    archive = shutil.make_archive(str(staged), "zip", root_dir=staged)
    spark.sparkContext.addArchive(archive)
    return Path(archive).name, staged


def _resolve(name: str) -> str:
    """The executor-local copy of a shipped checkpoint."""
    from pyspark import SparkFiles
    return SparkFiles.get(name)


def _embed_partition(batches: Iterator[pa.RecordBatch], *, ckpt: str, version: str, new_content: np.ndarray | None,
                     specs: tuple[LayerSpec, ...], rotations: dict[str, np.ndarray], threads: int,
                     chunk_profiles: int, batch_tokens: int, max_batch: int,
                     surfaces: tuple[str, ...] = (), heads: tuple[str, ...] = (),
                     prompts: dict[str, dict[str, np.ndarray]] | None = None,
                     device: str = "cpu") -> Iterator[pa.RecordBatch]:
    """One Spark task: load the model once, then stream this partition's record batches through it
    on ``device`` as the executor sees it ('auto': its GPU when it has one)."""
    import torch

    from fm.fit import pick_device
    from fm.stream import embed_batches
    from fm.prompts import inference_encoder
    from jobs.embed import load_for_inference

    first = next(batches, None)
    if first is None:                       # an empty partition never loads the model
        return
    torch.set_num_threads(max(1, threads))
    dev = pick_device(device)
    model = load_for_inference(_resolve(ckpt), version, new_content, device=dev)
    states = {n: {k: torch.from_numpy(v) for k, v in st.items()} for n, st in (prompts or {}).items()}
    encoder = inference_encoder(model, specs, surfaces, heads, states).to(dev)
    yield from embed_batches(encoder, itertools.chain([first], batches), chunk_profiles=chunk_profiles,
                             batch_tokens=batch_tokens, max_batch=max_batch, rotations=rotations, device=dev)


def write_profiles_spark(spark, *, source: Path, day: dt.date, ckpt: Path, version: str, new_content: np.ndarray,
                         specs: tuple[LayerSpec, ...], rotations: dict[str, np.ndarray], out: Path,
                         stamp: dt.datetime, cfg, names: list[str], surfaces: tuple[str, ...] = (),
                         heads: tuple[str, ...] = (), prompts: dict[str, dict[str, np.ndarray]] | None = None) -> None:
    """Embed the day's active profiles with Spark and write Parquet files into ``out`` (must not exist)."""
    from pyspark.sql import functions as F
    from pyspark.sql.types import ArrayType, FloatType, LongType, StructField, StructType

    from fm.schema import TOKEN_FIELDS
    from jobs.core.spark import get_spark

    spark = spark or get_spark("fmpipe-embed")
    df = (spark.read.parquet(str(source))
          .filter(F.col("last_dt") == F.lit(day))
          .select("profile_id", *TOKEN_FIELDS))
    if cfg.spark_partitions > 0:
        df = df.repartition(cfg.spark_partitions)
    out_schema = StructType([StructField("profile_id", LongType(), False)]
                            + [StructField(n, ArrayType(FloatType()), True) for n in names])
    shipped, staged = ship_checkpoint(spark, ckpt)
    fn = functools.partial(_embed_partition, ckpt=shipped, version=version,
                           new_content=new_content if len(new_content) else None, specs=tuple(specs),
                           rotations=dict(rotations), threads=cfg.spark_threads,
                           chunk_profiles=cfg.chunk_profiles, batch_tokens=cfg.batch_tokens, max_batch=cfg.batch_size,
                           surfaces=tuple(surfaces), heads=tuple(heads), prompts=dict(prompts or {}),
                           device=cfg.spark_device)
    emb = df.mapInArrow(fn, out_schema)
    emb = (emb.select(F.col("profile_id"),
                      F.lit(stamp).cast("timestamp").alias("event_timestamp"),
                      F.lit(version).alias("model_version"), *names)
           .sortWithinPartitions("profile_id"))
    key = "spark.sql.execution.arrow.maxRecordsPerBatch"
    before = spark.conf.get(key, None)
    spark.conf.set(key, str(ARROW_BATCH_ROWS))        # 10k rows of 512-token histories would be ~200 MB
    try:
        emb.write.mode("error").parquet(str(out))
    finally:
        shutil.rmtree(staged.parent, ignore_errors=True)
        if before is None:
            spark.conf.unset(key)
        else:
            spark.conf.set(key, before)
