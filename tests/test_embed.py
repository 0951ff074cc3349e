"""The embed job: fast extraction path, engines, checksums, alignment across retrains, export,
bad checkpoints. Runs on copies of the session's tiny world (never mutates it)."""
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

from fm import align, checkpoint
from fm.extract import LayerSpec, ProfileEncoder, batch_ids, default_layers, parse_layers, reference_embeddings
from fm.stream import encode_sequences
from fm.cold import add_titles, content_map
from fm.recipe import Recipe, cold_calibration
from fm.schema import HEAD_CLASSES, N_SPECIAL, TITLE_VOCAB_SCHEMA
from jobs import alignment, embed
from jobs.core import checksum
from jobs.core.io import partition
from jobs.core.settings import Paths
from jobs.train import current_model_dir
from jobs.core.vocab import known_on, read_vocab, title_ids_by_idx


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def clone_world(world, home: Paths) -> tuple[Paths, dt.date]:
    """Copy the inputs the embed job needs (history of the trained day, models, vocab, catalogue)."""
    src: Paths = world["paths"]
    day = dt.date.fromisoformat(world["days"][-2])
    for sub in ("models", "vocab", "catalogue"):
        shutil.copytree(src.home / sub, home.home / sub)
    shutil.copytree(partition(src.history, day), partition(home.history, day))
    return home, day


def shift_history(paths: Paths, day: dt.date, to: dt.date) -> None:
    """A later day on which every profile of ``day`` is active again (same tokens)."""
    t = pq.read_table(partition(paths.history, day))
    t = t.set_column(t.schema.get_field_index("last_dt"), "last_dt", pa.array([to] * t.num_rows, pa.date32()))
    partition(paths.history, to).mkdir(parents=True)
    pq.write_table(t, partition(paths.history, to) / "part-0.parquet")


def vectors(table: pa.Table, col: str) -> np.ndarray:
    return checksum.list_matrix(table[col])


def leftovers(paths: Paths) -> list[str]:
    roots = [paths.profile_embeddings, paths.title_embeddings]
    return sorted(str(p) for r in roots if r.exists() for p in r.iterdir())


def run(paths: Paths, day: dt.date, **kw) -> dict:
    return embed.run(embed.EmbedConfig(date=day.isoformat(), **kw), paths)


def world_model(paths: Paths):
    ids = title_ids_by_idx(read_vocab(paths))
    model, meta, n_trained = embed.load_model(paths, embed.EmbedConfig(), ids, torch.device("cpu"))
    return model, meta, n_trained, ids


# ------------------------------------------------------------------------------------------------
# extraction
# ------------------------------------------------------------------------------------------------
def test_fast_path_equals_eager_for_any_layer_selection(world, home):
    paths, day = clone_world(world, home)
    model, *_ = world_model(paths)
    seqs = embed.active_profiles(paths, day)
    assert len(seqs) > 20
    specs = parse_layers("1:mean,2:last,1:last,2:mean", model.cfg.n_layers)
    want = reference_embeddings(model, seqs, specs)
    for budget in (64, 4096):                            # many small batches / one big batch
        got = encode_sequences(ProfileEncoder(model, specs), seqs, batch_tokens=budget)
        for name in want:
            np.testing.assert_allclose(got[name], want[name], atol=2e-5, rtol=1e-4)
    only = ProfileEncoder(model, (LayerSpec(1, "last"),))
    assert len(only.blocks) == 1 and only.ln_f is None     # layers after the deepest requested one are skipped
    with pytest.raises(ValueError, match="layers 1..2"):
        parse_layers("3:last", 2)
    with pytest.raises(ValueError, match="bad layer spec"):
        parse_layers("2:max", 2)
    assert parse_layers("", 2) == default_layers(2)

    r = run(paths, day, layers="1:mean,2:last")
    t = pq.read_table(partition(paths.profile_embeddings, day)).sort_by("profile_id")
    assert [c for c in t.column_names if c.startswith("emb_")] == ["emb_layer1_mean", "emb_layer2_last"]
    assert r["profiles"] == t.num_rows == len(seqs)
    order = np.argsort(seqs.profile_id)
    np.testing.assert_allclose(vectors(t, "emb_layer1_mean"), want["emb_layer1_mean"][order], atol=2e-5, rtol=1e-4)
    man = json.loads((partition(paths.profile_embeddings, day) / "_manifest.json").read_text())
    heads = {f"head_{h}": len(c) for h, c in HEAD_CLASSES.items()}        # the world model trains all three
    assert man["layers"] == ["emb_layer1_mean", "emb_layer2_last"] and man["dims"] == {
        "emb_layer1_mean": 32, "emb_layer2_last": 32, **heads} and man["source"].endswith(f"history/dt={day}")


