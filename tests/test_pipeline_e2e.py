"""The daily pipeline end to end on a tiny generated world, without Airflow (jobs called directly),
then the gate on corrupted tables, and the failure paths that must not publish anything."""
from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from jobs import pipeline, validate
from jobs.core.io import partition
from jobs.core.settings import Paths
from pathlib import Path


@pytest.fixture(scope="module")
def day_run(world, spark):
    """Run every step for the last generated day, as the DAG would."""
    os.environ["FMPIPE_HOME"] = str(world["paths"].home)
    results = {r["step"]: r for r in pipeline.run_all(world["days"][-1])}
    return {**world, "results": results, "day": dt.date.fromisoformat(world["days"][-1])}


def test_every_step_ran_and_counts_agree(day_run):
    r, paths, day = day_run["results"], day_run["paths"], day_run["day"]
    tok = r["tokenize"]
    assert tok["mode"] == "incremental" and tok["quarantined"] == 6
    assert tok["quarantine_reasons"] == {"missing_profile_id": 2, "unparseable_ts": 2, "unknown_action": 2}
    assert tok["raw_events"] == tok["valid_events"] + tok["quarantined"] + tok["duplicates"]
    assert tok["tokens"] < tok["valid_events"] and tok["events_per_token"] > 1.5          # watches merged
    emb = pq.read_table(partition(paths.profile_embeddings, day))
    assert emb.num_rows == tok["profiles_active"] == r["embed"]["profiles"]
    assert set(emb.column_names) >= {"profile_id", "event_timestamp", "model_version", "emb_layer1_last",
                                     "emb_layer2_last", "emb_layer2_mean"}
    titles = pq.read_table(partition(paths.title_embeddings, day))
    assert titles.num_rows == tok["vocab_titles"] and sum(titles["is_new"].to_pylist()) == 5   # released today
    manifest = json.loads((partition(paths.profile_embeddings, day) / "_manifest.json").read_text())
    assert manifest["rows"] == emb.num_rows and manifest["dim"] == 32


def test_titles_released_today_are_indexed_and_retrievable_today(day_run):
    """Day one of a title: embedded from its content, in today's serving index, found by a query
    that points at it, and its vector is the one its content predicts (not a zero row)."""
    from jobs.index import TitleIndex
    paths, day = day_run["paths"], day_run["day"]
    titles = pq.read_table(partition(paths.title_embeddings, day))
    new = [t for t, n in zip(titles["title_id"].to_pylist(), titles["is_new"].to_pylist()) if n]
    vecs = np.asarray(titles["title_embedding"].to_pylist(), np.float32)
    index = TitleIndex.current(paths)
    assert index.meta["date"] == day.isoformat() and len(new) == 5
    for t in new:
        v = vecs[titles["title_id"].to_pylist().index(t)]
        assert np.linalg.norm(v) > 0
        assert index.search(v, k=1)[0][0][0] == t


def _example(name: str):
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "docs" / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_exported_subgraph_reproduces_the_published_vectors(day_run):
    """`fmpipe export`: a ranker that loads the artefact (torch only) and reads the history table
    computes exactly the vectors the day's publication serves, every layer column."""
    from jobs import export
    paths, day = day_run["paths"], day_run["day"]
    out = export.run(export.ExportConfig(), paths)
    assert out["publication_date"] == day.isoformat() and "/export/" in out["path"]
    ex = _example("subgraph_ranker")
    ranker = ex.SubgraphRanker(out["path"])
    published = pq.read_table(partition(paths.profile_embeddings, day))
    pids = published["profile_id"].to_pylist()[:25]
    tokens, lengths = ex.history_tokens(partition(paths.history, day), pids, ranker.meta)
    got = ranker.encoder(tokens, lengths)
    rows = {p: i for i, p in enumerate(published["profile_id"].to_pylist())}
    for col, vec in zip(ranker.meta["columns"], got):
        want = np.asarray(published[col].to_pylist(), np.float32)[[rows[p] for p in pids]]
        np.testing.assert_allclose(vec.numpy(), want, atol=1e-4, rtol=1e-4)
    assert ranker(tokens, lengths, torch.zeros(len(pids), ranker.meta["dim"])).shape == (len(pids),)
    with pytest.raises(ValueError, match="format="):
        export.run(export.ExportConfig(format="onnx"), paths)


