"""The foundation model: shapes, causality, learning, checkpoints, vocabulary growth, metrics."""
from __future__ import annotations


import numpy as np
import pytest
import torch

from fm import checkpoint
from fm.content import ContentEncoder
from fm.data import Sequences
from fm.evaluate import metrics_from_ranks, rank_of_target
from fm.extract import LayerSpec, ProfileEncoder, default_layers, pool, profile_embeddings
from fm.stream import encode_sequences
from fm.cold import add_titles
from fm.model import FoundationModel, ModelConfig, init_weights
from fm.schema import ACTIONS, N_SPECIAL, TOKEN_FIELDS, vocab_index
from fm.fit import FitConfig, fit
from fm.losses import Objective

PLAY = vocab_index(ACTIONS)["play"]


def tiny_model(n_titles=30, **kw) -> FoundationModel:
    torch.manual_seed(0)
    m = FoundationModel(ModelConfig(n_titles=n_titles, content_dim=8, d_model=16, n_layers=2, n_heads=2,
                                    max_len=16, dropout=kw.pop("dropout", 0.0), **kw))
    init_weights(m)
    m.title.content.copy_(torch.randn(n_titles, 8))
    return m.eval()


def random_tokens(B=3, L=10, n_titles=30, seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    m = tiny_model(n_titles)
    toks = {f: torch.randint(N_SPECIAL, n, (B, L), generator=g) for f, n in m.cfg.field_sizes.items()}
    toks["title"] = torch.randint(N_SPECIAL, n_titles, (B, L), generator=g)
    return toks


def test_encode_shapes_and_heads():
    m, toks = tiny_model(), random_tokens()
    states = m.encode(toks)
    assert len(states) == 2 and all(s.shape == (3, 10, 16) for s in states)
    assert m.title_logits(states[-1], 0).shape == (3, 10, 30)
    assert torch.isinf(m.title_logits(states[-1], 0)[..., :N_SPECIAL]).all()
    toks["action"][:] = PLAY                              # every token is a title target
    m = tiny_model(mtp_k=2)
    loss, parts = Objective(m)(toks, torch.ones(3, 10, dtype=torch.bool))
    assert torch.isfinite(loss) and set(parts) == {"title_1", "title_2", "action", "duration", "device"}


def test_no_future_leakage():
    """Changing tokens after position t must not change any state at positions <= t."""
    m, toks = tiny_model(), random_tokens()
    before = m.encode(toks)
    t = 4
    changed = {k: v.clone() for k, v in toks.items()}
    for k in changed:
        changed[k][:, t + 1:] = torch.flip(changed[k][:, t + 1:], dims=[0])
    changed["title"][:, t + 1:] = N_SPECIAL
    after = m.encode(changed)
    for a, b in zip(before, after):
        assert torch.equal(a[:, : t + 1], b[:, : t + 1])
        assert not torch.allclose(a[:, t + 1:], b[:, t + 1:])


def learnable_sequences(n=64, L=12, n_titles=12) -> Sequences:
    """Each profile cycles through titles 2,3,4,... with a fixed step: the next title is predictable."""
    rng = np.random.default_rng(0)
    vals = {f: [] for f in TOKEN_FIELDS}
    for p in range(n):
        step = 1 + p % 3
        start = rng.integers(0, n_titles - N_SPECIAL)
        for i in range(L):
            vals["title"].append(N_SPECIAL + (start + i * step) % (n_titles - N_SPECIAL))
            vals["action"].append(PLAY)
            for f in TOKEN_FIELDS[2:]:
                vals[f].append(N_SPECIAL)
    return Sequences(np.arange(n, dtype=np.int64), np.arange(0, n * L + 1, L, dtype=np.int64),
                     {f: np.array(v, np.int32) for f, v in vals.items()})


def test_loss_decreases_on_learnable_data():
    seqs = learnable_sequences()
    m = tiny_model(12)
    obj = Objective(m)
    b = seqs.batch(np.arange(len(seqs)), 16)
    before = float(obj(b.tokens, b.valid)[0].detach())
    res = fit(obj, seqs, 16, FitConfig(batch_size=16, lr=1e-2, max_epochs=30, budget_s=60, window_mode="last"))
    torch.manual_seed(0)
    after = float(obj(b.tokens, b.valid)[0].detach())
    assert after < 0.6 * before, (before, after, res.steps)




def _validate_on_last(model, seqs):
    """Validation = each row's last title, ranked by the protocol (the loop keeps the best)."""
    from fm import protocol as P
    es = P.eval_set(seqs, 1, "valid")
    return lambda: P.evaluate(P.fm_scores(model), seqs, es, model.cfg.max_len)


@pytest.mark.parametrize("ema", [0.0, 0.9])
def test_resumed_training_is_bit_identical_to_an_uninterrupted_run(tmp_path, one_thread, monkeypatch, ema):
    """Interrupted after 7 steps (a state saved at every step, the last at step 6), resumed: same parameters, bit for bit,
    the same validation history and best checkpoint. The infinite budget makes the LR schedule
    step-bound; dropout, sampled negatives and held-out titles exercise the RNGs and the objective;
    with ``ema`` the weight average travels in the state too."""
    seqs = learnable_sequences()
    cfg = FitConfig(batch_size=16, lr=1e-2, max_epochs=3, budget_s=float("inf"), device="cpu",
                    checkpoint_every_s=1e-9, ema=ema)
    held_out = np.zeros(12, bool)
    held_out[5] = True
    make = lambda: (lambda m: (m, Objective(m, n_negatives=4, exclude_titles=held_out, mask_history=True)))(
        tiny_model(12, dropout=0.2, title_bias=True))                                   # noqa: E731
    full, full_obj = make()
    ref = fit(full_obj, seqs, 16, cfg, validate=_validate_on_last(full, seqs))
    part, part_obj = make()
    cut = fit(part_obj, seqs, 16, cfg, validate=_validate_on_last(part, seqs), state_dir=tmp_path / "state",
              interrupt_after=7)
    assert cut.stopped_by == "interrupted" and ref.steps == 12 and len(ref.history) == 3
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["state-000000006.safetensors", "state.json"]
    resumed, resumed_obj = make()                        # a fresh process would rebuild the same model
    out = fit(resumed_obj, seqs, 16, cfg, validate=_validate_on_last(resumed, seqs), state_dir=tmp_path / "state",
              resume=True)
    assert out.resumed and out.steps == 12
    assert [c[1] for c in out.curve] == [c[1] for c in ref.curve]
    same = lambda h: [(s, ep, m) for s, _, ep, m in h]                      # noqa: E731 (wall time differs)
    assert same(out.history) == same(ref.history) and out.best_step == ref.best_step
    assert out.best_weights == ref.best_weights
    assert ("ema_ndcg@10" in out.history[0][3]) == bool(ema)
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match=r"another config \(differs in \['lr'\]\)"):
        fit(make()[1], seqs, 16, FitConfig(**{**cfg.__dict__, "lr": 1e-3}), state_dir=tmp_path / "state", resume=True)


