"""Shared fixtures: one local SparkSession per test session, and one tiny generated world that the
end-to-end tests build once (generate -> backfill tokenize -> train) and then run days on."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# Airflow reads its settings at import: point it at a scratch SQLite DB before anything imports it.
_SCRATCH = Path(os.environ.get("FMPIPE_TEST_SCRATCH", "/tmp")) / f"fmpipe-tests-{os.getpid()}"
os.environ.setdefault("AIRFLOW_HOME", str(_SCRATCH / "airflow"))
os.environ.setdefault("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", f"sqlite:///{_SCRATCH / 'airflow' / 'airflow.db'}")
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(Path(__file__).resolve().parents[1] / "dags")
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ["GX_ANALYTICS_ENABLED"] = "false"
os.environ["FMPIPE_HOME"] = str(_SCRATCH / "default-home")   # never the repo's var/

import logging  # noqa: E402

from jobs.core.settings import Paths  # noqa: E402

logging.getLogger("py4j").setLevel(logging.WARNING)      # its __del__ logs after pytest closed the streams

TINY = {"profiles": 150, "titles": 120, "days": 4, "new_titles_per_day": 5, "malformed_per_day": 6,
        "start": "2026-11-01", "seed": 3}


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core machine they lose a lot."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def spark():
    from jobs.core.spark import get_spark
    s = get_spark("fmpipe-tests")
    yield s
    s.stop()


@pytest.fixture
def home(tmp_path, monkeypatch) -> Paths:
    """A fresh, empty FMPIPE_HOME for one test."""
    monkeypatch.setenv("FMPIPE_HOME", str(tmp_path / "var"))
    return Paths.from_env()


@pytest.fixture(scope="session")
def world(spark, tmp_path_factory) -> dict:
    """Generated raw data, history backfilled up to the second-last day, a trained tiny model.

    The layout mimics a checkout: ``<root>/var`` is FMPIPE_HOME and ``<root>/feature_repo`` is a
    copy of the repo's Feast folder, so a separate process can open it with only FeatureStore.
    """
    from jobs.tools import generate
    from jobs import tokenize, train
    root = tmp_path_factory.mktemp("world")
    shutil.copytree(Path(__file__).resolve().parents[1] / "feature_repo", root / "feature_repo")
    paths = Paths((root / "var").resolve())
    cfg = generate.GenerateConfig(**TINY)
    generate.run(cfg, paths)
    days = sorted(p.name[3:] for p in paths.raw.glob("dt=*"))
    tokenize.run(tokenize.TokenizeConfig(date=days[-2], full=True), paths, spark)
    train.run(train.TrainJobConfig(date=days[-2], time_budget_s=8, max_epochs=4, d_model=32, max_len=64), paths)
    return {"paths": paths, "root": root, "days": days}


def two_days_left(root: Path, spark, spec: dict) -> tuple[Paths, list[str]]:
    """A fresh home under ``root`` from ``generate`` with ``spec``: history tokenized and a tiny model
    trained through the third-last day, so the last two days are left for a test to run. Returns the
    paths and every generated day. (Callers set FMPIPE_HOME to ``paths.home``.)"""
    from jobs.tools import generate
    from jobs import tokenize, train
    paths = Paths((root / "var").resolve())
    generate.run(generate.GenerateConfig(**spec), paths)
    days = sorted(p.name[3:] for p in paths.raw.glob("dt=*"))
    tokenize.run(tokenize.TokenizeConfig(date=days[-3], full=True), paths, spark)
    train.run(train.TrainJobConfig(date=days[-3], time_budget_s=5, max_epochs=2, d_model=16, max_len=32), paths)
    return paths, days


@pytest.fixture(scope="session")
def airflow_db():
    """Migrate the scratch Airflow metadata DB once (the real `airflow db migrate`)."""
    Path(os.environ["AIRFLOW_HOME"]).mkdir(parents=True, exist_ok=True)
    exe = Path(sys.executable).with_name("airflow")
    subprocess.run([str(exe), "db", "migrate"], check=True, capture_output=True, env=dict(os.environ))
    return Path(os.environ["AIRFLOW_HOME"]) / "airflow.db"


def _live_state(paths: Paths) -> dict:
    """Every live (entity, feature) value as bytes, straight from the online tables."""
    import sqlite3
    con = sqlite3.connect(paths.feast / "online.db")
    try:
        return {t: sorted(con.execute(f'SELECT entity_key, feature_name, value, event_ts FROM "{t}"').fetchall())
                for t in ("fm_embeddings_profile_embeddings", "fm_embeddings_title_embeddings")}
    finally:
        con.close()


@pytest.fixture
def live_state():
    """The online store's full live contents of a home, for byte-exact publication comparisons."""
    return _live_state

