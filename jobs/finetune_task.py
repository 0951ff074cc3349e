"""Fine-tune the current foundation model on a downstream task:
``fmpipe finetune-task task=<name> labels=<table> [date=D] [model=current] [hidden=64] [top_layers=1]``.

``labels``: a Parquet or CSV table with columns ``profile_id`` and ``label`` (0/1, e.g. "completed
the next title", "purchased"); the input of each profile is its history state of ``date`` (default:
the latest). The labelled profiles are split (seeded, ``valid_frac``) into training and validation;
``fm.finetune.TaskHead`` (an MLP head on the FM's last state, plus its top ``top_layers`` blocks) is
trained on a copy of the FM through the product's fit loop, the checkpoint kept by validation AUC.
The task's own checkpoint -- only the tensors it trained, the FM supplies the rest -- is written to
``models/<version>/tasks/<task>/`` (``task.safetensors`` + ``task.json``); the FM is not changed.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import torch

from fm.data import Sequences
from fm.finetune import TaskHead, fit_task, labels_of, n_trainable, task_sequences, write_artefact
from fm.recipe import Recipe
from jobs.distill import history_day, teacher_dir
from jobs.core.io import partition
from jobs.core.settings import Paths, run_cli
from jobs.train import load_grown
from jobs.core.vocab import read_vocab, title_ids_by_idx

WEIGHTS, META = "task.safetensors", "task.json"
NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


@dataclass(frozen=True)
class FinetuneTaskConfig:
    task: str = ""                     # the task's name (lower case, digits, _ -)
    labels: str = ""                   # Parquet or CSV: profile_id, label (0/1)
    date: str = ""                     # history state the inputs come from (default: the latest)
    model: str = "current"             # current | a model version under models/
    hidden: int = 64                   # MLP width of the head (0: a linear head)
    top_layers: int = 1                # FM blocks trained with the head (0: the FM frozen)
    valid_frac: float = 0.2
    time_budget_s: float = 60.0
    clock: str = "wall"
    lr: float = 1e-3
    batch_size: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        check_task(self.task, self.labels, self.valid_frac)

    def recipe(self) -> Recipe:
        return Recipe(time_budget_s=self.time_budget_s, clock=self.clock, lr=self.lr, batch_size=self.batch_size,
                      seed=self.seed)


def check_task(task: str, labels: str, valid_frac: float) -> None:
    if not NAME.match(task):
        raise ValueError(f"task={task!r}: a name of lower-case letters, digits, '_' or '-' is required (task=completion)")
    if not labels:
        raise ValueError("labels=<table> is required: a Parquet or CSV file with columns profile_id, label")
    if not 0.0 < valid_frac < 1.0:
        raise ValueError(f"valid_frac must be in (0, 1), got {valid_frac}")


def read_labels(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(profile_ids, labels) of a label table; one row per profile, labels 0/1."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"labels table {p} does not exist")
    t = pacsv.read_csv(p) if p.suffix.lower() in (".csv", ".gz") else pq.read_table(p)
    missing = {"profile_id", "label"} - set(t.column_names)
    if missing:
        raise ValueError(f"labels table {p}: missing column(s) {sorted(missing)} (has {t.column_names})")
    ids = t["profile_id"].cast(pa.int64()).to_numpy(zero_copy_only=False)
    y = np.asarray(t["label"].to_numpy(zero_copy_only=False), np.float64)
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"labels table {p}: label must be 0 or 1, found {sorted(set(y[~np.isin(y, (0, 1))].tolist()))[:5]}")
    if len(np.unique(ids)) != len(ids):
        raise ValueError(f"labels table {p}: {len(ids) - len(np.unique(ids))} duplicate profile_id(s)")
    return ids, y.astype(np.int32)


def task_data(paths: Paths, model: str, date: str, labels: str, valid_frac: float, seed: int):
    """The FM (grown to today's titles), its version, the training and validation sequences, the day."""
    day = history_day(paths, date)
    ids = title_ids_by_idx(read_vocab(paths))
    mdir = teacher_dir(paths, model)
    fm, _, _ = load_grown(mdir, ids, pq.read_table(paths.catalogue), paths)
    pids, y = read_labels(labels)
    seqs = task_sequences(Sequences.read(partition(paths.history, day)), pids, y)
    perm = np.random.default_rng(seed).permutation(len(seqs))
    n_valid = max(1, int(round(valid_frac * len(seqs))))
    return fm, mdir, seqs.take(np.sort(perm[n_valid:])), seqs.take(np.sort(perm[:n_valid])), day


def run(cfg: FinetuneTaskConfig, paths: Paths) -> dict:
    fm, mdir, train, valid, day = task_data(paths, cfg.model, cfg.date, cfg.labels, cfg.valid_frac, cfg.seed)
    torch.manual_seed(cfg.seed)
    head = TaskHead(fm, cfg.hidden, cfg.top_layers)
    result = fit_task(head, train, valid, cfg.recipe(), desc=f"task {cfg.task}")
    meta = {"task": cfg.task, "model_version": mdir.name, "config": asdict(cfg), "history_state": day.isoformat(),
            "profiles": {"train": len(train), "valid": len(valid)},
            "positive_rate": {"train": float(labels_of(train).mean()), "valid": float(labels_of(valid).mean())},
            "trainable_params": n_trainable(head), "valid": result.best, "metrics": result.summary()}
    out = write_artefact(mdir / "tasks" / cfg.task, head.trained_state(), meta, WEIGHTS, META)
    return {"task": cfg.task, "model_version": mdir.name, "path": str(out), "valid": result.best,
            "trainable_params": n_trainable(head), "profiles": meta["profiles"], "steps": result.steps,
            "train_s": result.train_s}


def main(argv: list[str] | None = None) -> dict:
    return run_cli(FinetuneTaskConfig, run, __doc__, argv, lambda out: json.dumps(out, indent=2, default=str))