def test_training_to_convergence_continues_in_sittings_with_a_larger_budget(tmp_path, one_thread):
    """A constant-schedule run stopped by its budget (here after its first step) saves its state before
    the closing validation; a second sitting with no budget resumes it and ends bit-identical to a run
    that never stopped -- weights, loss curve, validation history. A cosine schedule, whose steps depend
    on the budget, refuses the larger one."""
    seqs = learnable_sequences()
    cfg = FitConfig(batch_size=16, lr=1e-2, max_epochs=3, budget_s=float("inf"), schedule="constant", device="cpu",
                    checkpoint_every_s=1e9)
    make = lambda: (lambda m: (m, Objective(m, n_negatives=4)))(tiny_model(12, dropout=0.2))   # noqa: E731
    full, full_obj = make()
    ref = fit(full_obj, seqs, 16, cfg, validate=_validate_on_last(full, seqs))
    first, first_obj = make()
    cut = fit(first_obj, seqs, 16, FitConfig(**{**cfg.__dict__, "budget_s": 1e-12}), validate=_validate_on_last(first, seqs),
              state_dir=tmp_path / "state")
    assert cut.stopped_by == "budget" and cut.steps == 1 and len(cut.history) == 1
    rest, rest_obj = make()
    out = fit(rest_obj, seqs, 16, cfg, validate=_validate_on_last(rest, seqs), state_dir=tmp_path / "state", resume=True)
    assert out.resumed and out.steps == ref.steps == 12 and out.stopped_by == ref.stopped_by
    assert [c[1] for c in out.curve] == [c[1] for c in ref.curve]
    assert [(s, ep, m) for s, _, ep, m in out.history] == [(s, ep, m) for s, _, ep, m in ref.history]
    for (name, a), b in zip(full.state_dict().items(), rest.state_dict().values()):
        assert torch.equal(a, b), name
    cosine = FitConfig(**{**cfg.__dict__, "schedule": "cosine", "budget_s": 1e-12})
    fit(make()[1], seqs, 16, cosine, state_dir=tmp_path / "cosine")
    with pytest.raises(ValueError, match=r"differs in \['budget_s'\]"):
        fit(make()[1], seqs, 16, FitConfig(**{**cosine.__dict__, "budget_s": 10.0}), state_dir=tmp_path / "cosine", resume=True)


