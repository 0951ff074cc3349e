"""The training recipe: one config, the defaults that validation chose, and the one way a foundation
model is built and trained from it. ``fmpipe train`` (``jobs.train``), the training DAG and
``bench/quality.py`` / ``bench/sweep.py`` all call :func:`build` and :func:`train` -- there is no
second, better path that only the benchmark reaches.

Where the defaults come from: the validation-selected configuration and ablations of the earlier
harness (``bench/results/quality_previous_harness.md``, ML-1M, 300 s CPU each, test NDCG@10: side
heads sharing the state 0.1752 vs without them 0.1858, multi-token k=2 0.1592, no embedding
LayerNorm 0.1360, no history masking 0.1723, no content 0.1549), ID dropout 0.1 from
``bench/results/cold_start_previous_harness.md``. Side heads now learn from a stop-gradient copy of the state, so
they are trained and served without costing next-title quality. Relative attention bias over event
distance (``rel_bias="pos"``): validation NDCG@10 at 600 s CPU, seed 0, Intel: none 0.2031, time
0.2122, pos+time 0.2156, **pos 0.2194** (``bench/results/sweep_rel_bias_{a,b}.md``; the code was
committed as 19a05a7 right after those runs started, hence "+dirty"). Around those defaults at 450 s
(``bench/results/sweep_{c,d}.md``; the all-defaults run twice, 0.2178 and 0.2198, the noise between
two runs of one config) every change lost: dropout 0.2 0.2142, batch 64 0.1877, lr 1e-3 0.1876,
d_model 128 0.2144, 3 layers 0.2168, full softmax 0.1888 (3.5x slower per epoch).

**Dropout 0.3**, chosen at the full budget (1800 s CPU, seed 0, AMD, 1 thread; every validation
target) on both datasets, because 450 s runs favour weak regularisation (over-fitting starts later):
Beauty 0.1 / 0.3 / 0.5: 0.0528 / 0.0622 / 0.0659 (``bench/results/sweep_beauty_dropout.md``); ML-1M
0.1 / 0.3 / 0.5: 0.2157 / 0.2217 / 0.2090 (``bench/results/sweep_ml1m_dropout.md``). Re-checked with the
weight average, decay 0.01 and content_dim 256 on (1800 s CPU, seed 0, AMD): 0.4 against 0.3 gave Beauty
0.0709 / 0.0701 (+1.1%) and ML-1M 0.2219 / 0.2267 (-2.1%), so by the same rule 0.3 stays
(``bench/results/sweep_{beauty,ml1m}_dropout_04.md``). Rule, fixed
before the ML-1M runs ended: among the values measured on every dataset, the one whose worst loss
against each dataset's best is smallest (0.3: 5.6% on Beauty; 0.5: 5.7% on ML-1M; 0.1: 20% on Beauty). Full softmax did not help Beauty either (0.0534 at 450 s, the
same as sampled; run stopped at 900 s). ``bench/sweep.py`` re-checks any
axis through this very path, choosing on validation only (``fm.protocol.selecting`` makes reading
test an error).

**content_dim 256** (TF-IDF/SVD width of the catalogue content), by the same rule at the full budget
(1800 s CPU, seed 0, AMD, 1 thread, validation only): Beauty 64 / 256: 0.0622 / 0.0659 (+6%; its
637 brand/category ids were squeezed into 64 directions), ML-1M 0.2217 / 0.2225 (+0.4%)
(``bench/results/sweep_{beauty,ml1m}_content_dim_256_1800.md``; at 600 s: Beauty +5.6%, ML-1M -1.1%,
``sweep_beauty_content.md``, ``sweep_ml1m_content_dim.md``). 256 is no worse anywhere, so it wins.
512 at the full budget: Beauty 0.0700 (-0.1%), ML-1M 0.2271 (+0.2%), a tie, so the cheaper 256 stays
(``sweep_{beauty,ml1m}_content_dim_512.md``).

**A moving average of the weights (ema 0.999)**, validated beside the trained weights at every
validation, the better one kept (``fm.fit``), at the full budget (1800 s CPU, seed 0, AMD, 1 thread,
train-time validation; ``bench/results/sweep_{ml1m,beauty}_ema.md``): best trained weights / best
average: ML-1M 0.2254 / **0.2271** (+0.8%; the average leads at every validation until the cosine
has annealed), Beauty 0.0645 / **0.0689** (+6.8%, at the first validation, epoch 7: the average
postpones Beauty's over-fitting). Validation keeps the average on both, and it can only be kept
where it validates better, so it is on by default.

**Checked and kept** (Beauty, where the FM loses most from validation to test; 1800 s CPU, seed 0,
AMD, validation only): no per-title bias 0.0688 vs 0.0689 with it (a tie, so the popularity prior
is not what validation can trade away; ``sweep_beauty_title_bias.md``); a cosine annealed over 450 s
instead of 1800 s 0.0688 (the early peak is not a schedule that anneals too late;
``sweep_beauty_budget450.md``); 32 validations instead of 8 0.0694 at epoch 10.5 (``sweep_beauty_n_evals.md``).
The 32-point grid validates the same trajectory (its 225 s and 450 s points equal the 8-point run's),
so it can only find a higher maximum of the same noisy curve: +0.0005 is a third of the standard
error of a 20,000-profile validation NDCG@10 (~0.0014) and costs four times the validation time, so
``n_evals`` stays 8.
d_model 128 with the weight average (does the average's postponed over-fitting let the wider model win
now?): ML-1M 0.2227 vs 0.2271, Beauty peak 0.0675 vs 0.0689 (stopped at 900 s; both on a loaded
machine; ``sweep_{ml1m,beauty}_dmodel_128_ema.md``), so d_model stays 64.

**Weight decay 0.01** (AdamW's decoupled decay, which also shrinks the rows of rarely sampled titles), at
the full budget (1800 s CPU, seed 0, AMD, 1 thread, validation only; both runs on a loaded machine):
Beauty 0 / 0.01: 0.0689 / **0.0701** (+1.7%; the peak moves from epoch 7 to 9.7 and the fall after it is
slower), ML-1M 0.2271 / 0.2267 (-0.2%) (``bench/results/sweep_{beauty,ml1m}_weight_decay_001.md``). By the
rule above (worst loss against each dataset's best: 0.2% for 0.01, 1.7% for 0) the default is 0.01.
Decay 0.1 (same budget, both datasets, one machine load ~5): Beauty 0.0702 (+0.1%, a tie), ML-1M 0.2257
(-0.4%), so 0.01 stays (``sweep_{beauty,ml1m}_weight_decay_01.md``).

**ID dropout 0.1** (cold start needs some; ``bench/results/cold_start_previous_harness.md``), re-checked at
0.3 at the full budget: Beauty 0.0675 (-3.7%), ML-1M 0.2229 (-1.7%), so 0.1 stays
(``sweep_{beauty,ml1m}_id_dropout_03.md``).

**rel_bias pos**, re-checked at the full budget (1800 s CPU, seed 0, AMD, 1 thread, validation only)
because the FM's Beauty test loss sits in same-day targets (a time bias puts a same-day bundle at
distance 0): Beauty none / time / pos_time 0.0677 / 0.0689 / 0.0690 against pos 0.0701 (-3.4% /
-1.7% / -1.6%); ML-1M pos_time 0.2289 against pos 0.2267 (+1.0%). By the rule above (worst loss:
pos 1.0%, pos_time 1.6%) pos stays (``sweep_{beauty,ml1m}_rel_bias_*.md``).

Validation: each profile's last target event (``leave_one_out=False``: training sees everything
before it) or its second-last (``leave_one_out=True``: the last is the test target of ``fmpipe
evaluate``). No profile is withheld from training; the kept checkpoint is the best on validation.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

from fm import protocol as P
from fm.content import ENCODERS
from fm.data import Sequences
from fm.fit import FitConfig, FitResult, fit
from fm.losses import Objective
from fm.model import FoundationModel, ModelConfig, init_weights
from fm.schema import ACTIONS, CANVASES, vocab_index


AUTO = "auto"
# How a never-trained title is served with each content encoder: (bias quantile, content scale), chosen
# on cold validation users pooled over three seeds (``bench/cold_start.py``'s ``choose``: the best cold
# HR@50 whose warm validation NDCG@10 stays within 1% of a model that trained on every title), at the
# current defaults (bench/results/cold_start.md). TF-IDF: the projection at 0.9x with the bias at the
# 99th percentile; the grid had only 0.5x, 0.75x and 1.0x before, and 0.75x serves almost no cold title
# while 1.0x costs warm users, so validation had settled for 1.0x with the median bias (1.35x
# content-kNN, warm -2.3%; now 1.51x, warm -1.4%). MiniLM: the projection at 0.9x with the bias at the
# 95th (its section of cold_start.md: 1.47x content-kNN, warm -2.0%; with the old grid 0.75x at the 99th).
COLD_CALIBRATION: dict[str, tuple[float | None, float]] = {"tfidf": (0.99, 0.9), "minilm": (0.95, 0.9)}


@dataclass(frozen=True)
class Recipe:
    """Model, objective and fit settings. Defaults: chosen on validation (see module docstring)."""
    # model
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 2
    max_len: int = 200
    dropout: float = 0.3               # 1800 s sweeps on ML-1M and Beauty (module docstring)
    mtp_k: int = 1
    content_encoder: str = "tfidf"     # tfidf | minilm (pretrained sentence encoder, fm.content)
    content_dim: int = 256             # TF-IDF width, 1800 s sweeps (module docstring); a pretrained encoder brings its own
    use_content: bool = True
    emb_norm: bool = True
    title_bias: bool = True
    detach_heads: bool = True
    zero_fields: bool = True
    id_dropout: float = 0.1            # cold start: content alone must carry a title (bench/results/cold_start_previous_harness.md)
    exposure_gate: bool = False        # ID part scaled by a learned gate of log(1 + interactions) (fm.model)
    cold_titles: str = "content"       # how a never-trained title is served: content | ridge | neighbours (fm.model)
    cold_bias_quantile: float | str | None = "auto"  # content: its bias, this quantile of trained biases (None: 0;
                                                     # auto: the encoder's, COLD_CALIBRATION)
    cold_content_scale: float | str = "auto"    # content: its vector, this times the content projection (auto: likewise)
    surfaces: str = ""                 # "home,search,kids": canvas-conditioned queries (fm.model); "" = off
    rel_bias: str = "pos"              # relative attention bias: none | pos | time | pos_time (fm.model.RelativeBias)
    target_canvases: str = ""          # "kids": only next events on these canvases are title targets (a
                                       # per-canvas specialist, bench/surfaces.py); "" = every canvas
    w_mtp: float = 0.5
    w_action: float = 0.2
    w_duration: float = 0.2
    w_device: float = 0.1
    target_actions: tuple[str, ...] = ()   # empty: the dataset's (written by the importer), else the schema default
    # objective
    n_negatives: int = 512             # 0: full softmax
    neg_alpha: float = 1.0
    mask_history: bool = True
    # fit
    lr: float = 3e-3
    batch_size: int = 16
    weight_decay: float = 0.01         # 1800 s sweeps on ML-1M and Beauty (module docstring)
    ema: float = 0.999                 # moving average of the weights, validated beside them (fm.fit); 0: off
    time_budget_s: float = 120.0       # inf: until max_epochs or early stopping
    clock: str = "wall"                # wall | cpu: what the budget counts
    max_epochs: int = 10_000
    n_evals: int = 8
    patience: int = 0
    window_mode: str = "tokens"
    valid_users: int = 20_000          # validation targets drawn from this many profiles (0: all). NDCG@10's
                                       # standard error is up to about 0.3/sqrt(n): 0.007 at 2000 profiles, as large
                                       # as the differences checkpoints and sweeps choose between; 0.002 here
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        for name in ("cold_bias_quantile", "cold_content_scale"):
            value = getattr(self, name)
            if isinstance(value, str) and value != AUTO:
                raise ValueError(f"{name}: expected a number or {AUTO!r} (the content encoder's calibration), got {value!r}")
        unknown = set(self.target_actions) - set(ACTIONS)
        if unknown:
            raise ValueError(f"target_actions: unknown action(s) {sorted(unknown)}; valid: {list(ACTIONS)}")
        unknown_surfaces = set(surface_names(self.surfaces)) - set(CANVASES)
        if unknown_surfaces:
            raise ValueError(f"surfaces: unknown canvas(es) {sorted(unknown_surfaces)}; valid: {list(CANVASES)}")
        unknown_targets = set(surface_names(self.target_canvases)) - set(CANVASES)
        if unknown_targets:
            raise ValueError(f"target_canvases: unknown canvas(es) {sorted(unknown_targets)}; valid: {list(CANVASES)}")
        if self.content_encoder not in ENCODERS:
            raise ValueError(f"content_encoder={self.content_encoder!r}: expected one of {', '.join(ENCODERS)}")


RECIPE_FIELDS = tuple(f.name for f in fields(Recipe))


def surface_names(text: str) -> tuple[str, ...]:
    """'home, search,kids' -> ('home', 'search', 'kids'); duplicates dropped, order kept."""
    return tuple(dict.fromkeys(x.strip() for x in text.split(",") if x.strip()))


def recipe_of(cfg) -> Recipe:
    """The recipe part of a larger config (e.g. ``jobs.train.TrainJobConfig``)."""
    return Recipe(**{k: getattr(cfg, k) for k in RECIPE_FIELDS})


def cold_calibration(r) -> tuple[float | None, float]:
    """(bias quantile, content scale) for never-trained titles: the values given, or where ``auto``
    the ones validated for the recipe's content encoder (``COLD_CALIBRATION``)."""
    q, scale = COLD_CALIBRATION.get(r.content_encoder, COLD_CALIBRATION["tfidf"])
    return (q if r.cold_bias_quantile == AUTO else r.cold_bias_quantile,
            scale if r.cold_content_scale == AUTO else float(r.cold_content_scale))


