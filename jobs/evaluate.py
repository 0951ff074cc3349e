"""Evaluate a checkpoint under the shared protocol: ``fmpipe evaluate [model=PATH] [users=1-2999] ...``.

The protocol of ``/work/shared/data/README.md``, computed by ``fm.protocol`` (the code the quality
benchmark uses): leave-one-out by time (last event = test target, second-last = validation), full
ranking over every title of the dataset, all titles of the user's input history removed, HR@10 /
NDCG@10 / HR@50 / NDCG@50 averaged over users. On the same test positions it adds the accuracy of
the action, duration and device heads, and -- when the model was trained with
``holdout_titles_frac`` -- a cold-start section: the test users whose target is a title held out of
training, scored with those titles' ID embeddings zeroed (content path only), and the same with
the content path off, the floor a model without content embeddings would have.

Data: ``data=history`` (default) reads the pipeline's history table (``date=``, default the latest);
``data=movielens`` reads the ML-1M ratings file itself (``path=``, default the shared copy) in the
protocol's exact event order, mapped onto the pipeline vocabulary -- use it for figures that compare
with the README's, since the history table orders equal timestamps by token (not file line) and
keeps only the last 512 events of a profile. The JSON result is printed and written to ``out=``
(default ``reports/evaluate/<model version>-<split>.json``).
"""
from __future__ import annotations

import datetime as dt
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from fm import protocol as P
from fm.data import Sequences
from fm.evaluate import content_only, head_accuracy, regressed
from fm.model import FoundationModel
from fm.schema import CATALOGUE_SCHEMA, N_SPECIAL, OOV
from jobs.io import atomic_write_json, latest_partition_before, partition
from jobs.settings import Paths, parse_date, run_cli
from jobs.train import current_model_dir, load_grown
from jobs.vocab import read_vocab, title_ids_by_idx


@dataclass(frozen=True)
class EvalConfig:
    """Which checkpoint, on which data, over which users."""
    model: str = ""                  # checkpoint directory; default: the current model of FMPIPE_HOME
    data: str = "history"            # history | movielens
    date: str = ""                   # history: the history state to evaluate on (default: the latest)
    path: str = ""                   # movielens: the ml-1m directory (default: $FMPIPE_ML1M or the shared copy)
    users: str = ""                  # "LO-HI": only profile ids LO..HI (inclusive), e.g. 1-2999
    max_users: int = 0               # keep the first N profiles (by profile id) after ``users`` (0: all)
    split: str = "test"              # test | valid (the validation target, for choosing settings)
    batch_size: int = 256
    out: str = ""                    # where the JSON goes (default under reports/evaluate/)


def _model_dir(cfg: EvalConfig, paths: Paths) -> Path:
    return Path(cfg.model) if cfg.model else current_model_dir(paths)


def user_rows(seqs: Sequences, users: str, max_users: int) -> np.ndarray:
    """Rows of the profiles in the ``LO-HI`` id range, at most ``max_users`` of them (smallest ids)."""
    keep = np.ones(len(seqs), bool)
    if users:
        try:
            lo, hi = (int(x) for x in users.split("-", 1))
        except ValueError as e:
            raise ValueError(f"users must be LO-HI profile ids (e.g. 1-2999), got {users!r}") from e
        keep &= (seqs.profile_id >= lo) & (seqs.profile_id <= hi)
    rows = np.flatnonzero(keep)
    rows = rows[np.argsort(seqs.profile_id[rows], kind="stable")]
    return rows[:max_users] if max_users else rows


def history_data(cfg: EvalConfig, paths: Paths) -> tuple[Sequences, dict]:
    day = parse_date(cfg.date) if cfg.date else latest_partition_before(paths.history, dt.date.max)
    if day is None or not partition(paths.history, day).exists():
        raise FileNotFoundError(f"no history state {cfg.date or ''} under {paths.history} (run tokenize first)")
    path = partition(paths.history, day)
    return Sequences.read(path), {"source": "history", "date": day.isoformat(), "path": str(path)}


def movielens_data(cfg: EvalConfig, ids: list) -> tuple[Sequences, dict]:
    """The ratings file in protocol order, its titles mapped to the pipeline's vocabulary ids."""
    from fm import movielens as M
    ml = M.load(cfg.path or None)
    index = {t: i for i, t in enumerate(ids) if t is not None}
    lut = np.array([OOV] * N_SPECIAL + [index.get(str(m), OOV) for m in ml.movie_ids], np.int32)
    if (lut[N_SPECIAL:] == OOV).any():
        raise ValueError(f"{int((lut[N_SPECIAL:] == OOV).sum())} rated movies are not in the pipeline vocabulary: "
                         "import the same ratings (`fmpipe import movielens`) and tokenize first")
    seqs = ml.seqs
    seqs.values["title"] = lut[seqs.values["title"]]
    return seqs, {"source": "movielens", "path": str(M.data_path(cfg.path or None))}


