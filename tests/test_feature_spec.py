"""Features follow the model (issue 17): the profile feature view's layer columns are derived from
what the embed job wrote, so a non-default ``layers`` selection of a 3-layer model publishes all its
columns, readable through Feast from a separate process; the services use the deepest layer."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fm.schema import profile_embedding_schema, title_embedding_schema
from jobs.core import feature_spec
from jobs.embed import published_at
from jobs.core.io import atomic_write_json, partition
from jobs.core.settings import REPO_ROOT, Paths
from test_publish import D1, TITLES, run_publish, validated

LAYERS = ["emb_layer1_mean", "emb_layer3_last", "emb_layer3_mean"]      # not the default, and a deeper model
DIM = 8


def write_custom_day(paths: Paths, pids: list[int], extra: dict[str, int] | None = None,
                     sections: dict | None = None) -> dict[str, np.ndarray]:
    """One day as embed writes it for ``layers=1:mean,3:last,3:mean``: profile + title partitions,
    the profile ``_manifest.json`` with layers and dims, and a passed gate bound to them."""
    rng = np.random.default_rng(5)
    stamp, n = published_at(D1), len(pids)
    vecs = {name: rng.standard_normal((n, DIM)).astype(np.float32) for name in LAYERS}
    vecs.update({name: rng.dirichlet(np.ones(d), n).astype(np.float32) for name, d in (extra or {}).items()})
    as_list = lambda v: pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1)), v.shape[1]).cast(pa.list_(pa.float32()))  # noqa: E731
    cols = {"profile_id": pa.array(pids, pa.int64()), "event_timestamp": pa.array([stamp] * n, pa.timestamp("us", tz="UTC")),
            "model_version": pa.array(["deep3"] * n), **{name: as_list(v) for name, v in vecs.items()}}
    part = partition(paths.profile_embeddings, D1)
    part.mkdir(parents=True)
    pq.write_table(pa.table(cols, schema=profile_embedding_schema(list(vecs))), part / "part-0.parquet")
    atomic_write_json({"table": "profile", "layers": LAYERS, "dims": {name: v.shape[1] for name, v in vecs.items()},
                       "model_version": "deep3", "rows": n, **(sections or {})}, part / "_manifest.json")
    tpart = partition(paths.title_embeddings, D1)
    tpart.mkdir(parents=True)
    pq.write_table(pa.table({"title_id": [f"t{i:03d}" for i in range(TITLES)], "event_timestamp": [stamp] * TITLES,
                             "model_version": ["deep3"] * TITLES, "is_new": [False] * TITLES,
                             "title_embedding": as_list(rng.standard_normal((TITLES, DIM)).astype(np.float32))},
                            schema=title_embedding_schema()), tpart / "part-0.parquet")
    validated(paths, D1)
    return vecs


READER = """
import json, sys
from jobs.core.feast_store import get_store
store = get_store(__import__("jobs.core.settings", fromlist=["Paths"]).Paths.from_env())
got = store.get_online_features(features=[f"profile_embeddings:{c}" for c in json.loads(sys.argv[1])],
                                entity_rows=[{"profile_id": 7}]).to_dict()