def model_config(r: Recipe, n_titles: int, target_actions: tuple[str, ...], content_dim: int | None = None) -> ModelConfig:
    cold_q, cold_scale = cold_calibration(r)
    return ModelConfig(n_titles=n_titles, content_dim=content_dim or r.content_dim, d_model=r.d_model, n_layers=r.n_layers,
                       n_heads=r.n_heads, max_len=r.max_len, dropout=r.dropout, mtp_k=r.mtp_k,
                       use_content=r.use_content, emb_norm=r.emb_norm, title_bias=r.title_bias,
                       detach_heads=r.detach_heads, id_dropout=r.id_dropout, exposure_gate=r.exposure_gate,
                       cold_titles=r.cold_titles, cold_bias_quantile=cold_q, cold_content_scale=cold_scale,
                       surfaces=surface_names(r.surfaces), rel_bias=r.rel_bias,
                       target_canvases=surface_names(r.target_canvases),
                       w_mtp=r.w_mtp,
                       w_action=r.w_action, w_duration=r.w_duration, w_device=r.w_device,
                       **({"target_actions": tuple(target_actions)} if target_actions else {}))


def build(r: Recipe, n_titles: int, content: np.ndarray, target_actions: tuple[str, ...] = ()) -> FoundationModel:
    """A freshly initialised model with the catalogue's content vectors (``content``: n_titles x dim)."""
    torch.manual_seed(r.seed)
    model = FoundationModel(model_config(r, n_titles, tuple(r.target_actions) or tuple(target_actions),
                                         content_dim=content.shape[1]))
    init_weights(model, zero_fields=r.zero_fields)
    model.title.content.copy_(torch.from_numpy(np.asarray(content, np.float32)))
    return model