def scripted_fit(scores: list[float], **cfg) -> tuple:
    """Fit a tiny model whose validations return ``scores`` in turn; also the model and a snapshot of
    its weights at each validation."""
    m, it, snapshots = tiny_model(12), iter(scores), []

    def validate():
        snapshots.append({k: v.clone() for k, v in m.state_dict().items()})
        return {"ndcg@10": next(it)}

    res = fit(Objective(m), learnable_sequences(), 16, FitConfig(batch_size=16, lr=1e-2, budget_s=float("inf"), **cfg),
              validate=validate)
    return res, m, snapshots


def test_fit_keeps_the_best_checkpoint_and_stops_early():
    """Validation that only gets worse after the first check: the first weights are kept, and
    patience=2 stops the run after two more checks."""
    res, m, snapshots = scripted_fit([0.5, 0.4, 0.3, 0.2, 0.1], max_epochs=10, patience=2)
    assert res.stopped_by == "early_stopping" and len(res.history) == 3 and res.best == {"ndcg@10": 0.5}
    for k, v in m.state_dict().items():
        assert torch.equal(v, snapshots[0][k]), k


def test_the_weight_average_is_validated_beside_the_trained_weights_and_kept_when_better():
    """``ema``: each validation scores the trained weights, then their moving average; the average
    is kept when it scores better, and training goes on from the trained weights, not the average."""
    # (trained, average) per validation
    res, m, snapshots = scripted_fit([0.30, 0.35, 0.40, 0.38, 0.20, 0.10], max_epochs=3, ema=0.5)
    assert len(res.history) == 3 and res.best == {"ndcg@10": 0.40} and res.best_weights == "trained"
    assert res.history[0][3] == {"ndcg@10": 0.30, "ema_ndcg@10": 0.35}
    trained1, avg1, trained2 = snapshots[0], snapshots[1], snapshots[2]
    assert any(not torch.equal(trained1[k], avg1[k]) for k in trained1)       # the average differs ...
    assert any(not torch.equal(avg1[k], trained2[k]) for k in avg1)          # ... and never replaces the trained weights
    for k, v in m.state_dict().items():
        assert torch.equal(v, trained2[k]), k
    res, m, snapshots = scripted_fit([0.30, 0.35, 0.20, 0.25, 0.10, 0.15], max_epochs=3, ema=0.5)
    assert res.best == {"ndcg@10": 0.35} and res.best_weights == "ema" and res.best_step == res.history[0][0]
    for k, v in m.state_dict().items():
        assert torch.equal(v, snapshots[1][k]), k