def test_status_shows_serving_model_runs_and_staleness(day_run):
    """`fmpipe status`: what serves, from which model, the day's steps and gate, nothing stale; then
    a raw day nobody tokenized shows up as stale with the command that fixes it."""
    from jobs.tools import status
    paths, day = day_run["paths"], day_run["day"]
    out = status.run(status.StatusConfig(), paths)
    assert out["serving"]["date"] == day.isoformat() and out["model"]["version"] == out["serving"]["model_version"]
    today = out["runs"][0]
    assert today["date"] == day.isoformat() and today["gate"] == "passed" and today["quarantine_rate"] > 0
    assert all(today["steps"][s] is not None for s in ("tokenize", "embed", "validate", "publish", "index"))
    assert out["stale"] == [] and "nothing stale" in status.render(out)
    late = partition(paths.raw, day + dt.timedelta(days=1))
    late.mkdir(parents=True)
    try:
        text = status.render(status.run(status.StatusConfig(), paths))
        assert f"raw data up to {day + dt.timedelta(days=1)}" in text and "fmpipe backfill" in text
    finally:
        shutil.rmtree(late)
    env = {**os.environ, "FMPIPE_HOME": str(paths.home)}
    cli = subprocess.run([str(Path(sys.executable).with_name("fmpipe")), "status", "--json"], env=env,
                         capture_output=True, text=True)
    assert cli.returncode == 0 and json.loads(cli.stdout)["serving"]["date"] == day.isoformat()


def test_gate_results_and_data_docs_are_kept(day_run):
    paths, day = day_run["paths"], day_run["day"]
    summary = json.loads((partition(paths.gx / "results", day) / "summary.json").read_text())
    assert summary["success"] and {s["suite"] for s in summary["suites"]} == {"tokens", "profile_embeddings", "title_embeddings"}
    assert (partition(paths.gx / "results", day) / "profile_embeddings.json").exists()
    assert (partition(paths.gx / "results", day) / "tokens.json").exists()
    assert summary["data_docs"] and os.path.exists(summary["data_docs"])


