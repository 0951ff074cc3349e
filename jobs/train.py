"""Train the foundation model on the history state of a date and make it the current model.

Reads ``history/dt=D``, the title vocabulary and the catalogue; fits the content encoder on the
catalogue text of the vocabulary's titles; trains; writes ``models/<version>/`` (safetensors +
JSON sidecar + loss-curve PNG) and then points ``models/CURRENT.json`` at it.
"""
from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from fm import checkpoint
from fm.content import ContentEncoder, content_matrix, title_text
from fm.data import Sequences
from fm.model import FoundationModel, ModelConfig, init_weights
from fm.train import TrainConfig, plot_curve, train
from jobs.io import atomic_write_json, partition
from jobs.settings import Paths, parse_date, parse_overrides
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


def current_model_dir(paths: Paths) -> Path:
    pointer = paths.models / "CURRENT.json"
    if not pointer.exists():
        raise FileNotFoundError(f"no current model: {pointer} is missing (run `fmpipe train date=...` first)")
    return paths.models / json.loads(pointer.read_text())["version"]


def run(cfg: TrainJobConfig, paths: Paths) -> dict:
    day = parse_date(cfg.date)
    hist_path = partition(paths.history, day)
    if not hist_path.exists():
        raise FileNotFoundError(f"history state for {day} missing: {hist_path} (run tokenize first)")
    torch.manual_seed(cfg.seed)
    vocab = read_vocab(paths)
    ids = title_ids_by_idx(vocab)
    cat = pq.read_table(paths.catalogue)
    encoder = ContentEncoder.fit(title_text(cat.filter(pc.is_in(cat["title_id"], vocab["title_id"]))),
                                 dim=cfg.content_dim, seed=cfg.seed)
    mcfg = ModelConfig(n_titles=len(ids), content_dim=cfg.content_dim, d_model=cfg.d_model, n_layers=cfg.n_layers,
                       n_heads=cfg.n_heads, max_len=cfg.max_len, dropout=cfg.dropout, mtp_k=cfg.mtp_k,
                       use_content=cfg.use_content)
    model = FoundationModel(mcfg)
    init_weights(model)
    model.title.content.copy_(torch.from_numpy(content_matrix(encoder, ids, cat)))
    seqs = Sequences.read(hist_path)
    tcfg = TrainConfig(batch_size=cfg.batch_size, lr=cfg.lr, epochs=cfg.epochs, time_budget_s=cfg.time_budget_s,
                       seed=cfg.seed, device=cfg.device)
    result = train(model, seqs, tcfg)
    version = f"fm-{day:%Y%m%d}-{hashlib.sha256(json.dumps(asdict(cfg), sort_keys=True).encode()).hexdigest()[:8]}"
    meta = {"model_version": version, "vocab_size": len(ids) - 2, "vocab_fingerprint": checkpoint.vocab_fingerprint(ids[2:]),
            "data_range": {"history_state": day.isoformat(), "profiles": len(seqs)},
            "train_config": asdict(cfg), "metrics": {k: v for k, v in result.items() if k != "curve"},
            "n_params": model.n_params()}
    out = checkpoint.save(model, encoder, paths.models / version, meta)
    plot_curve(result["curve"], out / "loss_curve.png")
    atomic_write_json({"version": version}, paths.models / "CURRENT.json")
    return {"model_version": version, "path": str(out), "n_params": model.n_params(), **meta["metrics"]}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("overrides", nargs="*", help="key=value overrides of TrainJobConfig")
    out = run(parse_overrides(TrainJobConfig, ap.parse_args(argv).overrides), Paths.from_env())
    print(out)
    return out
