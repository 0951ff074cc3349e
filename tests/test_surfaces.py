"""Surface-conditioned output (issue 15, item 1): a model asked "what next on this canvas" learns
per-canvas behaviour planted by the generator, embed publishes one vector per configured surface,
retrieve takes ``surface=``, and a model without surfaces is exactly the model it was before."""
from __future__ import annotations

import datetime as dt
import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from fm import checkpoint
from fm.data import Sequences
from fm.fit import FitConfig, fit
from fm.losses import Objective
from fm.model import FoundationModel, ModelConfig, init_weights
from fm.recipe import Recipe, model_config
from fm.schema import ACTION_STRENGTH, ACTIONS, CANVASES, DEVICES, N_SPECIAL, NO_DURATION, OOV, TOKEN_FIELDS, vocab_index
from jobs.core import checksum
from jobs import embed
from jobs.tools import generate, retrieve
from jobs.core.io import partition
from jobs.core.settings import Paths
from jobs.train import current_model_dir
from test_embed import clone_world

CANVAS = vocab_index(CANVASES)


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def tiny(surfaces=(), n_titles=30, **kw) -> FoundationModel:
    torch.manual_seed(0)
    m = FoundationModel(ModelConfig(n_titles=n_titles, content_dim=8, d_model=16, n_layers=2, n_heads=2,
                                    max_len=16, dropout=0.0, surfaces=tuple(surfaces), **kw))
    init_weights(m, zero_fields=False)
    m.title.content.copy_(torch.randn(n_titles, 8))
    return m.eval()


def fixed_tokens(m: FoundationModel) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    toks = {f: torch.randint(N_SPECIAL, n, (3, 10), generator=g) for f, n in m.cfg.field_sizes.items()}
    toks["title"] = torch.randint(N_SPECIAL, m.cfg.n_titles, (3, 10), generator=g)
    return toks


def generated_world(**kw) -> tuple[pa.Table, pa.Table, np.ndarray]:
    """Raw events of a few days with planted canvas behaviour, in memory: (events, catalogue, kids mask)."""
    cfg = generate.GenerateConfig(canvas_behaviour=True, **kw)
    rng = np.random.default_rng(cfg.seed)
    cat = generate._catalogue(cfg, rng)
    world = generate._World(cfg, cat, rng)
    start = dt.date.fromisoformat(cfg.start)
    days = [generate._day_table(world, start + dt.timedelta(days=d), cfg, rng) for d in range(cfg.days)]
    return pa.concat_tables(days), cat, world.kids_title


def sequences(events: pa.Table, n_catalogue: int) -> Sequences:
    """A minimal tokenizer (title i -> id N_SPECIAL + i; adjacent events of a profile on one title
    merge into one token with the strongest action, as ``jobs.tokenize`` does): enough for the model."""
    pid = events["profile_id"].to_numpy()
    order = np.lexsort((np.arange(len(pid)), events["ts"].to_numpy(zero_copy_only=False), pid))
    pid = pid[order]
    col = {c: np.asarray(events[c].to_pylist(), object)[order] for c in ("title_id", "action", "device", "canvas")}
    title = np.array([N_SPECIAL + int(t[1:]) for t in col["title_id"]], np.int32)
    start = np.r_[True, (pid[1:] != pid[:-1]) | (title[1:] != title[:-1])]
    group = np.cumsum(start) - 1
    strength = np.array([ACTION_STRENGTH[a] for a in col["action"]])
    best = np.full(group[-1] + 1, -1)
    np.maximum.at(best, group, strength)
    first = np.flatnonzero(start)
    strongest: dict[int, str] = {}
    for g, a in zip(group, col["action"]):
        if ACTION_STRENGTH[a] == best[g]:
            strongest.setdefault(g, a)
    action = [strongest[g] for g in range(len(first))]
    vals = {f: np.full(len(first), OOV, np.int32) for f in TOKEN_FIELDS}
    vals["title"], vals["duration"][:] = title[first], NO_DURATION
    for field, values, vocab in (("action", action, ACTIONS), ("device", col["device"][first], DEVICES),
                                 ("canvas", col["canvas"][first], CANVASES)):
        index = vocab_index(vocab)
        vals[field] = np.array([index[x] for x in values], np.int32)
    ids, counts = np.unique(pid[first], return_counts=True)
    assert vals["title"].max() < N_SPECIAL + n_catalogue
    return Sequences(ids.astype(np.int64), np.concatenate([[0], np.cumsum(counts)]).astype(np.int64), vals)