def test_weight_average_is_the_exponential_moving_average():
    """The average after updates with decay d: d * previous + (1 - d) * current, from the initial weights."""
    from fm.fit import WeightAverage
    lin = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        lin.weight.fill_(1.0)
    avg = WeightAverage(lin, 0.75)
    for value in (5.0, 9.0):
        with torch.no_grad():
            lin.weight.fill_(value)
        avg.update()
    expected = 0.75 * (0.75 * 1.0 + 0.25 * 5.0) + 0.25 * 9.0
    assert avg.avg[0].item() == pytest.approx(expected)
    with avg.applied():
        assert lin.weight.item() == pytest.approx(expected)
    assert lin.weight.item() == 9.0


def test_padding_does_not_change_real_positions():
    seqs = learnable_sequences(n=4, L=12)
    short = Sequences(seqs.profile_id[:1], np.array([0, 5]), {f: v[:5] for f, v in seqs.values.items()})
    m = tiny_model(12)
    alone = next(profile_embeddings(m, short, default_layers(2)))[1]
    mixed = Sequences(np.array([0, 1]), np.array([0, 5, 17]),
                      {f: np.concatenate([v[:5], seqs.values[f][12:24]]) for f, v in seqs.values.items()})
    for pids, vecs in profile_embeddings(m, mixed, default_layers(2), batch_size=8):
        row = list(pids).index(0)
        for k in alone:
            np.testing.assert_allclose(vecs[k][row], alone[k][0], atol=1e-5)


def test_pooling_and_layer_selection():
    states = [torch.arange(2 * 3 * 2, dtype=torch.float).view(2, 3, 2) + 100 * i for i in range(2)]
    valid = torch.tensor([[True, True, False], [True, True, True]])
    out = pool(states, valid, torch.tensor([2, 3]), (LayerSpec(1, "last"), LayerSpec(2, "mean")))
    assert out["emb_layer1_last"].tolist() == [[2.0, 3.0], [10.0, 11.0]]
    assert out["emb_layer2_mean"].tolist() == [[101.0, 102.0], [108.0, 109.0]]
    with pytest.raises(ValueError, match="bad layer spec"):
        LayerSpec.parse("2:max")
    with pytest.raises(ValueError, match="layers 1..2"):
        next(profile_embeddings(tiny_model(12), learnable_sequences(4), (LayerSpec(3, "last"),)))


def _encoder() -> ContentEncoder:
    return ContentEncoder.fit(["space robot future", "love wedding heart", "dragon magic kingdom", "robot war"], dim=4)