def test_mixed_precision_path_matches_float32(world, home):
    """The path CUDA takes (bf16 autocast, float32 residual stream), exercised with CPU autocast."""
    paths, day = clone_world(world, home)
    model, *_ = world_model(paths)
    seqs = embed.active_profiles(paths, day)
    enc = ProfileEncoder(model, default_layers(model.cfg.n_layers))
    tokens, lengths = batch_ids(seqs, np.arange(min(32, len(seqs))), model.cfg.max_len)
    with torch.inference_mode():
        full = enc(tokens, lengths)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = enc(tokens, lengths)
    for f, h in zip(full, half):
        cos = torch.nn.functional.cosine_similarity(f, h.float(), dim=1)
        assert cos.min() > 0.99


def test_streaming_chunks_and_order_independent_checksum(world, home):
    paths, day = clone_world(world, home)
    run(paths, day)
    one = pq.read_table(partition(paths.profile_embeddings, day))
    man1 = json.loads((partition(paths.profile_embeddings, day) / "_manifest.json").read_text())
    run(paths, day, chunk_profiles=16, batch_tokens=128)        # many row groups, many small batches
    part = partition(paths.profile_embeddings, day)
    man2 = json.loads((part / "_manifest.json").read_text())
    assert pq.ParquetFile(part / "part-0.parquet").num_row_groups == -(-man2["rows"] // 16)
    two = pq.read_table(part).sort_by("profile_id")
    one = one.sort_by("profile_id")
    for col in man1["layers"]:
        np.testing.assert_allclose(vectors(two, col), vectors(one, col), atol=2e-5, rtol=1e-4)

    cols = man1["checksum_columns"]                     # the layers, then the trained heads' probabilities
    assert cols[:len(man1["layers"])] == man1["layers"] and len(cols) > len(man1["layers"])
    c = checksum.Checksum("profile_id", cols)
    c.update(one)
    shuffled = one.take(np.random.default_rng(0).permutation(one.num_rows))
    c2 = checksum.Checksum("profile_id", cols)
    for b in shuffled.to_batches(max_chunksize=7):
        c2.update(b)
    assert c.hexdigest() == c2.hexdigest() == man1["checksum"]
    assert checksum.table_checksum(part, "profile_id", cols) == (two.num_rows, man2["checksum"])
    v = vectors(one, cols[0]).copy()
    v[3, 5] = np.nextafter(v[3, 5], np.float32(np.inf))            # one ulp in one value
    bumped = one.set_column(one.schema.get_field_index(cols[0]), cols[0], embed.vector_array(v))
    c3 = checksum.Checksum("profile_id", cols)
    c3.update(bumped)
    assert c3.hexdigest() != c.hexdigest()


def test_new_titles_get_the_vectors_their_content_predicts(world, home):
    paths, day = clone_world(world, home)
    vocab = read_vocab(paths)
    cat = pq.read_table(paths.catalogue)
    unseen = [f"released-today-{i}" for i in range(3)]          # in the catalogue and vocabulary, not in training
    pq.write_table(pa.concat_tables([cat, cat.slice(0, 3).set_column(0, cat.schema.field(0), pa.array(unseen))]), paths.catalogue)
    n0 = vocab.num_rows
    extra = pa.table({"title_id": unseen, "idx": pa.array(range(N_SPECIAL + n0, N_SPECIAL + n0 + len(unseen)), pa.int32()),
                      "first_dt": pa.array([day] * len(unseen), pa.date32())}, schema=TITLE_VOCAB_SCHEMA)
    pq.write_table(pa.concat_tables([vocab, extra]), paths.title_vocab)
    base, _, _ = checkpoint.load(current_model_dir(paths))

    r = run(paths, day)
    titles = pq.read_table(partition(paths.title_embeddings, day))
    n_trained = base.cfg.n_titles - N_SPECIAL          # other tests may already have grown the shared vocabulary,
    later = int((~known_on(paths, title_ids_by_idx(read_vocab(paths))[N_SPECIAL:], day)).sum())  # even past the day
    expected_new = n0 - n_trained + len(unseen) - later
    assert titles.num_rows == n0 + len(unseen) - later and r["new_titles"] == expected_new == sum(titles["is_new"].to_pylist())
    assert titles["title_id"].to_pylist()[-len(unseen):] == unseen
    tv = vectors(titles, "title_embedding")
    tv_unseen = tv[-len(unseen):]
    with torch.no_grad():
        trained = base.title.table().numpy()[N_SPECIAL:]
    np.testing.assert_allclose(tv[:n_trained], trained, atol=1e-6)    # known titles: the model's table, unchanged
    model, *_ = world_model(paths)
    scale = model.cfg.cold_content_scale                  # the validated calibration (fm.recipe.COLD_CALIBRATION)
    assert scale == pytest.approx(cold_calibration(Recipe())[1])
    with torch.no_grad():                                 # served by content (the validated cold_titles default)
        content_part = scale * model.title.proj(model.title.content[N_SPECIAL + n0:]).numpy()
        twin = scale * model.title.proj(model.title.content[[title_ids_by_idx(vocab).index(t)
                                                     for t in cat["title_id"].to_pylist()[:3]]]).numpy()
    np.testing.assert_allclose(tv_unseen, content_part, atol=1e-5)
    assert (np.linalg.norm(tv_unseen, axis=1) > 0).all()
    np.testing.assert_allclose(tv_unseen, twin, atol=1e-5)   # a copy of a known title's text: that text's vector
    # the ridge method, by configuration: the vector the map fitted on the checkpoint's titles predicts
    trained_mask = torch.zeros(base.cfg.n_titles, dtype=torch.bool)
    trained_mask[N_SPECIAL:] = True
    w = content_map(base, trained_mask)
    base.cfg.cold_titles = "ridge"
    add_titles(base, model.title.content[base.cfg.n_titles:])
    d = base.cfg.d_model
    with_one = lambda c: torch.cat([c, torch.ones_like(c[:, :1])], dim=1)  # noqa: E731 (content + intercept)
    with torch.no_grad():
        predicted = (with_one(model.title.content[N_SPECIAL + n0:]) @ w)[:, :d].numpy()
        np.testing.assert_allclose(base.title.table()[N_SPECIAL + n0:].numpy(), predicted, atol=1e-4)
    man = json.loads((partition(paths.title_embeddings, day) / "_manifest.json").read_text())
    assert man["new_titles"] == expected_new and man["rows"] == titles.num_rows


# ------------------------------------------------------------------------------------------------
# engines
# ------------------------------------------------------------------------------------------------
def test_local_and_spark_engines_publish_the_same_table(world, home, spark):
    paths, day = clone_world(world, home)
    local = run(paths, day, chunk_profiles=40)
    a = pq.read_table(partition(paths.profile_embeddings, day)).sort_by("profile_id")
    man_a = json.loads((partition(paths.profile_embeddings, day) / "_manifest.json").read_text())
    res = embed.run(embed.EmbedConfig(date=day.isoformat(), engine="spark", spark_partitions=2, spark_device="auto"),
                    paths, spark)
    part = partition(paths.profile_embeddings, day)
    b = pq.read_table(part).sort_by("profile_id")
    man_b = json.loads((part / "_manifest.json").read_text())
    assert res["engine"] == "spark" and man_b["engine"] == "spark" and local["profiles"] == res["profiles"]
    assert a["profile_id"].to_pylist() == b["profile_id"].to_pylist() and man_a["rows"] == man_b["rows"] == a.num_rows
    assert b["model_version"].to_pylist() == a["model_version"].to_pylist()
    assert pc.all(pc.equal(b["event_timestamp"], a["event_timestamp"])).as_py()
    assert b.schema.field("event_timestamp").type == pa.timestamp("us", tz="UTC")
    for col in man_a["layers"]:
        np.testing.assert_allclose(vectors(b, col), vectors(a, col), atol=2e-5, rtol=1e-4)
    assert not any(".tmp-" in p for p in leftovers(paths))
    # Feast reads the directory as one table: Spark's side files must not be picked up as data
    import pyarrow.dataset as ds
    assert ds.dataset(str(paths.profile_embeddings), format="parquet", partitioning="hive").count_rows() == a.num_rows


# ------------------------------------------------------------------------------------------------
# alignment across retrains
# ------------------------------------------------------------------------------------------------
def test_alignment_is_orthogonal_preserves_scores_and_reduces_drift():
    rng = np.random.default_rng(0)
    n, d, k = 600, 24, 6
    old = rng.normal(size=(n, k)) @ rng.normal(size=(k, d)) + 0.05 * rng.normal(size=(n, d))
    old_t = rng.normal(size=(80, k)) @ rng.normal(size=(k, d))
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))                      # a retrain = rotation + change
    new, new_t = old @ q + 0.3 * rng.normal(size=(n, d)), old_t @ q
    r, rep = align.align(new, old, np.arange(n), new_t, old_t)
    assert align.is_orthogonal(r, 1e-5) and rep.orthogonality_error < 1e-5
    scores = new @ new_t.T
    np.testing.assert_allclose((new @ r) @ (new_t @ r).T, scores, atol=1e-4 * np.abs(scores).max())
    np.testing.assert_allclose(np.linalg.norm(new @ r, axis=1), np.linalg.norm(new, axis=1), rtol=1e-5)
    assert rep.eval_held_out and rep.n_eval > 50 and rep.cos_before < 0.3 and rep.cos_after > 0.9
    assert rep.drift_reduction > 0.8 and 1 <= rep.rank < d
    r_full, k_full = align.fit_rotation(new, old, rank=d)             # plain Procrustes is the rank-d case
    assert k_full == d and align.is_orthogonal(r_full)
    wider, _ = align.fit_rotation(np.concatenate([new, rng.normal(size=(n, 4))], 1), old)   # new model wider
    assert wider.shape == (d + 4, d + 4) and align.is_orthogonal(wider)
    with pytest.raises(ValueError, match="wider"):
        align.fit_rotation(new[:, :10], old)


