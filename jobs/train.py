"""Train the foundation model on the history state of a date and make it the current model.

Reads ``history/dt=D``, the title vocabulary and the catalogue; fits the content encoder on the
catalogue text of the vocabulary's titles; trains; writes ``models/<version>/`` (safetensors +
JSON sidecar + loss-curve PNG) and then points ``models/CURRENT.json`` at it.

While training, a resumable state is saved under ``models/.train-state/<version>/`` every
``checkpoint_every_s`` seconds; ``resume=true`` continues an interrupted run of the same config
from it (and starts fresh when there is none). The model, objective and fit settings are
``fm.recipe.Recipe``'s (defaults = what validation chose; ``fmpipe train lr=... n_negatives=...``
overrides any of them). Every profile trains; each profile's last target event is the validation
target that picks the checkpoint and gates promotion. ``leave_one_out=true`` also keeps the event
after it out (training ends two events before the end: the validation and test targets of
``fmpipe evaluate``);
``holdout_titles_frac=F`` removes a seeded random fraction of the titles from training entirely, for
the cold-start evaluation (their ids are recorded in the checkpoint's metadata).
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from fm import checkpoint
from fm import protocol as P
from fm.cold import add_titles
from fm.content import Encoder, content_matrix, fit_encoder
from fm.data import Sequences
from fm.fit import plot_curve
from fm.model import FoundationModel
from fm.recipe import Recipe, build, cold_calibration, held_out_back, recipe_of, train
from fm.schema import N_SPECIAL
from jobs.core.io import atomic_write_json, partition
from jobs.core.settings import Paths, parse_date, run_cli
from jobs.core.vocab import read_vocab, title_ids_by_idx


@dataclass(frozen=True)
class TrainJobConfig(Recipe):
    """What to train on and what to do with the result; the model, objective and fit settings are the
    recipe's (``fm.recipe.Recipe``: the defaults validation chose)."""
    date: str = ""
    init: str = "scratch"              # scratch | current (fine-tune the serving model on the new days)
    promote: str = "always"            # always | if_better (evaluation gate) | never
    min_ratio: float = 0.98            # if_better: candidate NDCG@10 >= min_ratio x current's
    leave_one_out: bool = False        # also keep each profile's last event out (the test target of `fmpipe evaluate`)
    holdout_titles_frac: float = 0.0   # titles removed from training entirely (cold-start evaluation)
    resume: bool = False               # continue an interrupted run of this config from its saved state
    checkpoint_every_s: float = 60.0   # how often the resumable state is saved (0: never)


# Options that do not change what is trained (left out of the version hash).
_RUN_ONLY = ("resume", "checkpoint_every_s", "device")
DATASET_META = "dataset.json"


# Settings added after version names were first pinned, each with the value that behaves as before it existed.
_ADDED_LATER = (("surfaces", ""), ("rel_bias", "none"), ("target_canvases", ""), ("cold_titles", "content"),
                ("cold_bias_quantile", None), ("cold_content_scale", 1.0), ("ema", 0.0))


def model_version(cfg: TrainJobConfig, day: dt.date) -> str:
    """Deterministic version name: a resumed run writes the same version as the run it continues;
    a re-run whose version exists gets a new suffix (``fresh_version``)."""
    key = {k: v for k, v in asdict(cfg).items() if k not in _RUN_ONLY}
    key["cold_bias_quantile"], key["cold_content_scale"] = cold_calibration(cfg)   # auto names what it resolves to
    for name, before in _ADDED_LATER:   # at its old behaviour, a setting added later keeps the old version name
        if key.get(name, before) == before:
            key.pop(name, None)
    return f"fm-{day:%Y%m%d}-{cfg.init}-{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:8]}"


def fresh_version(paths: Paths, version: str) -> str:
    """``version``, or ``version-rN`` when a checkpoint of that name exists already: a re-run never
    overwrites a model (it may be the one serving) before the promotion decision."""
    name, n = version, 1
    while (paths.models / name).exists():
        n += 1
        name = f"{version}-r{n}"
    return name


def dataset_target_actions(paths: Paths) -> tuple[str, ...]:
    """The interactions the imported dataset counts as next-title targets (written by the importer)."""
    meta = paths.home / DATASET_META
    if not meta.exists():
        return ()
    return tuple(json.loads(meta.read_text()).get("target_actions") or ())


