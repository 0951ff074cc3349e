"""Fine-tuning grows the vocabulary and trains on the new days; the evaluation gate decides promotion."""
from __future__ import annotations

import json

import pytest

from fm import checkpoint
from jobs import tokenize, train
from jobs.core.io import partition


@pytest.fixture
def last_day(world, spark):
    paths, day = world["paths"], world["days"][-1]
    if not partition(paths.history, __import__("datetime").date.fromisoformat(day)).exists():
        tokenize.run(tokenize.TokenizeConfig(date=day), paths, spark)
    pointer = paths.models / "CURRENT.json"
    saved = pointer.read_text()
    yield paths, day
    pointer.write_text(saved)                        # leave the shared world's serving model as it was


def test_finetune_grows_vocab_and_gate_blocks_a_worse_candidate(last_day):
    paths, day = last_day
    parent = json.loads((paths.models / "CURRENT.json").read_text())["version"]
    parent_meta = checkpoint.read_meta(paths.models / parent)
    out = train.run(train.TrainJobConfig(date=day, init="current", promote="if_better", min_ratio=100.0,
                                         time_budget_s=3, max_epochs=1, d_model=32, max_len=64), paths)
    assert not out["promoted"] and "needs >= 100.00x" in out["gate"]["reason"]
    assert json.loads((paths.models / "CURRENT.json").read_text())["version"] == parent
    meta = checkpoint.read_meta(paths.models / out["model_version"])
    assert meta["parent"] == parent and meta["vocab_size"] == parent_meta["vocab_size"] + 5
    assert 0 < meta["data_range"]["profiles_trained"]
    assert out["gate"]["candidate"]["users"] == out["gate"]["current"]["users"] > 0


def test_gate_promotes_a_good_enough_candidate_and_refuses_stale_data(last_day):
    paths, day = last_day
    out = train.run(train.TrainJobConfig(date=day, init="current", promote="if_better", min_ratio=0.0,
                                         time_budget_s=3, max_epochs=1, d_model=32, max_len=64), paths)
    assert out["promoted"]
    assert json.loads((paths.models / "CURRENT.json").read_text())["version"] == out["model_version"]
    with pytest.raises(ValueError, match="already trained on history up to"):
        train.run(train.TrainJobConfig(date=day, init="current", time_budget_s=1, d_model=32, max_len=64), paths)
    with pytest.raises(ValueError, match="init must be"):
        train.run(train.TrainJobConfig(date=day, init="warm"), paths)