def test_checkpoint_round_trip_and_bad_checkpoints(tmp_path):
    m, toks = tiny_model(), random_tokens()
    vocab = [f"t{i}" for i in range(28)]
    meta = {"model_version": "v1", "vocab_size": 28, "vocab_fingerprint": checkpoint.vocab_fingerprint(vocab)}
    d = checkpoint.save(m, _encoder(), tmp_path / "v1", meta)
    m2, enc, meta2 = checkpoint.load(d, expected_vocab=vocab + ["new"])
    for a, b in zip(m.encode(toks), m2.encode(toks)):
        assert torch.equal(a, b)
    assert meta2["model_version"] == "v1"
    with pytest.raises(checkpoint.CheckpointError, match="vocabulary mismatch"):
        checkpoint.load(d, expected_vocab=list(reversed(vocab)))
    raw = (d / checkpoint.WEIGHTS).read_bytes()
    (d / checkpoint.WEIGHTS).write_bytes(raw[: len(raw) // 2])
    with pytest.raises(checkpoint.CheckpointError, match="cannot read tensors"):
        checkpoint.load(d)
    (d / checkpoint.WEIGHTS).unlink()
    with pytest.raises(checkpoint.CheckpointError, match="missing model.safetensors"):
        checkpoint.load(d)


def test_growing_the_vocabulary_keeps_old_rows_bit_identical():
    m = tiny_model()
    old_ids = m.title.id.weight.detach().clone()
    old_table = m.title.table().detach().clone()
    m.grow_titles(torch.randn(5, 8))
    assert m.cfg.n_titles == 35
    assert torch.equal(m.title.id.weight[:30], old_ids) and torch.equal(m.title.table()[:30], old_table)
    assert torch.equal(m.title.id.weight[30:], torch.zeros(5, 16))
    new = m.title.table()[30:]
    assert torch.allclose(new, m.title.proj(m.title.content[30:]))          # content-only vectors
    assert (new.norm(dim=1) > 0).all()


def test_grown_titles_are_served_by_content_by_default():
    """The validated default (cold_titles="content"): a new title is its content projection with
    an untrained (zero) bias -- the path ID dropout trains; old rows stay bit-identical."""
    m = tiny_model(n_titles=200, title_bias=True)
    with torch.no_grad():
        m.bias.normal_()
    old_table, old_bias = m.title.table().detach().clone(), m.bias.detach().clone()
    add_titles(m, torch.randn(3, 8))
    assert torch.equal(m.title.table()[:200], old_table) and torch.equal(m.bias[:200], old_bias)
    assert torch.allclose(m.title.table()[200:], m.title.proj(m.title.content[200:]))
    assert torch.equal(m.bias[200:], torch.zeros(3))
    with pytest.raises(ValueError, match="cold_titles='nearest'"):
        tiny_model(cold_titles="nearest")


def test_grown_titles_get_the_vector_their_content_predicts():
    """Default growth: where the trained vectors are a linear function of content, a new title gets
    exactly that function of its content, not the (small) content projection alone."""
    m = tiny_model(n_titles=200, cold_titles="ridge")
    w0 = torch.randn(8, 16)
    with torch.no_grad():
        m.title.id.weight.copy_(m.title.content @ w0 - m.title.proj(m.title.content))
    old_table = m.title.table().detach().clone()
    new_content = torch.randn(6, 8)
    add_titles(m, new_content)
    assert torch.equal(m.title.table()[:200], old_table)
    assert torch.allclose(m.title.table()[200:], new_content @ w0, atol=5e-2)
    assert not torch.allclose(m.title.table()[200:], m.title.proj(new_content), atol=5e-2)


def test_cold_titles_are_calibrated_from_content():
    """The ridge map predicts the bias as well as the vector (a bias that is a linear function of
    content is recovered); neighbour imputation copies the nearest trained title's vector and bias
    when a cold title's text equals it."""
    from fm.cold import impute_cold_titles, regress_cold_titles
    m = tiny_model(n_titles=200, title_bias=True)
    w0, b0 = torch.randn(8, 16), torch.randn(8)
    with torch.no_grad():
        m.title.id.weight.copy_(m.title.content @ w0 - m.title.proj(m.title.content))
        m.bias.copy_(m.title.content @ b0 + 0.5)
    trained = torch.ones(200, dtype=torch.bool)
    trained[:2] = False
    trained[190:] = False
    cold = torch.arange(190, 200)
    want_bias = m.bias[cold].detach().clone()
    regress_cold_titles(m, cold, trained)
    assert torch.allclose(m.bias[cold], want_bias, atol=5e-2)
    assert torch.allclose(m.title.table()[cold], m.title.content[cold] @ w0, atol=0.1)
    with torch.no_grad():
        m.title.content[195] = m.title.content[7]
    impute_cold_titles(m, cold, trained, k=5, temperature=1e-3)
    assert torch.allclose(m.title.table()[195], m.title.table()[7], atol=1e-4)
    assert torch.isclose(m.bias[195], m.bias[7], atol=1e-4)


def test_a_new_titles_bias_is_the_chosen_quantile_of_the_trained_biases():
    """cold_titles=content: a title added after training gets a zero ID row and the configured
    quantile of the trained titles' biases (bias 0 when none is configured, as before)."""
    for q, want in ((None, 0.0), (0.0, 1.0), (0.25, 50.25), (1.0, 198.0)):
        m = tiny_model(n_titles=200, title_bias=True, cold_bias_quantile=q)
        with torch.no_grad():
            m.bias.copy_(torch.arange(200, dtype=m.bias.dtype) - 1.0)      # trained titles 2..199: biases 1..198
            m.bias[:N_SPECIAL] = -1000.0                                    # specials never count
        add_titles(m, torch.randn(3, 8))
        assert torch.allclose(m.bias[200:], torch.full((3,), want)), (q, m.bias[200:])
        assert (m.title.id.weight[200:] == 0).all()
    with pytest.raises(ValueError, match="cold_bias_quantile must be in"):
        ModelConfig(n_titles=30, cold_bias_quantile=1.5)


def test_a_new_titles_vector_is_its_content_projection_times_the_configured_scale():
    m = tiny_model(n_titles=200, cold_content_scale=0.5)
    old = m.title.table().detach().clone()
    new_content = torch.randn(3, 8)
    add_titles(m, new_content)
    assert torch.allclose(m.title.table()[200:], 0.5 * m.title.proj(new_content), atol=1e-6)
    assert torch.equal(m.title.table()[:200], old)                        # trained titles untouched
    with pytest.raises(ValueError, match="cold_content_scale must be in"):
        ModelConfig(n_titles=30, cold_content_scale=0.0)


def test_exposure_gate_mixes_id_and_content_by_interactions_and_survives_growth():
    """A title seen often keeps (nearly) its whole ID; one never seen leans on content; the gate's
    slope and offset are learned; new titles enter with exposure 0 and still get the vector their
    content predicts (the gate is divided out of the ID row)."""
    m = tiny_model(n_titles=200, exposure_gate=True, cold_titles="ridge")
    counts = np.zeros(200)
    counts[10], counts[11] = 1000, 0
    m.title.set_exposure(counts)
    g = m.title.id_scale()
    assert g[10] > 0.99 and abs(float(g[11]) - 0.5) < 1e-6
    expect = m.title.id.weight * g + m.title.proj(m.title.content)
    assert torch.allclose(m.title.table(), expect, atol=1e-6)
    assert m.title.gate.requires_grad and "title.exposure" in m.state_dict()
    w0 = torch.randn(8, 16)
    with torch.no_grad():
        m.title.id.weight.copy_((m.title.content @ w0 - m.title.proj(m.title.content)) / m.title.id_scale())
    new_content = torch.randn(4, 8)
    add_titles(m, new_content)
    assert m.title.exposure.shape == (204,) and (m.title.exposure[200:] == 0).all()
    assert torch.allclose(m.title.table()[200:], new_content @ w0, atol=0.1)


def test_id_dropout_trains_titles_through_content_alone_and_never_applies_at_serving():
    m = tiny_model(id_dropout=0.5)
    content_only = m.title.proj(m.title.content).detach()
    full = m.title.table().detach()
    assert torch.equal(m.title.table(), full)                                 # eval: deterministic, whole IDs
    m.train()
    torch.manual_seed(1)
    t = m.title.table().detach()
    dropped = torch.isclose(t, content_only).all(dim=1)
    kept = torch.isclose(t, full).all(dim=1)
    assert (dropped | kept).all() and 0.3 < dropped.float().mean() < 0.7     # whole rows, about half
    idx = torch.randint(N_SPECIAL, 30, (4, 50))
    e = m.title(idx).detach()
    per_token_dropped = torch.isclose(e, content_only[idx]).all(dim=-1)
    assert 0.3 < per_token_dropped.float().mean() < 0.7
    assert not torch.equal(per_token_dropped[0, :], dropped[idx[0]])          # inputs draw their own mask
    off = tiny_model().train()                                                # default: no ID dropout
    assert torch.equal(off.title.table(), off.title.table())
    assert ModelConfig.from_dict({k: v for k, v in m.cfg.to_dict().items() if k != "id_dropout"}).id_dropout == 0.0
    with pytest.raises(ValueError, match="id_dropout must be in"):
        ModelConfig(n_titles=30, id_dropout=1.0)


def test_cold_titles_get_the_vector_their_content_predicts_and_warm_rows_stay():
    from fm.cold import regress_cold_titles
    m = tiny_model(n_titles=200)
    w0 = torch.randn(8, 16)
    with torch.no_grad():                       # trained titles whose whole vector is a linear function of content
        m.title.id.weight.copy_(m.title.content @ w0 - m.title.proj(m.title.content))
    cold = torch.arange(190, 200)
    trained = torch.ones(200, dtype=torch.bool)
    trained[:N_SPECIAL] = False
    trained[cold] = False
    with torch.no_grad():
        m.title.id.weight[cold] = 0.0           # never trained: content-only vectors
    before = m.title.table().detach().clone()
    assert not torch.allclose(before[cold], m.title.content[cold] @ w0, atol=1e-2)
    regress_cold_titles(m, cold, trained, ridge=1e-4)
    after = m.title.table().detach()
    assert torch.allclose(after[cold], m.title.content[cold] @ w0, atol=1e-2)
    assert torch.equal(after[trained], before[trained])


def test_content_encoder_embeds_unseen_text_near_similar_titles(tmp_path):
    enc = _encoder()
    v = enc.transform(["robot future space", "wedding love", "unrelated zzz"])
    assert v.shape == (3, 4)
    base = enc.transform(["space robot future", "love wedding heart"])
    assert float(v[0] @ base[0]) > float(v[0] @ base[1])
    assert np.allclose(v[2], 0)                                               # no known words -> zero
    enc.save(tmp_path)
    assert np.array_equal(ContentEncoder.load(tmp_path).transform(["robot"]), enc.transform(["robot"]))


def test_rank_metrics_on_hand_computed_cases():
    scores = torch.tensor([[0.0, 0.0, 5.0, 4.0, 3.0], [0.0, 0.0, 1.0, 2.0, 3.0]])
    ranks = rank_of_target(scores, torch.tensor([3, 2]))
    assert ranks.tolist() == [1, 2]
    # removing history ids above the target improves its rank
    assert rank_of_target(scores, torch.tensor([3, 2]), [np.array([2]), np.array([4, 3])]).tolist() == [0, 0]
    m = metrics_from_ranks(torch.tensor([0, 1, 20]), ks=(10,))
    assert m["hr@10"] == pytest.approx(2 / 3)
    assert m["ndcg@10"] == pytest.approx((1.0 + 1 / np.log2(3)) / 3)
    # ties count against the target: a constant scorer ranks it last
    assert rank_of_target(torch.zeros(1, 5), torch.tensor([2])).tolist() == [4]


@pytest.mark.parametrize("rel_bias", ["pos", "time", "pos_time"])
def test_relative_attention_bias_is_causal_and_the_inference_encoder_matches(rel_bias):
    """With a relative attention bias the state at t still sees nothing after t, the bias changes
    the states (it is used), and the fused inference encoder gives the eager path's vectors."""
    from fm.extract import ProfileEncoder, reference_embeddings
    m, toks = tiny_model(rel_bias=rel_bias), random_tokens()
    plain = m.encode(toks)[-1]
    with torch.no_grad():
        for p in m.rel_bias.parameters():
            p.normal_(0.0, 1.0)
    before = m.encode(toks)[-1]
    assert not torch.allclose(plain, before)
    changed = {k: v.clone() for k, v in toks.items()}
    for k in changed:
        changed[k][:, 5:] = torch.flip(changed[k][:, 5:], dims=[0])
    assert torch.equal(m.encode(changed)[-1][:, :5], before[:, :5])
    seqs = learnable_sequences(n=8, L=12, n_titles=30)
    seqs.values["gap"] = np.random.default_rng(0).integers(0, m.cfg.field_sizes["gap"], len(seqs.values["gap"])).astype(np.int32)
    specs = (LayerSpec(1, "mean"), LayerSpec(2, "last"))
    want = reference_embeddings(m, seqs, specs)
    got = encode_sequences(ProfileEncoder(m, specs), seqs, batch_tokens=32)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], atol=2e-5, rtol=1e-4)
    assert "rel_bias" in m.cfg.to_dict() and "rel_bias" not in tiny_model().cfg.to_dict()