def test_retrained_model_is_aligned_onto_the_published_space(world, home):
    from jobs import train
    paths, d1 = clone_world(world, home)
    d2, d3 = d1 + dt.timedelta(days=1), d1 + dt.timedelta(days=2)
    shift_history(paths, d1, d2)
    shift_history(paths, d1, d3)
    first = run(paths, d1)
    assert first["alignment"] == "none"
    v2 = train.run(train.TrainJobConfig(date=d1.isoformat(), seed=7, time_budget_s=3, max_epochs=1, d_model=32,
                                        max_len=64, promote="always"), paths)["model_version"]
    assert v2 != first["model_version"]

    raw_home = Paths(home.home.parent / "raw-copy")                    # the same day without alignment
    shutil.copytree(paths.home, raw_home.home)
    run(raw_home, d2, align=False)
    raw = pq.read_table(partition(raw_home.profile_embeddings, d2)).sort_by("profile_id")
    raw_titles = vectors(pq.read_table(partition(raw_home.title_embeddings, d2)), "title_embedding")

    second = run(paths, d2)
    assert second["alignment"] == "fitted" and second["model_version"] == v2
    part = partition(paths.profile_embeddings, d2)
    man = json.loads((part / "_manifest.json").read_text())
    al = man["alignment"]
    assert al["reference"] == {"date": d1.isoformat(), "model_version": first["model_version"]}
    assert man["space"] == first["model_version"] and man["model_version"] == v2
    rep = al["groups"]["layer2"]["report"]
    assert rep["cos_after"] > rep["cos_before"] + 0.05 and rep["drift_reduction"] > 0.05
    assert al["groups"]["layer2"]["titles"] and rep["n_fit_titles"] > 0 and "layer1" in al["groups"]
    rot = np.load(part / alignment.ALIGNMENT_FILE)
    assert align.is_orthogonal(rot["layer2"]) and align.is_orthogonal(rot["layer1"])

    pub = pq.read_table(part).sort_by("profile_id")
    pub_titles = vectors(pq.read_table(partition(paths.title_embeddings, d2)), "title_embedding")
    assert pub["model_version"].to_pylist() == raw["model_version"].to_pylist()
    s_raw = vectors(raw, "emb_layer2_last") @ raw_titles.T            # the model's scores
    s_pub = vectors(pub, "emb_layer2_last") @ pub_titles.T
    np.testing.assert_allclose(s_pub, s_raw, atol=1e-4 * np.abs(s_raw).max())
    np.testing.assert_allclose(vectors(pub, "emb_layer2_last"), vectors(raw, "emb_layer2_last") @ rot["layer2"], atol=1e-5)
    old = pq.read_table(partition(paths.profile_embeddings, d1)).sort_by("profile_id")
    shared = np.isin(pub["profile_id"].to_numpy(), old["profile_id"].to_numpy())
    assert shared.sum() == old.num_rows
    before = align.mean_cosine(vectors(old, "emb_layer2_last"), vectors(raw, "emb_layer2_last")[shared])
    after = align.mean_cosine(vectors(old, "emb_layer2_last"), vectors(pub, "emb_layer2_last")[shared])
    assert after > before + 0.05, (before, after)

    third = run(paths, d3)                                             # same model: the same rotation, carried
    assert third["alignment"] == "carried"
    rot3 = np.load(partition(paths.profile_embeddings, d3) / alignment.ALIGNMENT_FILE)
    assert np.array_equal(rot3["layer2"], rot["layer2"])
    man3 = json.loads((partition(paths.profile_embeddings, d3) / "_manifest.json").read_text())
    assert man3["space"] == first["model_version"] and man3["alignment"]["fitted"]["date"] == d2.isoformat()