def candidate_scores(model: FoundationModel, candidates: np.ndarray) -> P.ScoreFn:
    """Next-title scores with every title outside the dataset's titles removed (the protocol ranks
    the titles that occur in the data, not the whole catalogue)."""
    mask = torch.zeros(model.cfg.n_titles, dtype=torch.bool)
    mask[torch.as_tensor(candidates, dtype=torch.long)] = True
    base = P.fm_scores(model)
    return lambda b: base(b).masked_fill(~mask, float("-inf"))


def cold_start(model: FoundationModel, seqs: Sequences, es: P.EvalSet, held: np.ndarray, candidates: np.ndarray,
               batch_size: int) -> dict:
    """Users whose target was held out of training: held-out titles with the vectors their content
    predicts (``regressed``: what serving gives a new title), through the content projection only
    (``content``), and with content off (``no_content``, the floor)."""
    cold = es.subset(np.isin(es.targets, held))
    out = {"titles_held_out": len(held), "users": len(cold)}
    variants = {"regressed": lambda: regressed(model, held), "content": lambda: content_only(model, held),
                "no_content": lambda: content_only(model, held, content=False)}
    for name, make in variants.items():
        m = make()
        out[name] = P.evaluate(candidate_scores(m, candidates), seqs, cold, m.cfg.max_len, batch_size)
    return out


def run(cfg: EvalConfig, paths: Paths) -> dict:
    if cfg.data not in ("history", "movielens") or cfg.split not in ("test", "valid"):
        raise ValueError(f"data must be history|movielens and split test|valid, got {cfg.data!r}, {cfg.split!r}")
    t0 = time.perf_counter()
    ids = title_ids_by_idx(read_vocab(paths))
    directory = _model_dir(cfg, paths)
    cat = pq.read_table(paths.catalogue) if paths.catalogue.exists() else CATALOGUE_SCHEMA.empty_table()
    model, _, meta = load_grown(directory, ids, cat)           # titles added since training: content only
    seqs, source = history_data(cfg, paths) if cfg.data == "history" else movielens_data(cfg, ids)
    candidates = np.unique(seqs.values["title"])
    candidates = candidates[candidates >= N_SPECIAL]
    seqs = seqs.take(user_rows(seqs, cfg.users, cfg.max_users))
    split = P.leave_one_out(seqs)
    es = split.test if cfg.split == "test" else split.valid
    index = {t: i for i, t in enumerate(ids) if t is not None}
    held = np.array(sorted(index[t] for t in (meta.get("holdout_titles") or {}).get("title_ids", []) if t in index), np.int64)
    trained_loo = meta.get("evaluation_split") == "leave_one_out"
    out = {
        "model_version": meta.get("model_version"), "model_path": str(directory), "split": cfg.split,
        "data": {**source, "users": len(seqs), "titles_ranked": len(candidates),
                 "titles_added_since_training": model.cfg.n_titles - N_SPECIAL - meta["vocab_size"]},
        "protocol": "leave-one-out by time; full ranking over the data's titles; input history removed",
        "trained_on_eval_targets": not trained_loo,
        "metrics": P.evaluate(candidate_scores(model, candidates), seqs, es, model.cfg.max_len, cfg.batch_size),
        "heads": head_accuracy(model, seqs, es.rows, es.ends, batch_size=cfg.batch_size),
        "cold_start": cold_start(model, seqs, es, held, candidates, cfg.batch_size) if len(held) else None,
    }
    if not trained_loo:
        out["warning"] = ("the model was trained on every event, these targets included; train with "
                          "leave_one_out=true for a fair figure")
    out["eval_s"] = round(time.perf_counter() - t0, 2)
    out["config"] = asdict(cfg)
    target = Path(cfg.out) if cfg.out else paths.reports / "evaluate" / f"{out['model_version']}-{cfg.split}.json"
    atomic_write_json(out, target)
    out["written_to"] = str(target)
    return out


def main(argv: list[str] | None = None) -> dict:
    return run_cli(EvalConfig, run, __doc__, argv, lambda out: json.dumps(out, indent=2, sort_keys=True))