def test_forward_batches_follow_the_device_limits_unless_overridden():
    """0 means the device's limits (fm.stream.BATCH_LIMITS); every batch stays within them, and the
    vectors do not depend on how the rows were batched."""
    from fm.extract import token_batches
    from fm.stream import BATCH_LIMITS, batch_limits
    assert batch_limits("cpu") == BATCH_LIMITS["cpu"] and batch_limits("cuda") == BATCH_LIMITS["cuda"]
    assert batch_limits("cuda", 64, 3) == (64, 3) and batch_limits("cpu", 0, 5) == (BATCH_LIMITS["cpu"][0], 5)
    lengths = np.random.default_rng(0).integers(1, 40, 500)
    for tokens, rows in ((64, 1024), (4096, 7)):
        batches = list(token_batches(lengths, 16, tokens, rows))
        assert sorted(np.concatenate(batches).tolist()) == list(range(500))
        assert all(len(b) <= rows and len(b) * min(16, lengths[b].max()) <= max(tokens, 16) for b in batches)
    m = tiny_model()
    seqs = learnable_sequences(n=40, L=12, n_titles=30)
    specs = default_layers(2)
    default, small = (encode_sequences(ProfileEncoder(m, specs), seqs, batch_tokens=t) for t in (0, 24))
    for name in default:
        np.testing.assert_allclose(default[name], small[name], atol=2e-5, rtol=1e-4)