def target_ids(model: FoundationModel) -> np.ndarray:
    """Action vocabulary ids of the model's target actions."""
    index = vocab_index(ACTIONS)
    return np.array([index[a] for a in model.cfg.target_actions], np.int64)


def validation_set(seqs: Sequences, back: int, actions: np.ndarray, n_users: int, seed: int,
                   among: np.ndarray | None = None, canvases: np.ndarray | None = None) -> P.EvalSet:
    """The validation targets: the ``back``-th event from the end of each row (when it is a target
    action, and with ``canvases`` -- a specialist's target canvases -- on one of them), for at most
    ``n_users`` rows drawn with ``seed`` (0: all), optionally only rows ``among``."""
    es = P.eval_set(seqs, back, "valid", actions)
    if among is not None:
        es = es.subset(np.isin(es.rows, among))
    if canvases is not None:
        es = es.subset(np.isin(seqs.values["canvas"][seqs.offsets[es.rows] + es.ends], canvases))
    if n_users and len(es) > n_users:
        keep = np.zeros(len(es), bool)
        keep[np.random.default_rng(seed + 7).choice(len(es), n_users, replace=False)] = True
        es = es.subset(keep)
    return es


def target_canvas_ids(model: FoundationModel) -> np.ndarray | None:
    """Canvas vocabulary ids of a specialist's target canvases (None: every canvas)."""
    names = getattr(model.cfg, "target_canvases", ())
    return np.array([vocab_index(CANVASES)[c] for c in names], np.int64) if names else None