svc = store.get_online_features(features=store.get_feature_service("retrieval_v1"), entity_rows=[{"profile_id": 7}]).to_dict()
print(json.dumps({"got": got, "retrieval": sorted(k for k in svc if k != "profile_id")}))
"""


def test_a_non_default_layer_selection_publishes_every_column(tmp_path, monkeypatch):
    paths = Paths(tmp_path / "var")
    monkeypatch.setenv("FMPIPE_HOME", str(paths.home))
    vecs = write_custom_day(paths, list(range(20)))
    r = run_publish(paths, D1, with_index=False)
    assert r["applied"] and r["materialized_rows"]["profile"] == 20
    assert feature_spec.load(paths.home)["layers"] == LAYERS
    from jobs.core.feast_store import get_store
    fv = get_store(paths).get_feature_view("profile_embeddings")
    assert [f.name for f in fv.features] == LAYERS + ["model_version"]
    assert f"dimension = {DIM}" in fv.features[1].description and fv.tags["model_version"] == "deep3"

    env = {**os.environ, "FMPIPE_HOME": str(paths.home), "PYTHONPATH": str(REPO_ROOT)}
    out = subprocess.run([sys.executable, "-c", READER, json.dumps(LAYERS)], env=env, cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    for name in LAYERS:
        np.testing.assert_array_equal(np.array(got["got"][name][0], np.float32), vecs[name][7])
    assert got["retrieval"] == ["emb_layer3_last", "model_version"]     # the deepest layer's 'last' column

    assert run_publish(paths, D1, with_index=False)["applied"] is False   # same layers: no re-apply


def test_head_probabilities_and_prompt_views_are_declared_and_served(tmp_path, monkeypatch):
    """A day with a side head and a soft prompt (fmpipe embed heads=auto prompts=buy): the profile
    view declares their columns with the class order, ranker_v2 serves the head, and a separate
    process reads them back from the online store."""
    from fm.schema import ACTIONS
    paths = Paths(tmp_path / "var")
    monkeypatch.setenv("FMPIPE_HOME", str(paths.home))
    extra = {"head_action": len(ACTIONS), "emb_prompt_buy": DIM, "head_prompt_buy": 2}
    sections = {"heads": {"action": {"column": "head_action", "classes": list(ACTIONS)}},
                "prompts": {"buy": {"column": "emb_prompt_buy", "score": "head_prompt_buy", "classes": ["no", "yes"]}}}
    vecs = write_custom_day(paths, list(range(20)), extra, sections)
    assert run_publish(paths, D1, with_index=False)["applied"]
    from jobs.core.feast_store import get_store
    store = get_store(paths)
    fields = {f.name: f for f in store.get_feature_view("profile_embeddings").features}
    assert list(fields) == LAYERS + list(extra) + ["model_version"]
    assert "impression, play, pause" in fields["head_action"].description
    assert "'buy' soft prompt" in fields["emb_prompt_buy"].description
    v2 = [f.name for p in store.get_feature_service("ranker_v2").feature_view_projections for f in p.features]
    v1 = [f.name for p in store.get_feature_service("ranker_v1").feature_view_projections for f in p.features]
    assert "head_action" in v2 and "head_action" not in v1

    env = {**os.environ, "FMPIPE_HOME": str(paths.home), "PYTHONPATH": str(REPO_ROOT)}
    out = subprocess.run([sys.executable, "-c", READER, json.dumps(list(extra))], env=env, cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])["got"]
    for name in extra:
        np.testing.assert_array_equal(np.array(got[name][0], np.float32), vecs[name][7])


def test_feast_cli_plan_is_clean_after_publish_and_names_the_pinned_service(tmp_path):
    """The repo as a user runs it (`feast plan` / `feast apply` in feature_repo/ beside var/): after
    a publish, the CLI finds the registry exactly as the pipeline applied it, including the
    service pinned to the published model version."""
    import shutil
    root = tmp_path / "checkout"
    shutil.copytree(REPO_ROOT / "feature_repo", root / "feature_repo")
    paths = Paths((root / "var").resolve())
    env = {**os.environ, "FMPIPE_HOME": str(paths.home), "PYTHONPATH": str(REPO_ROOT)}
    old = os.environ.get("FMPIPE_HOME")
    os.environ["FMPIPE_HOME"] = str(paths.home)
    try:
        write_custom_day(paths, list(range(20)))
        assert run_publish(paths, D1, with_index=False)["applied"]
    finally:
        os.environ.pop("FMPIPE_HOME") if old is None else os.environ.__setitem__("FMPIPE_HOME", old)
    feast = [str(REPO_ROOT / ".venv" / "bin" / "feast")] if (REPO_ROOT / ".venv" / "bin" / "feast").exists() else \
        [sys.executable, "-m", "feast.cli.cli"]
    for cmd in ("plan", "apply"):
        out = subprocess.run([*feast, cmd], cwd=root / "feature_repo", env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        assert "No changes to registry" in out.stdout, out.stdout[-2000:]
    from jobs.core.feast_store import get_store
    names = {s.name for s in get_store(paths).list_feature_services()}
    assert {"ranker_v1", "ranker_v2", "retrieval_v1", "ranker_deep3"} <= names