def kids_share_top10(model: FoundationModel, seqs: Sequences, kids: np.ndarray, surface: str) -> float:
    """Share of kids-only titles in each profile's top 10 when asked for ``surface``."""
    b = seqs.batch(np.arange(len(seqs)), model.cfg.max_len)
    with torch.no_grad():
        h = model.encode(b.tokens)[-1]
        last = h[torch.arange(len(seqs)), b.lengths - 1].unsqueeze(1)
        s = torch.full((len(seqs), 1), CANVAS[surface])
        top = model.title_logits(last, 0, s)[:, 0].topk(10, dim=1).indices.numpy()
    return float(kids[top - N_SPECIAL].mean())


# ------------------------------------------------------------------------------------------------
# the model
# ------------------------------------------------------------------------------------------------
def test_a_model_without_surfaces_is_unchanged():
    """Same config, same parameters and the same numbers as before surfaces existed (values computed
    with the previous fm/model.py and fm/losses.py); a zero-initialised surface model starts equal."""
    m = tiny(mtp_k=2, title_bias=True)
    assert "surfaces" not in m.cfg.to_dict() and not any(k.startswith("surface") for k in m.state_dict())
    assert ModelConfig.from_dict(m.cfg.to_dict()) == m.cfg
    toks, valid = fixed_tokens(m), torch.ones(3, 10, dtype=torch.bool)
    got = []
    for neg in (0, 8):
        torch.manual_seed(2)
        got.append(float(Objective(m, n_negatives=neg)(toks, valid)[0].detach()))
    with torch.no_grad():
        got.append(float(m.title_logits(m.encode(toks)[-1], 0)[..., N_SPECIAL:].sum()))
    np.testing.assert_allclose(got, [6.4995293617248535, 4.822489261627197, 76.82113647460938], rtol=1e-6)

    s = tiny(("home", "kids"), mtp_k=2, title_bias=True)
    assert s.cfg.to_dict()["surfaces"] == ["home", "kids"]
    assert ModelConfig.from_dict(json.loads(json.dumps(s.cfg.to_dict()))) == s.cfg
    assert float(s.surface.weight.detach().abs().sum()) == 0.0
    torch.manual_seed(2)
    assert float(Objective(s)(toks, valid)[0].detach()) == pytest.approx(got[0], rel=1e-6)


def test_surface_config_validation_and_recipe():
    with pytest.raises(ValueError, match="surfaces"):
        ModelConfig(n_titles=10, surfaces=("lobby",))
    with pytest.raises(ValueError, match="unknown canvas"):
        Recipe(surfaces="home,lobby")
    cfg = model_config(Recipe(surfaces="home, search,kids"), 10, ())
    assert cfg.surfaces == ("home", "search", "kids")
    assert model_config(Recipe(), 10, ()).surfaces == ()


def test_surface_query_only_moves_configured_canvases():
    m = tiny(("kids",))
    with torch.no_grad():
        m.surface.weight[CANVAS["kids"]].normal_()
    h = torch.randn(2, 3, 16)
    plain = m.query(h, 0)
    home = torch.full((2, 3), CANVAS["home"])
    torch.testing.assert_close(m.query(h, 0, home), plain)          # not a configured surface: plain query
    kids = torch.full((2, 3), CANVAS["kids"])
    torch.testing.assert_close(m.query(h, 0, kids), plain + m.surface_vector("kids"))
    with pytest.raises(KeyError, match="home"):
        m.surface_vector("home")


def test_generator_canvas_behaviour_is_deterministic_and_opt_in():
    kw = dict(profiles=80, titles=120, days=2, new_titles_per_day=2, seed=4)
    a, _, kids = generated_world(**kw)
    b, _, _ = generated_world(**kw)
    assert a.equals(b)
    canvas, title = np.array(a["canvas"].to_pylist()), np.array([int(t[1:]) for t in a["title_id"].to_pylist()])
    assert (canvas == "kids").any() and kids[title[canvas == "kids"]].all() and not kids[title[canvas != "kids"]].any()
    # the default keeps the historical output (canvas is independent of the title, no kids canvas)
    cfg = generate.GenerateConfig(**kw)
    rng = np.random.default_rng(cfg.seed)
    cat = generate._catalogue(cfg, rng)
    world = generate._World(cfg, cat, rng)
    plain = generate._day_table(world, dt.date.fromisoformat(cfg.start), cfg, rng)
    assert "kids" not in set(plain["canvas"].to_pylist()) and not hasattr(world, "kids_profile")