def fit_config(r: Recipe, desc: str = "train", checkpoint_every_s: float = 0.0) -> FitConfig:
    return FitConfig(budget_s=r.time_budget_s, clock=r.clock, max_epochs=r.max_epochs, batch_size=r.batch_size,
                     lr=r.lr, weight_decay=r.weight_decay, ema=r.ema, n_evals=r.n_evals, patience=r.patience,
                     window_mode=r.window_mode, seed=r.seed, device=r.device,
                     checkpoint_every_s=checkpoint_every_s, desc=desc)


def held_out_back(leave_one_out: bool) -> int:
    """How many events at the end of each profile training never sees: the validation target, and
    with ``leave_one_out`` also the test target after it."""
    return 2 if leave_one_out else 1


def train(r: Recipe, model: FoundationModel, seqs: Sequences, leave_one_out: bool,
          among: np.ndarray | None = None, exclude_titles: np.ndarray | None = None,
          state_dir: Path | None = None, resume: bool = False, checkpoint_every_s: float = 0.0,
          interrupt_after: int | None = None, desc: str = "train", wrap=None) -> tuple[FitResult, P.EvalSet]:
    """Train ``model`` in place on ``seqs`` (rows ``among``, default all) without each row's last
    ``held_out_back`` events; validate on the first of those; keep the best checkpoint.

    ``exclude_titles`` (bool mask over titles): titles removed from every softmax (cold-start holdout).
    Returns the fit result and the validation set (for the promotion gate)."""
    back = held_out_back(leave_one_out)
    rows = np.arange(len(seqs)) if among is None else np.asarray(among)
    train_seqs = P.truncate(seqs.take(rows), back)
    valid = validation_set(seqs, back, target_ids(model), r.valid_users, r.seed, among, target_canvas_ids(model))
    score = P.fm_scores(model)

    def validate() -> dict:
        with P.selecting():
            return P.evaluate(score, seqs, valid, model.cfg.max_len) if len(valid) else {"ndcg@10": 0.0, "users": 0}

    result = fit_model(r, model, train_seqs, validate, exclude_titles=exclude_titles, state_dir=state_dir,
                       resume=resume, checkpoint_every_s=checkpoint_every_s, interrupt_after=interrupt_after, desc=desc,
                       wrap=wrap)
    return result, valid