# ------------------------------------------------------------------------------------------------
# export
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["export", "torchscript"])
def test_exported_encoder_equals_eager(world, home, tmp_path, fmt):
    from fm.export import export_encoder, load_encoder
    paths, day = clone_world(world, home)
    model, meta, *_ = world_model(paths)
    seqs = embed.active_profiles(paths, day)
    specs = default_layers(model.cfg.n_layers)
    rot = {"emb_layer2_last": np.linalg.qr(np.random.default_rng(1).normal(size=(32, 32)))[0].astype(np.float32)}
    out = export_encoder(model, specs, tmp_path / "enc", fmt=fmt, meta={"model_version": meta["model_version"]},
                         rotations=rot)
    enc = load_encoder(out)
    assert enc.meta["columns"] == [s.name for s in specs] and enc.meta["model_version"] == meta["model_version"]
    want = reference_embeddings(model, seqs, specs)
    for rows in (np.arange(0, 5), np.arange(5, len(seqs))):          # different batch sizes and lengths
        tokens, lengths = batch_ids(seqs, rows, model.cfg.max_len)
        got = enc(tokens, lengths)
        for name in want:
            expect = want[name][rows] @ rot[name] if name in rot else want[name][rows]
            np.testing.assert_allclose(got[name].numpy(), expect, atol=2e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------------
# bad checkpoints and failures write nothing
# ------------------------------------------------------------------------------------------------
def _break(paths: Paths, kind: str) -> str:
    ckpt = current_model_dir(paths)
    if kind == "missing_weights":
        (ckpt / checkpoint.WEIGHTS).unlink()
        return "missing model.safetensors"
    if kind == "missing_checkpoint":
        shutil.rmtree(ckpt)
        return "does not exist"
    if kind == "wrong_vocab":
        meta = json.loads((ckpt / checkpoint.META).read_text())
        meta["vocab_fingerprint"] = "0" * 16
        (ckpt / checkpoint.META).write_text(json.dumps(meta))
        return "vocabulary mismatch"
    if kind == "truncated_tensor":
        raw = (ckpt / checkpoint.WEIGHTS).read_bytes()
        (ckpt / checkpoint.WEIGHTS).write_bytes(raw[: len(raw) // 2])
        return "cannot read tensors"
    if kind == "nan_tensor":
        from safetensors.torch import load_file, save_file
        state = load_file(str(ckpt / checkpoint.WEIGHTS))
        state["blocks.0.qkv.weight"][0, 0] = float("nan")
        save_file(state, str(ckpt / checkpoint.WEIGHTS))
        return "NaN/Inf"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["missing_weights", "missing_checkpoint", "wrong_vocab", "truncated_tensor", "nan_tensor"])
@pytest.mark.parametrize("engine", ["local", "spark"])
def test_bad_checkpoint_raises_and_writes_nothing(world, home, kind, engine):
    paths, day = clone_world(world, home)
    message = _break(paths, kind)
    with pytest.raises(checkpoint.CheckpointError, match=message):
        run(paths, day, engine=engine)
    assert leftovers(paths) == []


def test_failure_mid_stream_keeps_the_previous_partition(world, home, monkeypatch):
    paths, day = clone_world(world, home)
    run(paths, day)
    part = partition(paths.profile_embeddings, day)
    before = {p.name: p.read_bytes() for p in part.iterdir()}
    real = embed.embed_batches

    def crashing(*a, **kw):
        it = real(*a, **kw)
        yield next(it)
        raise RuntimeError("worker lost")
    monkeypatch.setattr(embed, "embed_batches", crashing)
    with pytest.raises(RuntimeError, match="worker lost"):
        run(paths, day, chunk_profiles=8)
    assert {p.name: p.read_bytes() for p in part.iterdir()} == before
    assert [p for p in leftovers(paths) if ".tmp-" in p] == []