def current_model_dir(paths: Paths) -> Path:
    pointer = paths.models / "CURRENT.json"
    if not pointer.exists():
        raise FileNotFoundError(f"no current model: {pointer} is missing (run `fmpipe train date=...` first)")
    return paths.models / json.loads(pointer.read_text())["version"]


def _scratch(cfg: TrainJobConfig, ids: list, cat, vocab, paths: Paths) -> tuple[FoundationModel, Encoder]:
    encoder = fit_encoder(cfg.content_encoder, cat.filter(pc.is_in(cat["title_id"], vocab["title_id"])),
                          dim=cfg.content_dim, seed=cfg.seed)
    content = content_matrix(encoder, ids, cat, cache=paths.content_cache)
    model = build(recipe_of(cfg), len(ids), content, dataset_target_actions(paths))
    return model, encoder


def load_grown(directory: Path, ids: list, cat, paths: Paths) -> tuple[FoundationModel, Encoder, dict]:
    """A checkpoint with its title table grown to today's vocabulary (new rows: content only)."""
    model, encoder, meta = checkpoint.load(directory, expected_vocab=ids[2:])
    new_ids = ids[model.cfg.n_titles:]
    if new_ids:
        add_titles(model, torch.from_numpy(content_matrix(encoder, new_ids, cat, cache=paths.content_cache)))
    return model, encoder, meta


def _new_day_rows(paths: Paths, hist_path: Path, since: dt.date) -> np.ndarray:
    """Rows of the history table for profiles with events after ``since`` (the new days)."""
    last = pq.read_table(hist_path, columns=["last_dt"])["last_dt"]
    return np.flatnonzero(pc.greater(last, pa.scalar(since, pa.date32())).to_numpy(zero_copy_only=False))


def holdout_titles(seqs: Sequences, frac: float, seed: int) -> np.ndarray:
    """A seeded random ``frac`` of the titles that occur in the history (sorted ids)."""
    present = np.unique(seqs.values["title"])
    present = present[present >= N_SPECIAL]
    n = round(frac * len(present))
    return np.sort(np.random.default_rng(seed).choice(present, n, replace=False)) if n else present[:0]


def training_sequences(cfg: TrainJobConfig, seqs: Sequences) -> tuple[Sequences, np.ndarray]:
    """What the model may see: the sequences without the held-out titles' tokens (the validation and
    test targets are cut off by ``fm.recipe.train``). Returns the sequences and the held-out title ids."""
    held = holdout_titles(seqs, cfg.holdout_titles_frac, cfg.seed) if cfg.holdout_titles_frac > 0 else np.array([], np.int64)
    if len(held):
        seqs = seqs.keep_tokens(~np.isin(seqs.values["title"], held))
    return seqs, held


def gate(candidate: FoundationModel, current: FoundationModel | None, seqs: Sequences, valid: P.EvalSet,
         min_ratio: float) -> dict:
    """Both models on the candidate's validation targets (the protocol's ranking); promote if the
    candidate is not worse than allowed."""
    with P.selecting():
        cand = P.evaluate(P.fm_scores(candidate), seqs, valid, candidate.cfg.max_len)
        if current is None:
            return {"candidate": cand, "current": None, "promote": True, "reason": "no current model"}
        cur = P.evaluate(P.fm_scores(current), seqs, valid, current.cfg.max_len)
    ok = cand.get("ndcg@10", 0.0) >= min_ratio * cur.get("ndcg@10", 0.0)
    return {"candidate": cand, "current": cur, "promote": ok,
            "reason": f"candidate ndcg@10 {cand.get('ndcg@10', 0):.4f} vs current {cur.get('ndcg@10', 0):.4f} "
                      f"on {cand.get('users', 0)} validation targets (needs >= {min_ratio:.2f}x)"}


def _check(cfg: TrainJobConfig) -> None:
    if cfg.init not in ("scratch", "current") or cfg.promote not in ("always", "if_better", "never"):
        raise ValueError(f"init must be scratch|current and promote always|if_better|never, got {cfg.init!r}, {cfg.promote!r}")
    if not 0.0 <= cfg.holdout_titles_frac < 1.0:
        raise ValueError(f"holdout_titles_frac must be in [0, 1), got {cfg.holdout_titles_frac}")