def fit_model(r: Recipe, model: FoundationModel, train_seqs: Sequences, validate, select: str = "ndcg@10",
              exclude_titles: np.ndarray | None = None, state_dir: Path | None = None, resume: bool = False,
              checkpoint_every_s: float = 0.0, interrupt_after: int | None = None, desc: str = "train",
              wrap=None) -> FitResult:
    """The recipe's objective and fit on exactly ``train_seqs``, keeping the checkpoint best on
    ``validate()[select]``: what :func:`train` runs after choosing its held-out events, and what a
    benchmark with another split (bench/surfaces.py: per-canvas targets) runs itself.

    ``wrap(objective) -> nn.Module``: a loss built around the recipe's objective of ``model`` (the
    distillation loss of ``fm.distill`` adds the teacher's targets to it); None: the objective itself."""
    counts = np.bincount(train_seqs.values["title"], minlength=model.cfg.n_titles)[: model.cfg.n_titles]
    model.title.set_exposure(counts)
    objective = Objective(model, counts, n_negatives=r.n_negatives, alpha=r.neg_alpha,
                          mask_history=r.mask_history, exclude_titles=exclude_titles)
    if wrap is not None:
        objective = wrap(objective)
    return fit(objective, train_seqs, model.cfg.max_len, fit_config(r, desc, checkpoint_every_s), validate=validate,
               select=select, state_dir=state_dir, resume=resume, interrupt_after=interrupt_after)
