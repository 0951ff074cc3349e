"""Head outputs and soft prompts as published features (issue 15, items 4-5): embed writes each
trained side head's class probabilities (``head_<name>``) and, per requested prompt, the profile's
view under it (``emb_prompt_<name>``) and the task's probabilities (``head_prompt_<name>``), equal
to the eager model's math, with both engines; the FM's weights are untouched; retrieve takes
``prompt=``; bad requests are refused before anything is written."""
from __future__ import annotations

import datetime as dt
import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from fm import checkpoint
from fm.extract import parse_heads, trained_heads
from fm.prompts import load_prompt
from fm.schema import HEAD_CLASSES, N_SPECIAL
from jobs.core import checksum
from jobs import embed, prompt_tune
from jobs.tools import retrieve
from jobs.core.io import partition
from jobs.core.settings import Paths
from jobs.train import current_model_dir
from test_embed import clone_world
from test_finetune_prompts import file_hash, write_labels
from test_surfaces import _Index, _Store

PROMPT = "completion"


def with_prompt(world, home: Paths, tmp_path) -> dt.date:
    """The world's model in ``home`` with a soft prompt ``completion`` tuned for it."""
    paths, day = clone_world(world, home)
    labels = tmp_path / f"labels-{home.home.parent.name}.parquet"
    write_labels(paths, day, labels)
    prompt_tune.run(prompt_tune.PromptTuneConfig(task=PROMPT, labels=str(labels), time_budget_s=2, n_tokens=2), paths)
    return day


def matrix(t, col: str) -> np.ndarray:
    return checksum.list_matrix(t[col])


def eager(home: Paths, day: dt.date, ids: np.ndarray) -> dict[str, np.ndarray]:
    """What the columns must hold, from ``FoundationModel.encode`` and the prompt task, row per id."""
    model, _, meta = checkpoint.load(current_model_dir(home))
    model.eval()
    seqs = embed.active_profiles(home, day)
    rows = np.searchsorted(seqs.profile_id, ids) if np.all(np.diff(seqs.profile_id) > 0) else \
        np.array([int(np.flatnonzero(seqs.profile_id == i)[0]) for i in ids])
    b = seqs.batch(rows, model.cfg.max_len)
    at = torch.arange(len(rows))
    task, _ = load_prompt(model, current_model_dir(home) / "prompts" / PROMPT, meta["model_version"])
    with torch.no_grad():
        last = model.encode(b.tokens)[-1][at, b.lengths - 1]
        out = {f"head_{h}": torch.softmax(model.head(h, last)[:, N_SPECIAL:], -1).numpy() for h in trained_heads(model.cfg)}
        view = model.encode(b.tokens, prefix=task.prompt)[-1][at, b.lengths - 1]
        out["emb_prompt_completion"] = view.numpy()
        out["p"] = torch.sigmoid(task.readout(view)).squeeze(-1).numpy()
    return out


