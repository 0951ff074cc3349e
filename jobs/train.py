"""Train the foundation model on the history state of a date and make it the current model.

Reads ``history/dt=D``, the title vocabulary and the catalogue; fits the content encoder on the
catalogue text of the vocabulary's titles; trains; writes ``models/<version>/`` (safetensors +
JSON sidecar + loss-curve PNG) and then points ``models/CURRENT.json`` at it.

While training, a resumable state is saved under ``models/.train-state/<version>/`` every
``checkpoint_every_s`` seconds; ``resume=true`` continues an interrupted run of the same config
from it (and starts fresh when there is none). ``leave_one_out=true`` trains without each profile's
last two events (the validation and test targets of ``fmpipe evaluate``);
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
from fm.content import ContentEncoder, content_matrix, title_text
from fm.data import Sequences
from fm.evaluate import next_title_eval
from fm.model import FoundationModel, ModelConfig, init_weights
from fm.schema import N_SPECIAL
from fm.train import TrainConfig, plot_curve, train
from jobs.io import atomic_write_json, partition
from jobs.settings import Paths, parse_date, run_cli
from jobs.vocab import read_vocab, title_ids_by_idx


@dataclass(frozen=True)
class TrainJobConfig:
    """Model size and training budget. Small defaults train in ~2 minutes on 2 CPU cores."""
    date: str = ""
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 2
    max_len: int = 128
    mtp_k: int = 2
    content_dim: int = 64
    use_content: bool = True
    dropout: float = 0.1
    id_dropout: float = 0.1            # share of title IDs dropped per step so content alone carries titles (cold start;
                                       # bench/results/cold_start.md: 5x the unseen titles' HR@50 for -0.4% NDCG@10)
    epochs: int = 20
    time_budget_s: float = 120.0
    batch_size: int = 64
    lr: float = 3e-3
    seed: int = 0
    device: str = "auto"
    init: str = "scratch"              # scratch | current (fine-tune the serving model on the new days)
    promote: str = "always"            # always | if_better (evaluation gate) | never
    min_ratio: float = 0.98            # if_better: candidate NDCG@10 >= min_ratio x current's
    leave_one_out: bool = False        # train without each profile's last two events (for `fmpipe evaluate`)
    holdout_titles_frac: float = 0.0   # titles removed from training entirely (cold-start evaluation)
    resume: bool = False               # continue an interrupted run of this config from its saved state
    checkpoint_every_s: float = 60.0   # how often the resumable state is saved (0: never)


# Options that do not change what is trained (left out of the version hash), and options added later
# that only enter the hash when set, so existing configs keep their version names.
_RUN_ONLY = ("resume", "checkpoint_every_s")
_HASHED_IF_SET = {"leave_one_out": False, "holdout_titles_frac": 0.0, "id_dropout": 0.0}


def model_version(cfg: TrainJobConfig, day: dt.date) -> str:
    """Deterministic version name: a resumed run writes the same version as the run it continues."""
    key = {k: v for k, v in asdict(cfg).items()
           if k not in _RUN_ONLY and not (k in _HASHED_IF_SET and v == _HASHED_IF_SET[k])}
    return f"fm-{day:%Y%m%d}-{cfg.init}-{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:8]}"


def current_model_dir(paths: Paths) -> Path:
    pointer = paths.models / "CURRENT.json"
    if not pointer.exists():
        raise FileNotFoundError(f"no current model: {pointer} is missing (run `fmpipe train date=...` first)")
    return paths.models / json.loads(pointer.read_text())["version"]


def _scratch(cfg: TrainJobConfig, ids: list, cat, vocab) -> tuple[FoundationModel, ContentEncoder]:
    encoder = ContentEncoder.fit(title_text(cat.filter(pc.is_in(cat["title_id"], vocab["title_id"]))),
                                 dim=cfg.content_dim, seed=cfg.seed)
    mcfg = ModelConfig(n_titles=len(ids), content_dim=cfg.content_dim, d_model=cfg.d_model, n_layers=cfg.n_layers,
                       n_heads=cfg.n_heads, max_len=cfg.max_len, dropout=cfg.dropout, mtp_k=cfg.mtp_k,
                       use_content=cfg.use_content, id_dropout=cfg.id_dropout)
    model = FoundationModel(mcfg)
    init_weights(model)
    model.title.content.copy_(torch.from_numpy(content_matrix(encoder, ids, cat)))
    return model, encoder


def load_grown(directory: Path, ids: list, cat) -> tuple[FoundationModel, ContentEncoder, dict]:
    """A checkpoint with its title table grown to today's vocabulary (new rows: content only)."""
    model, encoder, meta = checkpoint.load(directory, expected_vocab=ids[2:])
    new_ids = ids[model.cfg.n_titles:]
    if new_ids:
        model.grow_titles(torch.from_numpy(content_matrix(encoder, new_ids, cat)))
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
    """What the model may learn from: without the evaluation targets (``leave_one_out``) and without
    the held-out titles' tokens. Returns the sequences and the held-out title ids."""
    if cfg.leave_one_out:
        from fm.protocol import truncate
        seqs = truncate(seqs, 2)
    held = holdout_titles(seqs, cfg.holdout_titles_frac, cfg.seed) if cfg.holdout_titles_frac > 0 else np.array([], np.int64)
    if len(held):
        seqs = seqs.keep_tokens(~np.isin(seqs.values["title"], held))
    return seqs, held