def test_surface_model_learns_what_next_on_the_kids_canvas(one_thread):
    """Trained on generated data where kids-only titles appear only on the kids canvas, the kids
    surface query puts kids titles in the top 10 far more often than the home query does."""
    events, cat, kids = generated_world(profiles=200, titles=150, days=4, new_titles_per_day=2, seed=11)
    seqs = sequences(events, cat.num_rows)
    torch.manual_seed(0)
    m = FoundationModel(ModelConfig(n_titles=N_SPECIAL + cat.num_rows, content_dim=8, d_model=32, n_layers=1,
                                    n_heads=2, max_len=48, dropout=0.0, mtp_k=1, surfaces=("home", "search", "kids")))
    init_weights(m, zero_fields=True)
    m.title.content.copy_(torch.randn(m.cfg.n_titles, 8))
    fit(Objective(m), seqs, 48, FitConfig(batch_size=32, lr=1e-2, max_epochs=60, budget_s=60, n_evals=0))
    m.eval()
    on_kids, on_home = kids_share_top10(m, seqs, kids, "kids"), kids_share_top10(m, seqs, kids, "home")
    assert on_kids > 0.2 and on_home < 0.1 and on_kids > 5 * on_home, (on_kids, on_home)


# ------------------------------------------------------------------------------------------------
# embed and retrieve
# ------------------------------------------------------------------------------------------------
def surface_checkpoint(world, home, surfaces=("home", "kids")) -> tuple[dt.date, str]:
    """The world's trained model with random surface queries added, saved as its own version."""
    paths, day = clone_world(world, home)
    model, enc, meta = checkpoint.load(current_model_dir(paths))
    cfg = ModelConfig.from_dict({**model.cfg.to_dict(), "surfaces": list(surfaces)})
    surf = FoundationModel(cfg)
    missing, unexpected = surf.load_state_dict(model.state_dict(), strict=False)
    assert missing == ["surface.weight"] and not unexpected
    torch.manual_seed(0)                                   # the same surface queries in every home
    with torch.no_grad():
        for s in surfaces:
            surf.surface.weight[CANVAS[s]].normal_(0, 0.5)
    meta = {k: v for k, v in meta.items() if k not in ("model_config", "schema_version")}
    checkpoint.save(surf, enc, paths.models / "surf-v1", {**meta, "model_version": "surf-v1"})
    return day, "surf-v1"


def test_embed_publishes_one_vector_per_surface(world, home, one_thread):
    day, version = surface_checkpoint(world, home)
    out = embed.run(embed.EmbedConfig(date=day.isoformat(), model_version=version), home)
    assert out["surfaces"] == {"home": "emb_surface_home", "kids": "emb_surface_kids"}
    pdir = partition(home.profile_embeddings, day)
    manifest = json.loads((pdir / "_manifest.json").read_text())
    assert manifest["surfaces"] == out["surfaces"] and manifest["layers"] == out["layers"]
    assert {"emb_surface_home", "emb_surface_kids"} <= set(manifest["dims"])
    t = pq.read_table(pdir)
    ids = embed.title_ids_by_idx(embed.read_vocab(home))
    model, _, _ = embed.load_model(home, embed.EmbedConfig(model_version=version), ids, torch.device("cpu"))
    last = checksum.list_matrix(t["emb_layer2_last"])
    for s in ("home", "kids"):
        want = last + model.surface_vector(s).detach().numpy()
        np.testing.assert_allclose(checksum.list_matrix(t[f"emb_surface_{s}"]), want, rtol=1e-5, atol=1e-5)
    assert not np.allclose(checksum.list_matrix(t["emb_surface_home"]), checksum.list_matrix(t["emb_surface_kids"]))
    cols = t.column_names[3:]                            # layers, surfaces, then the trained heads
    assert cols[:len(out["layers"]) + 2] == [*out["layers"], "emb_surface_home", "emb_surface_kids"]
    assert checksum.table_checksum(pdir, "profile_id", cols) == (manifest["rows"], manifest["checksum"])