def _model(cfg: TrainJobConfig, paths: Paths, ids: list, cat, vocab, hist_path: Path, day: dt.date):
    """(model, encoder, parent meta or None, rows to train on or None for all)."""
    if cfg.init == "scratch":
        return (*_scratch(cfg, ids, cat, vocab, paths), None, None)
    model, encoder, parent = load_grown(current_model_dir(paths), ids, cat, paths)
    since = parse_date(parent["data_range"]["history_state"])
    if since >= day:
        raise ValueError(f"current model already trained on history up to {since}; nothing new before {day}")
    model.cfg.id_dropout = cfg.id_dropout          # a training option: this run's, not the parent's
    model.train()
    return model, encoder, parent, _new_day_rows(paths, hist_path, since)


def trained_on(cfg: TrainJobConfig, day: dt.date, parent: dict | None) -> list[dict]:
    """Which events trained (and validated) this model: per history state, how many events at the end
    of each profile it never trained on; the first of them was its validation target. Inherited from
    the parent for fine-tunes, so `fmpipe evaluate` can find any overlap with its targets."""
    own = {"history_state": day.isoformat(), "held_out_back": held_out_back(cfg.leave_one_out)}
    return [own, *((parent or {}).get("trained_on") or [])]


def run(cfg: TrainJobConfig, paths: Paths) -> dict:
    """Train (from scratch, or fine-tune the current model on the new days), gate, maybe promote."""
    day = parse_date(cfg.date)
    hist_path = partition(paths.history, day)
    if not hist_path.exists():
        raise FileNotFoundError(f"history state for {day} missing: {hist_path} (run tokenize first)")
    _check(cfg)
    torch.manual_seed(cfg.seed)
    vocab = read_vocab(paths)
    ids = title_ids_by_idx(vocab)
    cat = pq.read_table(paths.catalogue)
    seqs, held = training_sequences(cfg, Sequences.read(hist_path))
    has_current = (paths.models / "CURRENT.json").exists()
    model, encoder, parent, among = _model(cfg, paths, ids, cat, vocab, hist_path, day)
    version = model_version(cfg, day)
    state_dir = paths.models / ".train-state" / version
    excluded = np.isin(np.arange(model.cfg.n_titles), held) if len(held) else None
    result, valid = train(recipe_of(cfg), model, seqs, cfg.leave_one_out, among=among, exclude_titles=excluded,
                          state_dir=state_dir if cfg.checkpoint_every_s > 0 else None, resume=cfg.resume,
                          checkpoint_every_s=cfg.checkpoint_every_s)
    if len(held):
        with torch.no_grad():                    # never trained: they get what a new title gets
            model.title.id.weight[torch.as_tensor(held)] = 0.0
    current = load_grown(current_model_dir(paths), ids, cat, paths)[0] if has_current and cfg.promote == "if_better" else None
    decision = gate(model, current, seqs, valid, cfg.min_ratio) if cfg.promote == "if_better" else \
        {"promote": cfg.promote == "always", "reason": f"promote={cfg.promote}"}
    metrics = result.summary()
    meta = {"model_version": version, "vocab_size": len(ids) - 2, "vocab_fingerprint": checkpoint.vocab_fingerprint(ids[2:]),
            "data_range": {"history_state": day.isoformat(), "profiles_trained": int(len(among) if among is not None else len(seqs))},
            "parent": parent["model_version"] if parent else None, "train_config": asdict(cfg),
            "metrics": metrics, "gate": decision, "n_params": model.n_params(),
            "evaluation_split": "leave_one_out" if cfg.leave_one_out else None,
            "trained_on": trained_on(cfg, day, parent),
            "holdout_titles": {"frac": cfg.holdout_titles_frac, "seed": cfg.seed,
                               "title_ids": [ids[i] for i in held.tolist()]}}
    version = fresh_version(paths, version)
    meta["model_version"] = version
    out = checkpoint.save(model, encoder, paths.models / version, meta)
    plot_curve(result.curve, out / "loss_curve.png", result.history)
    shutil.rmtree(state_dir, ignore_errors=True)          # the run is complete: nothing left to resume
    if decision["promote"]:
        atomic_write_json({"version": version, "promoted_at": dt.datetime.now(dt.timezone.utc).isoformat()},
                          paths.models / "CURRENT.json")
    from jobs.tools.sql import refresh_catalogue
    return {"model_version": version, "path": str(out), "n_params": model.n_params(), "promoted": decision["promote"],
            "gate": decision, "valid": result.best, **{k: v for k, v in metrics.items() if k != "history"},
            **refresh_catalogue(paths)}


def main(argv: list[str] | None = None) -> dict:
    return run_cli(TrainJobConfig, run, __doc__, argv)