def gate(candidate: FoundationModel, current: FoundationModel | None, seqs: Sequences, rows: np.ndarray,
         min_ratio: float) -> dict:
    """Evaluate both models on the candidate's held-out profiles; promote if not worse than allowed."""
    cand = next_title_eval(candidate, seqs, rows)
    if current is None:
        return {"candidate": cand, "current": None, "promote": True, "reason": "no current model"}
    cur = next_title_eval(current, seqs, rows)
    ok = cand.get("ndcg@10", 0.0) >= min_ratio * cur.get("ndcg@10", 0.0)
    return {"candidate": cand, "current": cur, "promote": ok,
            "reason": f"candidate ndcg@10 {cand.get('ndcg@10', 0):.4f} vs current {cur.get('ndcg@10', 0):.4f} "
                      f"(needs >= {min_ratio:.2f}x)"}


def run(cfg: TrainJobConfig, paths: Paths) -> dict:
    """Train (from scratch, or fine-tune the current model on the new days), gate, maybe promote."""
    day = parse_date(cfg.date)
    hist_path = partition(paths.history, day)
    if not hist_path.exists():
        raise FileNotFoundError(f"history state for {day} missing: {hist_path} (run tokenize first)")
    if cfg.init not in ("scratch", "current") or cfg.promote not in ("always", "if_better", "never"):
        raise ValueError(f"init must be scratch|current and promote always|if_better|never, got {cfg.init!r}, {cfg.promote!r}")
    if not 0.0 <= cfg.holdout_titles_frac < 1.0:
        raise ValueError(f"holdout_titles_frac must be in [0, 1), got {cfg.holdout_titles_frac}")
    torch.manual_seed(cfg.seed)
    vocab = read_vocab(paths)
    ids = title_ids_by_idx(vocab)
    cat = pq.read_table(paths.catalogue)
    seqs, held = training_sequences(cfg, Sequences.read(hist_path))
    has_current = (paths.models / "CURRENT.json").exists()
    among, parent = None, None
    if cfg.init == "current":
        model, encoder, parent = load_grown(current_model_dir(paths), ids, cat)
        since = parse_date(parent["data_range"]["history_state"])
        if since >= day:
            raise ValueError(f"current model already trained on history up to {since}; nothing new before {day}")
        among = _new_day_rows(paths, hist_path, since)
        model.cfg.id_dropout = cfg.id_dropout          # a training option: this run's, not the parent's
        model.train()
    else:
        model, encoder = _scratch(cfg, ids, cat, vocab)
    version = model_version(cfg, day)
    state_dir = paths.models / ".train-state" / version
    tcfg = TrainConfig(batch_size=cfg.batch_size, lr=cfg.lr, epochs=cfg.epochs, time_budget_s=cfg.time_budget_s,
                       seed=cfg.seed, device=cfg.device, checkpoint_every_s=cfg.checkpoint_every_s)
    excluded = np.isin(np.arange(model.cfg.n_titles), held) if len(held) else None
    result = train(model, seqs, tcfg, among=among, exclude_titles=excluded,
                   state_dir=state_dir if cfg.checkpoint_every_s > 0 else None, resume=cfg.resume)
    if len(held):
        with torch.no_grad():                    # never trained: leave them content-only, as a new title is
            model.title.id.weight[torch.as_tensor(held)] = 0.0
    current = load_grown(current_model_dir(paths), ids, cat)[0] if has_current and cfg.promote == "if_better" else None
    decision = gate(model, current, seqs, result["eval_rows"], cfg.min_ratio) if cfg.promote == "if_better" else \
        {"promote": cfg.promote == "always", "reason": f"promote={cfg.promote}"}
    metrics = {k: v for k, v in result.items() if k not in ("curve", "eval_rows")}
    meta = {"model_version": version, "vocab_size": len(ids) - 2, "vocab_fingerprint": checkpoint.vocab_fingerprint(ids[2:]),
            "data_range": {"history_state": day.isoformat(), "profiles_trained": int(len(among) if among is not None else len(seqs))},
            "parent": parent["model_version"] if parent else None, "train_config": asdict(cfg),
            "metrics": metrics, "gate": decision, "n_params": model.n_params(),
            "evaluation_split": "leave_one_out" if cfg.leave_one_out else None,
            "holdout_titles": {"frac": cfg.holdout_titles_frac, "seed": cfg.seed,
                               "title_ids": [ids[i] for i in held.tolist()]}}
    out = checkpoint.save(model, encoder, paths.models / version, meta)
    plot_curve(result["curve"], out / "loss_curve.png")
    shutil.rmtree(state_dir, ignore_errors=True)          # the run is complete: nothing left to resume
    if decision["promote"]:
        atomic_write_json({"version": version, "promoted_at": dt.datetime.now(dt.timezone.utc).isoformat()},
                          paths.models / "CURRENT.json")
    return {"model_version": version, "path": str(out), "n_params": model.n_params(), "promoted": decision["promote"],
            "gate": decision, **metrics}


def main(argv: list[str] | None = None) -> dict:
    return run_cli(TrainJobConfig, run, __doc__, argv)