def test_local_and_spark_engines_publish_the_same_surface_vectors(world, home, spark, tmp_path, one_thread):
    day, version = surface_checkpoint(world, home)
    local = embed.run(embed.EmbedConfig(date=day.isoformat(), model_version=version), home)
    lt = pq.read_table(partition(home.profile_embeddings, day)).sort_by("profile_id")
    other = Paths((tmp_path / "spark-home").resolve())
    surface_checkpoint(world, other)
    remote = embed.run(embed.EmbedConfig(date=day.isoformat(), model_version=version, engine="spark"), other, spark)
    st = pq.read_table(partition(other.profile_embeddings, day)).sort_by("profile_id")
    assert remote["surfaces"] == local["surfaces"]
    for c in ("emb_surface_home", "emb_surface_kids"):
        np.testing.assert_allclose(checksum.list_matrix(st[c]), checksum.list_matrix(lt[c]), rtol=1e-5, atol=1e-5)


class _Store:
    """Feast's get_online_features over the written profile table (records what was asked)."""

    def __init__(self, table: pa.Table):
        self.table, self.asked = table, []

    def get_online_features(self, features, entity_rows):
        self.asked += features
        row = self.table.filter(pc.equal(self.table["profile_id"], entity_rows[0]["profile_id"]))
        names = [f.split(":")[1] for f in features]
        return _Dict({n: row[n].to_pylist() for n in names})


class _Dict(dict):
    def to_dict(self):
        return dict(self)


class _Index:
    def __init__(self, day: dt.date, version: str, titles: np.ndarray, ids: list[str]):
        self.meta, self.titles, self.ids = {"date": day.isoformat(), "model_version": version}, titles, ids

    def score(self, q, k, exclude):
        s = self.titles @ q
        return [(self.ids[i], float(s[i])) for i in np.argsort(-s)[:k]]


def test_retrieve_uses_the_surface_vector_and_names_the_available_ones(world, home, one_thread):
    day, version = surface_checkpoint(world, home)
    embed.run(embed.EmbedConfig(date=day.isoformat(), model_version=version), home)
    t = pq.read_table(partition(home.profile_embeddings, day))
    tt = pq.read_table(partition(home.title_embeddings, day))
    titles, tids = checksum.list_matrix(tt["title_embedding"]), tt["title_id"].to_pylist()
    pid = int(t["profile_id"][0].as_py())
    store, index = _Store(t), _Index(day, version, titles, tids)
    got = retrieve.retrieve(home, pid, k=5, exclude_finished=False, store=store, index=index, surface="kids")
    assert "profile_embeddings:emb_surface_kids" in store.asked and got["surface"] == "kids"
    q = checksum.list_matrix(t["emb_surface_kids"])[0]
    assert [x["title_id"] for x in got["titles"]] == [tids[i] for i in np.argsort(-(titles @ q))[:5]]
    plain = retrieve.retrieve(home, pid, k=5, exclude_finished=False, store=store, index=index)
    assert "surface" not in plain and "feature" not in plain
    with pytest.raises(ValueError, match="available surfaces: home, kids"):
        retrieve.retrieve(home, pid, k=5, exclude_finished=False, store=store, index=index, surface="search")


def test_surface_vectors_are_published_to_feast_and_retrieved_through_it(world, home, one_thread):
    """The whole path with the real Feast store: embed (surface model) -> validate -> publish ->
    index; the profile view declares the surface columns and `retrieve surface=kids` reads them."""
    from jobs import pipeline
    from jobs.core.feast_store import get_store
    day, version = surface_checkpoint(world, home)
    shutil.copytree(partition(world["paths"].tokens, day), partition(home.tokens, day))
    (home.models / "CURRENT.json").write_text(json.dumps({"version": version}))
    pipeline.embed(day.isoformat())
    pipeline.validate(day.isoformat())
    pipeline.publish(day.isoformat())
    pipeline.index(day.isoformat())
    fields = [f.name for f in get_store(home).get_feature_view("profile_embeddings").features]
    assert {"emb_surface_home", "emb_surface_kids"} <= set(fields)
    t = pq.read_table(partition(home.profile_embeddings, day))
    pid = int(t["profile_id"][0].as_py())
    got = retrieve.retrieve(home, pid, k=5, exclude_finished=False, surface="kids")
    plain = retrieve.retrieve(home, pid, k=5, exclude_finished=False)
    assert got["surface"] == "kids" and len(got["titles"]) == 5
    assert [x["title_id"] for x in got["titles"]] != [x["title_id"] for x in plain["titles"]] or \
        [x["score"] for x in got["titles"]] != [x["score"] for x in plain["titles"]]