def test_embed_publishes_head_probabilities_and_prompt_views(world, home, tmp_path, one_thread):
    day = with_prompt(world, home, tmp_path)
    weights = file_hash(current_model_dir(home) / checkpoint.WEIGHTS)
    out = embed.run(embed.EmbedConfig(date=day.isoformat(), prompts=PROMPT), home)
    pdir = partition(home.profile_embeddings, day)
    manifest = json.loads((pdir / "_manifest.json").read_text())
    model, _, _ = checkpoint.load(current_model_dir(home))
    heads = trained_heads(model.cfg)
    assert heads and set(manifest["heads"]) == set(heads) == set(out["heads"])
    assert manifest["prompts"] == {PROMPT: {"column": "emb_prompt_completion", "score": "head_prompt_completion",
                                            "classes": ["no", "yes"]}}
    t = pq.read_table(pdir).sort_by("profile_id")
    want = eager(home, day, t["profile_id"].to_numpy())
    for h in heads:
        col = manifest["heads"][h]["column"]
        got = matrix(t, col)
        assert manifest["heads"][h]["classes"] == list(HEAD_CLASSES[h]) and got.shape[1] == manifest["dims"][col]
        np.testing.assert_allclose(got.sum(1), 1.0, atol=1e-5)
        np.testing.assert_allclose(got, want[col], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(matrix(t, "emb_prompt_completion"), want["emb_prompt_completion"], rtol=1e-4, atol=1e-4)
    score = matrix(t, "head_prompt_completion")
    np.testing.assert_allclose(score[:, 1], want["p"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(score.sum(1), 1.0, atol=1e-6)
    assert not np.allclose(matrix(t, "emb_prompt_completion"), matrix(t, "emb_layer2_last"))   # the prompt matters
    cols = manifest["checksum_columns"]
    assert cols == t.column_names[3:] and set(cols) == set(manifest["dims"])
    assert checksum.table_checksum(pdir, "profile_id", cols) == (manifest["rows"], manifest["checksum"])
    assert file_hash(current_model_dir(home) / checkpoint.WEIGHTS) == weights                  # swapped in, not trained

    # refused before writing: an unknown prompt, a head the model never trained; and heads can be turned off
    before = (pdir / "_manifest.json").read_bytes()
    with pytest.raises(FileNotFoundError, match=r"prompt 'buy'.*has \['completion'\]"):
        embed.run(embed.EmbedConfig(date=day.isoformat(), prompts="buy"), home)
    with pytest.raises(ValueError, match="unknown head"):
        embed.run(embed.EmbedConfig(date=day.isoformat(), heads="mood"), home)
    assert (pdir / "_manifest.json").read_bytes() == before
    embed.run(embed.EmbedConfig(date=day.isoformat(), heads="none"), home)
    names = pq.read_schema(next(pdir.glob("*.parquet"))).names
    assert not [n for n in names if n.startswith(("head_", "emb_prompt_"))]


def test_heads_are_parsed_against_what_the_model_trained():
    from fm.model import ModelConfig
    cfg = ModelConfig(n_titles=10, w_device=0.0)
    assert parse_heads("auto", cfg) == ("action", "duration") and parse_heads("none", cfg) == ()
    assert parse_heads("device,action", ModelConfig(n_titles=10)) == ("device", "action")
    with pytest.raises(ValueError, match=r"\['device'\] were not trained"):
        parse_heads("device", cfg)


def test_spark_engine_publishes_the_same_heads_and_prompt_views(world, home, spark, tmp_path, one_thread):
    day = with_prompt(world, home, tmp_path)
    embed.run(embed.EmbedConfig(date=day.isoformat(), prompts=PROMPT), home)
    lt = pq.read_table(partition(home.profile_embeddings, day)).sort_by("profile_id")
    other = Paths((tmp_path / "spark-home").resolve())
    clone_world(world, other)                            # the same prompt (tuning is timed: never twice)
    shutil.copytree(current_model_dir(home) / "prompts", current_model_dir(other) / "prompts")
    embed.run(embed.EmbedConfig(date=day.isoformat(), prompts=PROMPT, engine="spark"), other, spark)
    st = pq.read_table(partition(other.profile_embeddings, day)).sort_by("profile_id")
    cols = [c for c in lt.column_names if c.startswith(("head_", "emb_prompt_"))]
    assert len(cols) >= 3 and set(cols) <= set(st.column_names)
    for c in cols:
        np.testing.assert_allclose(matrix(st, c), matrix(lt, c), rtol=1e-4, atol=1e-5)


def test_retrieve_uses_the_prompt_view_and_reports_the_task_probability(world, home, tmp_path, one_thread):
    day = with_prompt(world, home, tmp_path)
    embed.run(embed.EmbedConfig(date=day.isoformat(), prompts=PROMPT), home)
    t = pq.read_table(partition(home.profile_embeddings, day))
    tt = pq.read_table(partition(home.title_embeddings, day))
    titles, tids = matrix(tt, "title_embedding"), tt["title_id"].to_pylist()
    pid = int(t["profile_id"][0].as_py())
    store, index = _Store(t), _Index(day, "v", titles, tids)
    got = retrieve.retrieve(home, pid, k=5, exclude_finished=False, store=store, index=index, prompt=PROMPT)
    assert "profile_embeddings:emb_prompt_completion" in store.asked and got["prompt"] == PROMPT
    q = matrix(t, "emb_prompt_completion")[0]
    assert [x["title_id"] for x in got["titles"]] == [tids[i] for i in np.argsort(-(titles @ q))[:5]]
    assert got["task_probability"] == pytest.approx(float(matrix(t, "head_prompt_completion")[0, 1]), abs=1e-6)
    with pytest.raises(ValueError, match="available prompts: completion"):
        retrieve.retrieve(home, pid, k=5, exclude_finished=False, store=store, index=index, prompt="buy")
    with pytest.raises(ValueError, match="ask for one of them"):
        retrieve.RetrieveConfig(profile_id=pid, surface="kids", prompt=PROMPT)