def test_feast_online_read_from_a_separate_process(day_run):
    """Only `feast.FeatureStore(repo_path=...)`: what a downstream ranker does."""
    paths, day = day_run["paths"], day_run["day"]
    pid = pq.read_table(partition(paths.profile_embeddings, day))["profile_id"][0].as_py()
    code = (
        "import json, sys\nfrom feast import FeatureStore\n"
        f"s = FeatureStore(repo_path={str(day_run['root'] / 'feature_repo')!r})\n"
        "r = s.get_online_features(features=['profile_embeddings:emb_layer1_last', 'profile_embeddings:emb_layer2_last',"
        " 'profile_embeddings:emb_layer2_mean', 'profile_embeddings:model_version'],"
        f" entity_rows=[{{'profile_id': {pid}}}]).to_dict()\n"
        "print(json.dumps(r))\n")
    env = {k: v for k, v in os.environ.items() if k != "FMPIPE_HOME"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    for layer in ("emb_layer1_last", "emb_layer2_last", "emb_layer2_mean"):
        vec = got[layer][0]
        assert vec is not None and len(vec) == 32 and all(isinstance(x, float) for x in vec)
        assert np.isfinite(vec).all()
    assert got["model_version"][0] == day_run["results"]["embed"]["model_version"]


def test_title_index_returns_the_query_title_first(day_run):
    from jobs.index import TitleIndex
    ix = TitleIndex.current(day_run["paths"])
    for title_id in ix.title_ids[:: max(1, len(ix.title_ids) // 25)]:
        assert ix.similar_titles(title_id, 10)[0][0] == title_id
    report = json.loads((partition(day_run["paths"].reports, day_run["day"]) / "summary.json").read_text())
    assert report["online_probe"]["dims"]["emb_layer2_last"] == 32 and len(report["index_probe"]["nearest"]) == 10


def _corrupt(paths: Paths, day, mutate) -> None:
    path = partition(paths.profile_embeddings, day) / "part-0.parquet"
    table = pq.read_table(path)
    pq.write_table(mutate(table), path)


@pytest.mark.parametrize("kind", ["nan", "short_vector", "duplicate_key", "missing_rows"])
def test_gate_blocks_bad_tables_and_names_the_expectation(day_run, kind, tmp_path):
    import shutil
    paths, day = day_run["paths"], day_run["day"]
    scratch = Paths(tmp_path / "var")
    for sub in ("history", "embeddings", "vocab", "tokens", "catalogue"):
        shutil.copytree(paths.home / sub, scratch.home / sub)

    def mutate(t: pa.Table) -> pa.Table:
        col = t["emb_layer2_last"].to_pylist()
        if kind == "nan":
            col[0] = [float("nan")] + col[0][1:]
        elif kind == "short_vector":
            col[1] = col[1][:-1]
        elif kind == "duplicate_key":
            return pa.concat_tables([t, t.slice(0, 1)])
        else:
            return t.slice(1)
        return t.set_column(t.schema.get_field_index("emb_layer2_last"), "emb_layer2_last",
                            pa.array(col, pa.list_(pa.float32())))
    _corrupt(scratch, day, mutate)
    expected = {"nan": "emb_layer2_last__nonfinite", "short_vector": "emb_layer2_last__dim",
                "duplicate_key": "expect_column_values_to_be_unique", "missing_rows": "expect_table_row_count_to_equal"}[kind]
    with pytest.raises(validate.GateFailed, match=expected):
        validate.run(validate.ValidateConfig(date=day.isoformat(), build_docs=False), scratch)
    from jobs import publish
    with pytest.raises(RuntimeError, match="validation failed"):
        publish.run(publish.PublishConfig(date=day.isoformat()), scratch)
    assert not (scratch.feast / "online.db").exists()


def test_missing_raw_partition_fails_first_step_naming_the_path(day_run):
    with pytest.raises(FileNotFoundError, match=r"raw partition missing for 2030-01-01: .*raw/dt=2030-01-01"):
        pipeline.check_raw("2030-01-01")


def test_analyst_sql_examples_run_over_the_published_tables(day_run):
    from jobs.tools import sql
    queries = sql.named_queries(sql.EXAMPLES.read_text())
    assert {"nearest_titles", "drift_per_day", "coverage_per_layer", "profile_history"} <= set(queries)
    paths = day_run["paths"]
    probe = pq.read_table(partition(paths.title_embeddings, day_run["day"]))["title_id"][3].as_py()
    near = sql.query(queries["nearest_titles"], paths, {"title": probe})
    assert near["title_id"].iloc[0] == probe and len(near) == 10
    cov = sql.query(queries["coverage_per_layer"], paths)
    assert (cov["layer2_last"] == 1.0).all()
    pid = int(pq.read_table(partition(paths.profile_embeddings, day_run["day"]))["profile_id"][0].as_py())
    assert len(sql.query(queries["profile_history"], paths, {"profile": pid})) > 0
    for name, q in queries.items():                       # every example at least binds and runs
        sql.query(q, paths, {k: None for k in ("title", "profile") if f"${k}" in q})
    with pytest.raises(ValueError, match="available views"):
        sql.query("SELECT * FROM no_such_table", paths)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_html_report_renders_in_headless_chromium(day_run, tmp_path):
    html = partition(day_run["paths"].reports, day_run["day"]) / "report.html"
    assert html.exists()
    run = lambda *a: subprocess.run([CHROMIUM, *CHROME_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *a],
                                    capture_output=True, text=True, timeout=120)
    dom = run("--dump-dom", html.as_uri()).stdout
    assert 'id="gate"' in dom and "Gate PASSED" in dom
    assert dom.count("data:image/png;base64,") == 4
    for table in ("status", "rows", "quarantine", "validation", "index", "trends"):
        assert f'id="{table}"' in dom
    assert "unparseable_ts" in dom and str(day_run["results"]["embed"]["profiles"]) in dom
    shot = tmp_path / "report.png"
    run(f"--screenshot={shot}", "--window-size=1100,2600", "--hide-scrollbars", html.as_uri())
    import matplotlib.image as mpimg
    pixels = mpimg.imread(shot)
    assert pixels.shape[0] >= 2000 and (pixels[..., :3] < 0.9).mean() > 0.01       # a page with content, not blank
