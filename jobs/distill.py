"""Distil the current foundation model into a small student: ``fmpipe distill [date=D] [teacher=current]
[d_model=32 n_layers=1 n_heads=1 max_len=50] [time_budget_s=120]``.

Reads ``history/dt=D`` (default: the latest state), the title vocabulary and the teacher checkpoint
(grown to today's titles); trains the student (``fm.distill``: the same model class with a smaller
config, the teacher's next-title scores as soft targets plus the recipe's own objective) through
the product's fit loop on the training job's split (each profile's last target event validates;
``leave_one_out=true`` also keeps the one after it out); writes it as a checkpoint like any model's
(``models/<teacher>-student-<hash>/``: safetensors + JSON sidecar naming its teacher, the distil
settings, and both models' validation NDCG@10 on the same targets). It is not promoted: embed it
with ``fmpipe embed model_version=<student>``; the teacher stays the current model.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
from dataclasses import asdict, dataclass, fields

import pyarrow.parquet as pq
import torch

from fm import checkpoint
from fm import protocol as P
from fm.data import Sequences
from fm.distill import StudentShape, distill
from fm.recipe import Recipe
from jobs.core.io import latest_partition_before, partition
from jobs.core.settings import Paths, parse_date, run_cli
from jobs.train import current_model_dir, fresh_version, load_grown
from jobs.core.vocab import read_vocab, title_ids_by_idx


@dataclass(frozen=True)
class DistillConfig:
    date: str = ""                     # history state to train on (default: the latest)
    teacher: str = "current"           # current | a model version under models/
    d_model: int = 32
    n_layers: int = 1
    n_heads: int = 1
    max_len: int = 50                  # the student's context in events (0: the teacher's)
    temperature: float = 2.0
    w_kl: float = 1.0                  # weight of the KL to the teacher's next-title distribution
    w_hard: float = 0.5                # weight of the student's own objective (next titles + side heads)
    time_budget_s: float = 120.0
    clock: str = "wall"
    lr: float = 3e-3
    batch_size: int = 16
    leave_one_out: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        StudentShape(self.d_model, self.n_layers, self.n_heads, self.max_len)      # validates the shape
        if not self.temperature > 0 or self.w_kl < 0 or self.w_hard < 0 or not (self.w_kl or self.w_hard):
            raise ValueError(f"temperature must be > 0 and w_kl, w_hard >= 0 (not both 0); got "
                             f"{self.temperature}, {self.w_kl}, {self.w_hard}")

    def recipe(self) -> Recipe:
        """The recipe's objective and fit settings with this job's budget (model fields unused)."""
        mine = {f.name for f in fields(Recipe)} & set(asdict(self))
        return Recipe(**{k: getattr(self, k) for k in mine - {"d_model", "n_layers", "n_heads", "max_len"}})


def history_day(paths: Paths, date: str) -> dt.date:
    if date:
        day = parse_date(date)
        if not partition(paths.history, day).exists():
            raise FileNotFoundError(f"history state for {day} missing: {partition(paths.history, day)} (run tokenize first)")
        return day
    day = latest_partition_before(paths.history, dt.date.max) if paths.history.exists() else None
    if day is None:
        raise FileNotFoundError(f"no history state under {paths.history} (run `fmpipe tokenize date=...` first)")
    return day


def teacher_dir(paths: Paths, name: str):
    d = current_model_dir(paths) if name == "current" else paths.models / name
    if not d.is_dir():
        raise FileNotFoundError(f"teacher model {name!r} not found under {paths.models}")
    return d


def run(cfg: DistillConfig, paths: Paths) -> dict:
    day = history_day(paths, cfg.date)
    ids = title_ids_by_idx(read_vocab(paths))
    tdir = teacher_dir(paths, cfg.teacher)
    teacher, encoder, tmeta = load_grown(tdir, ids, pq.read_table(paths.catalogue), paths)
    seqs = Sequences.read(partition(paths.history, day))
    shape = StudentShape(cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.max_len)
    torch.manual_seed(cfg.seed)
    student, result, valid = distill(teacher, seqs, cfg.recipe(), shape, cfg.temperature, cfg.w_kl, cfg.w_hard,
                                     cfg.leave_one_out)
    with P.selecting():
        teacher_valid = P.evaluate(P.fm_scores(teacher), seqs, valid, teacher.cfg.max_len)
    key = hashlib.sha256(json.dumps({**asdict(cfg), "date": day.isoformat(), "teacher": tdir.name},
                                    sort_keys=True).encode()).hexdigest()[:8]
    version = fresh_version(paths, f"{tdir.name}-student-{key}")
    metrics = result.summary()
    meta = {"model_version": version, "vocab_size": len(ids) - 2, "vocab_fingerprint": checkpoint.vocab_fingerprint(ids[2:]),
            "data_range": {"history_state": day.isoformat(), "profiles_trained": len(seqs)},
            "parent": tdir.name, "distilled_from": tdir.name, "distill_config": asdict(cfg),
            "metrics": metrics, "n_params": student.n_params(), "teacher_n_params": teacher.n_params(),
            "teacher_valid": teacher_valid, "student_valid": result.best,
            "evaluation_split": "leave_one_out" if cfg.leave_one_out else None}
    out = checkpoint.save(student, encoder, paths.models / version, meta)
    ratio = result.best.get("ndcg@10", 0.0) / teacher_valid["ndcg@10"] if teacher_valid.get("ndcg@10") else None
    return {"model_version": version, "path": str(out), "teacher": tdir.name, "n_params": student.n_params(),
            "teacher_n_params": teacher.n_params(), "valid": result.best, "teacher_valid": teacher_valid,
            "quality_ratio": round(ratio, 4) if ratio is not None else None,
            **{k: v for k, v in metrics.items() if k not in ("history", "best")}}


def main(argv: list[str] | None = None) -> dict:
    return run_cli(DistillConfig, run, __doc__, argv, lambda out: json.dumps(out, indent=2, default=str))
