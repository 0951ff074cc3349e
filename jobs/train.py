"""Train the foundation model on the history state of a date and make it the current model.

Reads ``history/dt=D``, the title vocabulary and the catalogue; fits the content encoder on the
catalogue text of the vocabulary's titles; trains; writes ``models/<version>/`` (safetensors +
JSON sidecar + loss-curve PNG) and then points ``models/CURRENT.json`` at it.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
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
    epochs: int = 20
    time_budget_s: float = 120.0
    batch_size: int = 64
    lr: float = 3e-3
    seed: int = 0
    device: str = "auto"
    init: str = "scratch"              # scratch | current (fine-tune the serving model on the new days)
    promote: str = "always"            # always | if_better (evaluation gate) | never
    min_ratio: float = 0.98            # if_better: candidate NDCG@10 >= min_ratio x current's


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
                       use_content=cfg.use_content)
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
    torch.manual_seed(cfg.seed)
    vocab = read_vocab(paths)
    ids = title_ids_by_idx(vocab)
    cat = pq.read_table(paths.catalogue)
    seqs = Sequences.read(hist_path)
    has_current = (paths.models / "CURRENT.json").exists()
    among, parent = None, None
    if cfg.init == "current":
        model, encoder, parent = load_grown(current_model_dir(paths), ids, cat)
        since = parse_date(parent["data_range"]["history_state"])
        if since >= day:
            raise ValueError(f"current model already trained on history up to {since}; nothing new before {day}")
        among = _new_day_rows(paths, hist_path, since)
        model.train()
    else:
        model, encoder = _scratch(cfg, ids, cat, vocab)
    tcfg = TrainConfig(batch_size=cfg.batch_size, lr=cfg.lr, epochs=cfg.epochs, time_budget_s=cfg.time_budget_s,
                       seed=cfg.seed, device=cfg.device)
    result = train(model, seqs, tcfg, among=among)
    current = load_grown(current_model_dir(paths), ids, cat)[0] if has_current and cfg.promote == "if_better" else None
    decision = gate(model, current, seqs, result["eval_rows"], cfg.min_ratio) if cfg.promote == "if_better" else \
        {"promote": cfg.promote == "always", "reason": f"promote={cfg.promote}"}
    version = f"fm-{day:%Y%m%d}-{cfg.init}-{hashlib.sha256(json.dumps(asdict(cfg), sort_keys=True).encode()).hexdigest()[:8]}"
    metrics = {k: v for k, v in result.items() if k not in ("curve", "eval_rows")}
    meta = {"model_version": version, "vocab_size": len(ids) - 2, "vocab_fingerprint": checkpoint.vocab_fingerprint(ids[2:]),
            "data_range": {"history_state": day.isoformat(), "profiles_trained": int(len(among) if among is not None else len(seqs))},
            "parent": parent["model_version"] if parent else None, "train_config": asdict(cfg),
            "metrics": metrics, "gate": decision, "n_params": model.n_params()}
    out = checkpoint.save(model, encoder, paths.models / version, meta)
    plot_curve(result["curve"], out / "loss_curve.png")
    if decision["promote"]:
        atomic_write_json({"version": version, "promoted_at": dt.datetime.now(dt.timezone.utc).isoformat()},
                          paths.models / "CURRENT.json")
    return {"model_version": version, "path": str(out), "n_params": model.n_params(), "promoted": decision["promote"],
            "gate": decision, **metrics}


def main(argv: list[str] | None = None) -> dict:
    return run_cli(TrainJobConfig, run, __doc__, argv)
