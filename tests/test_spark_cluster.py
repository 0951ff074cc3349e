"""The distributed path for real: a Spark standalone master and one worker, started as separate
processes from the pip-installed Spark, run ``tokenize`` and ``embed engine=spark`` for a day; the
tables equal local mode's, and the checkpoint reaches the executor through ``SparkFiles`` (the
worker's own application folder holds its copy), not through a path shared with the driver."""
from __future__ import annotations

import datetime as dt
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from jobs import embed, tokenize
from jobs.core.io import partition
from jobs.core.settings import Paths

DRIVER = """
import sys
from jobs import embed, tokenize
from jobs.core.settings import Paths
from pathlib import Path
paths, day = Paths(Path(sys.argv[1])), sys.argv[2]
tokenize.run(tokenize.TokenizeConfig(date=day), paths)
out = embed.run(embed.EmbedConfig(date=day, engine="spark", spark_partitions=2), paths)
from jobs.core.spark import get_spark
print("MASTER", get_spark().sparkContext.master, "ROWS", out["profiles"])
"""


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(path: Path, text: str, timeout: float = 90.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        time.sleep(0.5)
    raise TimeoutError(f"{text!r} not in {path} after {timeout:.0f} s:\n{path.read_text(errors='replace')[-2000:]}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    import pyspark
    root = tmp_path_factory.mktemp("spark-cluster")
    spark_home = Path(pyspark.__file__).parent
    env = {**os.environ, "SPARK_HOME": str(spark_home), "SPARK_LOCAL_IP": "127.0.0.1",
           "SPARK_WORKER_DIR": str(root / "work"), "SPARK_LOG_DIR": str(root / "logs")}
    cls = str(spark_home / "bin" / "spark-class")
    port = _port()
    url = f"spark://127.0.0.1:{port}"
    logs = {n: open(root / f"{n}.log", "w") for n in ("master", "worker")}
    master = subprocess.Popen([cls, "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1", "--port", str(port),
                               "--webui-port", str(_port())], env=env, stdout=logs["master"], stderr=subprocess.STDOUT)
    worker = subprocess.Popen([cls, "org.apache.spark.deploy.worker.Worker", "--cores", "1", "--memory", "1g",
                               "--webui-port", str(_port()), url], env=env, stdout=logs["worker"], stderr=subprocess.STDOUT)
    try:
        _wait_for(root / "worker.log", "Successfully registered with master")
        yield {"url": url, "work": root / "work", "env": env}
    finally:
        for p in (worker, master):
            p.terminate()
        for p in (worker, master):
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        for f in logs.values():
            f.close()


@pytest.fixture(scope="module")
def own_world(spark, tmp_path_factory) -> dict:
    """A small world of this test's own (the shared one is changed by other tests' publications):
    generated, tokenized up to the second-last day, a tiny model trained."""
    from jobs.tools import generate
    from jobs import train
    from conftest import TINY
    paths = Paths(tmp_path_factory.mktemp("cluster-world") / "var")
    generate.run(generate.GenerateConfig(**TINY), paths)
    days = sorted(p.name[3:] for p in paths.raw.glob("dt=*"))
    tokenize.run(tokenize.TokenizeConfig(date=days[-2], full=True), paths, spark)
    train.run(train.TrainJobConfig(date=days[-2], time_budget_s=4, max_epochs=2, d_model=32, max_len=64), paths)
    return {"paths": paths, "days": days}


def _clone(world, dst: Path) -> Paths:
    shutil.copytree(world["paths"].home, dst)
    return Paths(dst)


def test_tokenize_and_embed_on_a_standalone_cluster_equal_local_mode(own_world, spark, cluster, tmp_path):
    day = own_world["days"][-1]
    remote, local = _clone(own_world, tmp_path / "remote"), _clone(own_world, tmp_path / "local")
    env = {**cluster["env"], "FMPIPE_SPARK_MASTER": cluster["url"], "FMPIPE_HOME": str(remote.home),
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    run = subprocess.run([sys.executable, "-c", DRIVER, str(remote.home), day], env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"MASTER {cluster['url']}" in run.stdout
    tokenize.run(tokenize.TokenizeConfig(date=day), local, spark)
    embed.run(embed.EmbedConfig(date=day, engine="local"), local)
    d = dt.date.fromisoformat(day)
    for table in ("tokens", "history"):
        a = pq.read_table(partition(getattr(remote, table), d)).sort_by("profile_id").to_pylist()
        b = pq.read_table(partition(getattr(local, table), d)).sort_by("profile_id").to_pylist()
        assert a == b, table
    a = pq.read_table(partition(remote.profile_embeddings, d)).sort_by("profile_id")
    b = pq.read_table(partition(local.profile_embeddings, d)).sort_by("profile_id")
    assert a["profile_id"].to_pylist() == b["profile_id"].to_pylist() and a.num_rows > 0
    for col in ("emb_layer1_last", "emb_layer2_last", "emb_layer2_mean"):
        np.testing.assert_allclose(np.asarray(a[col].to_pylist()), np.asarray(b[col].to_pylist()), atol=1e-5)
    shipped = list(cluster["work"].rglob("ckpt-*.zip/model.safetensors")) + \
        list(cluster["work"].rglob("ckpt-*/model.safetensors"))
    assert shipped, f"no shipped checkpoint under {cluster['work']}: {sorted(p.name for p in cluster['work'].rglob('*'))[:30]}"