def test_the_accelerator_path_gathers_the_same_batches_and_vectors():
    """gather_batch (ids gathered where the flat token table lives) equals batch_ids, and the
    accelerator's encode loop, run here on the CPU, gives the CPU loop's vectors."""
    from fm.extract import batch_ids
    from fm.stream import _encode_on_device, gather_batch
    m = tiny_model()
    seqs = learnable_sequences(n=40, L=12, n_titles=30).take(np.arange(40))
    seqs = seqs.keep_tokens(np.random.default_rng(1).random(int(seqs.offsets[-1])) < 0.7)   # ragged rows
    seqs = seqs.take(np.flatnonzero(seqs.lengths > 0))
    flat = torch.stack([torch.from_numpy(seqs.values[f]) for f in TOKEN_FIELDS], dim=1)
    for rows in (np.arange(len(seqs)), np.array([5, 2, 9])):
        for max_len in (4, 16):
            want, got = batch_ids(seqs, rows, max_len), gather_batch(flat, seqs.offsets, rows, max_len)
            assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])
    specs = default_layers(2)
    enc = ProfileEncoder(m, specs)
    ref = encode_sequences(enc, seqs, batch_tokens=24)
    out = {n: np.empty((len(seqs), d), np.float32) for n, d in zip(enc.names, enc.dims)}
    with torch.inference_mode():
        got = _encode_on_device(enc, seqs, 24, 1024, torch.device("cpu"), out)
    for name in ref:
        np.testing.assert_allclose(got[name], ref[name], atol=2e-5, rtol=1e-4)


def test_sampled_softmax_over_the_touched_titles_equals_the_whole_table():
    """The objective computes only the titles a step touches; loss and gradients are those of the
    whole-table computation (ID dropout off, where both are deterministic)."""
    from fm.losses import sampled_softmax
    m = tiny_model()
    g = torch.Generator().manual_seed(1)
    q, tgt = torch.randn(7, 16, generator=g), torch.randint(N_SPECIAL, 30, (7,), generator=g)
    neg = torch.randint(N_SPECIAL, 30, (12,), generator=g)                 # repeats, and hits on targets
    log_q = torch.log(torch.full((30,), 1 / 30))
    grads = []
    for table in (lambda: m.title.table(), lambda: m.title):
        m.zero_grad()
        loss = sampled_softmax(q, table(), tgt, neg, log_q, m.bias)
        loss.backward()
        grads.append((loss.detach(), m.title.proj.weight.grad.clone(), m.title.id.weight.grad.clone()))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
    assert grads[0][0] > 0
