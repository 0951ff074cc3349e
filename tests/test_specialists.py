"""Per-canvas specialists and per-surface evaluation (issue 15, item 2; ``bench/surfaces.py``):
``target_canvases`` restricts the next-title targets to the next events on those canvases, a
default config is exactly what it was, and the protocol's per-canvas targets and training cut are
the events they claim to be."""
from __future__ import annotations

import datetime as dt
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fm import protocol as P
from fm.data import Sequences
from fm.losses import Objective
from fm.model import FoundationModel, ModelConfig, init_weights
from fm.recipe import Recipe, model_config, target_canvas_ids, validation_set
from fm.schema import ACTIONS, CANVASES, N_SPECIAL, TOKEN_FIELDS, vocab_index
from jobs.train import TrainJobConfig, model_version

CANVAS, ACTION = vocab_index(CANVASES), vocab_index(ACTIONS)


def tiny(**kw) -> FoundationModel:
    torch.manual_seed(0)
    m = FoundationModel(ModelConfig(n_titles=30, content_dim=8, d_model=16, n_layers=2, n_heads=2, max_len=16,
                                    dropout=0.0, **kw))
    init_weights(m, zero_fields=False)
    m.title.content.copy_(torch.randn(30, 8))
    return m.eval()


def tokens(seed: int = 1) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Random tokens over home / search / kids with target and non-target actions mixed."""
    g = torch.Generator().manual_seed(seed)
    m = tiny()
    toks = {f: torch.randint(N_SPECIAL, n, (3, 10), generator=g) for f, n in m.cfg.field_sizes.items()}
    toks["title"] = torch.randint(N_SPECIAL, 30, (3, 10), generator=g)
    canv = torch.tensor([CANVAS["home"], CANVAS["search"], CANVAS["kids"]])
    toks["canvas"] = canv[torch.randint(0, 3, (3, 10), generator=g)]
    acts = torch.tensor([ACTION["play"], ACTION["impression"], ACTION["complete"]])
    toks["action"] = acts[torch.randint(0, 3, (3, 10), generator=g)]
    return toks, torch.ones(3, 10, dtype=torch.bool)


def expected_title_loss(m: FoundationModel, toks, j: int, canvases: tuple[str, ...]) -> torch.Tensor:
    """Full-softmax cross-entropy over the positions whose (j+1)-th next token is a target action on
    one of ``canvases``, computed by hand."""
    h = m.encode(toks)[-1]
    nxt_action, nxt_canvas = toks["action"][:, j + 1:], toks["canvas"][:, j + 1:]
    keep = m.target_action[nxt_action] & torch.isin(nxt_canvas, torch.tensor([CANVAS[c] for c in canvases]))
    logits = m.title_logits(h[:, : -(j + 1)], j)[keep]
    return F.cross_entropy(logits, toks["title"][:, j + 1:][keep])


def test_target_canvases_restrict_the_next_title_targets():
    toks, valid = tokens()
    for canvases in (("kids",), ("home", "search")):
        m = tiny(mtp_k=2, target_canvases=canvases)
        _, parts = Objective(m)(toks, valid)
        for j in (0, 1):
            want = expected_title_loss(m, toks, j, canvases)
            assert parts[f"title_{j + 1}"] == pytest.approx(float(want.detach()), rel=1e-5)
    # every canvas = the default objective, the same number
    toks, valid = tokens()
    every = tiny(mtp_k=2, target_canvases=tuple(CANVASES))
    default = tiny(mtp_k=2)
    torch.manual_seed(3)
    a = float(Objective(every, n_negatives=8)(toks, valid)[0].detach())
    torch.manual_seed(3)
    b = float(Objective(default, n_negatives=8)(toks, valid)[0].detach())
    assert a == pytest.approx(b, rel=1e-6)


def test_a_specialist_without_targets_in_the_batch_learns_no_titles():
    toks, valid = tokens()
    toks["canvas"][:] = CANVAS["home"]
    m = tiny(target_canvases=("kids",))
    loss, parts = Objective(m)(toks, valid)
    assert not any(k.startswith("title") for k in parts) and {"action", "device"} <= set(parts)
    c = m.cfg
    want = c.w_action * parts["action"] + c.w_duration * parts["duration"] + c.w_device * parts["device"]
    assert float(loss.detach()) == pytest.approx(want, rel=1e-6)      # the side heads only


def test_default_config_and_version_are_unchanged():
    m = tiny()
    assert "target_canvases" not in m.cfg.to_dict()
    assert bool(m.target_canvas.all()) and "target_canvas" not in m.state_dict()
    old = {k: v for k, v in m.cfg.to_dict().items()}                 # a config written before the option
    assert ModelConfig.from_dict(old).target_canvases == ()
    spec = tiny(target_canvases=("kids",))
    d = json.loads(json.dumps(spec.cfg.to_dict()))
    assert d["target_canvases"] == ["kids"] and ModelConfig.from_dict(d) == spec.cfg
    assert set(spec.state_dict()) == set(m.state_dict())              # no new parameters or buffers saved
    # version names computed with the code before target_canvases existed (commit d09c557)
    # (with that commit's defaults of the settings changed since: dropout 0.1, valid_users 2000, content_dim 64,
    # cold_bias_quantile None, ema 0, cold_content_scale 1, weight_decay 0)
    day, then = dt.date(2026, 11, 14), {"dropout": 0.1, "valid_users": 2000, "content_dim": 64, "cold_bias_quantile": None,
                                        "ema": 0.0, "cold_content_scale": 1.0, "weight_decay": 0.0}
    assert model_version(TrainJobConfig(date="2026-11-14", **then), day) == "fm-20261114-scratch-f89e7c1c"
    assert model_version(TrainJobConfig(date="2026-11-14", surfaces="home,kids", rel_bias="none", **then), day) == \
        "fm-20261114-scratch-2f358893"
    assert model_version(TrainJobConfig(date="2026-11-14", target_canvases="kids", **then), day) != \
        "fm-20261114-scratch-f89e7c1c"


def test_target_canvases_validation_and_recipe():
    with pytest.raises(ValueError, match="target_canvases"):
        ModelConfig(n_titles=10, target_canvases=("lobby",))
    with pytest.raises(ValueError, match="target_canvases: unknown canvas"):
        Recipe(target_canvases="kids,lobby")
    assert model_config(Recipe(target_canvases="kids, home"), 10, ()).target_canvases == ("kids", "home")
    assert model_config(Recipe(), 10, ()).target_canvases == ()


# ------------------------------------------------------------------------------------------------
# the protocol's per-canvas targets
# ------------------------------------------------------------------------------------------------
def seqs_of(rows: list[list[tuple[int, str, str]]]) -> Sequences:
    """(title, canvas, action) per token, one list per profile."""
    flat = [t for r in rows for t in r]
    vals = {f: np.full(len(flat), N_SPECIAL, np.int32) for f in TOKEN_FIELDS}
    vals["title"] = np.array([t for t, _, _ in flat], np.int32)
    vals["canvas"] = np.array([CANVAS[c] for _, c, _ in flat], np.int32)
    vals["action"] = np.array([ACTION[a] for _, _, a in flat], np.int32)
    offsets = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64)
    return Sequences(np.arange(len(rows), dtype=np.int64), offsets, vals)


SEQS = seqs_of([
    [(10, "home", "play"), (11, "kids", "play"), (12, "home", "impression"), (13, "home", "complete"),
     (14, "kids", "play"), (15, "search", "play")],
    [(20, "home", "play"), (21, "home", "play")],
    [(30, "kids", "play")],                                   # no input before its only kids event
    [],
])
PLAY = np.array([ACTION[a] for a in ("play", "complete")])


def test_canvas_eval_sets_pick_the_last_target_events_on_each_canvas():
    home = P.canvas_eval_set(SEQS, CANVAS["home"], 1, "test", PLAY)
    assert home.rows.tolist() == [0, 1] and home.ends.tolist() == [3, 1] and home.targets.tolist() == [13, 21]
    home_v = P.canvas_eval_set(SEQS, CANVAS["home"], 2, "valid", PLAY)
    assert len(home_v) == 0 and home_v.role == "valid"      # both second-last home targets have no input
    kids = P.canvas_eval_set(SEQS, CANVAS["kids"], 1, "test", PLAY)
    assert kids.rows.tolist() == [0] and kids.ends.tolist() == [4] and kids.targets.tolist() == [14]
    kids_v = P.canvas_eval_set(SEQS, CANVAS["kids"], 2, "valid", PLAY)
    assert kids_v.rows.tolist() == [0] and kids_v.ends.tolist() == [1] and kids_v.targets.tolist() == [11]
    # without an action filter the impression counts
    any_home = P.canvas_eval_set(SEQS, CANVAS["home"], 2)
    assert any_home.rows.tolist() == [0] and any_home.ends.tolist() == [2]


def test_training_stops_before_the_first_held_out_target():
    sets = [P.canvas_eval_set(SEQS, CANVAS[c], b, "test", PLAY) for c in ("home", "kids") for b in (1, 2)]
    cut = P.before_targets(SEQS, *sets)
    assert cut.lengths.tolist() == [1, 1, 1, 0]                  # row 0: kids validation target at 1
    assert cut.values["title"].tolist() == [10, 20, 30]
    assert P.before_targets(SEQS).lengths.tolist() == SEQS.lengths.tolist()


def test_product_validation_of_a_specialist_reads_its_canvases_only():
    s = seqs_of([[(10, "home", "play"), (11, "kids", "play")], [(20, "kids", "play"), (21, "home", "play")]])
    every = validation_set(s, 1, PLAY, 0, 0)
    assert every.rows.tolist() == [0, 1]
    kids = validation_set(s, 1, PLAY, 0, 0, canvases=target_canvas_ids(tiny(target_canvases=("kids",))))
    assert kids.rows.tolist() == [0] and kids.targets.tolist() == [11]
    assert target_canvas_ids(tiny()) is None


def test_fm_scores_ask_with_the_surface_query():
    m = tiny(surfaces=("kids",))
    with torch.no_grad():
        m.surface.weight[CANVAS["kids"]].normal_()
    b = SEQS.batch(np.array([0, 1]), 16)
    h = m.encode(b.tokens)[-1][torch.arange(2), b.lengths - 1].unsqueeze(1)
    want = m.title_logits(h, 0, torch.full((2, 1), CANVAS["kids"]))[:, 0]
    torch.testing.assert_close(P.fm_scores(m, "kids")(b), want)
    assert not torch.allclose(P.fm_scores(m)(b), want)
    with pytest.raises(KeyError, match="home"):
        P.fm_scores(m, "home")
    res = P.per_task(lambda t: P.fm_scores(m, "kids" if t == "kids" else None), SEQS,
                     {"kids": P.canvas_eval_set(SEQS, CANVAS["kids"], 1, "test", PLAY),
                      "home": P.canvas_eval_set(SEQS, CANVAS["home"], 1, "test", PLAY)}, 16, ks=(10,))
    assert res["kids"]["users"] == 1 and res["home"]["users"] == 2
    assert res["mean"]["ndcg@10"] == pytest.approx((res["kids"]["ndcg@10"] + res["home"]["ndcg@10"]) / 2)


def test_cold_title_calibration_follows_the_content_encoder_unless_given():
    """``auto`` (the default) resolves to the calibration pooled validation chose for the encoder
    (bench/results/cold_start.md, one section per encoder). Given values win; text that is
    neither a number nor ``auto`` is refused by name; a version names what ``auto`` resolves to."""
    from fm.recipe import COLD_CALIBRATION, cold_calibration
    from jobs.core.settings import parse_overrides
    assert cold_calibration(Recipe()) == COLD_CALIBRATION["tfidf"] == (0.99, 0.9)
    minilm = parse_overrides(TrainJobConfig, ["content_encoder=minilm"])
    assert cold_calibration(minilm) == COLD_CALIBRATION["minilm"] == (0.95, 0.9)
    assert model_config(minilm, 10, ()).cold_bias_quantile == 0.95 and model_config(minilm, 10, ()).cold_content_scale == 0.9
    given = parse_overrides(TrainJobConfig, ["content_encoder=minilm", "cold_bias_quantile=0.5", "cold_content_scale=1"])
    assert cold_calibration(given) == (0.5, 1.0)
    assert cold_calibration(parse_overrides(TrainJobConfig, ["cold_bias_quantile=none"])) == (None, 0.9)
    with pytest.raises(ValueError, match="cold_bias_quantile: expected a number or 'auto'"):
        parse_overrides(TrainJobConfig, ["cold_bias_quantile=high"])
    day = dt.date(2026, 11, 14)
    assert model_version(TrainJobConfig(), day) == model_version(TrainJobConfig(cold_bias_quantile=0.99, cold_content_scale=0.9), day)
    assert model_version(minilm, day) == model_version(
        TrainJobConfig(content_encoder="minilm", cold_bias_quantile=0.95, cold_content_scale=0.9), day)
