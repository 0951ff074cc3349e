"""Evaluate a checkpoint under the shared protocol: ``fmpipe evaluate [model=PATH] [users=1-2999] ...``.

The protocol of ``shared/data/README.md`` (beside the repository), computed by ``fm.protocol`` (the code the quality
benchmark uses): leave-one-out by time (last event = test target, second-last = validation), full
ranking over every title of the dataset, all titles of the user's input history removed, HR@10 /
NDCG@10 / HR@50 / NDCG@50 averaged over users. On the same test positions it adds the accuracy of
the action, duration and device heads, and -- when the model was trained with
``holdout_titles_frac`` -- a cold-start section: the test users whose target is a title held out of
training, scored with those titles' ID embeddings zeroed (content path only), and the same with
the content path off, the floor a model without content embeddings would have.

Data: ``data=history`` (default) reads the pipeline's history table (``date=``, default the latest);
``data=movielens`` reads the ML-1M ratings file itself (``path=``, default the shared copy) in the
protocol's exact event order, mapped onto the pipeline vocabulary. Both order equal timestamps by
arrival (file line), so on the same users and model they agree, except that the history table keeps
only the last ``history_len`` (512) events of a profile. ``trained_on_eval_targets`` checks the
targets against the events the model actually trained and validated on (its checkpoint's
``trained_on`` record). The JSON result is printed and written to ``out=`` (default ``reports/evaluate/<model version>-<split>.json``).
"""
from __future__ import annotations

import datetime as dt
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from fm import protocol as P
from fm.data import Sequences
from fm.evaluate import content_only, head_accuracy, regressed, served
from fm.model import FoundationModel
from fm.schema import CATALOGUE_SCHEMA, N_SPECIAL, OOV
from jobs.core.io import atomic_write_json, latest_partition_before, partition
from jobs.core.settings import Paths, parse_date, run_cli
from jobs.train import current_model_dir, load_grown
from jobs.core.vocab import read_vocab, title_ids_by_idx


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


def history_seconds(path: Path) -> np.ndarray:
    """The ``ts`` of every token of a history table as unix seconds, flat, in token order."""
    ts = pq.read_table(path, columns=["ts"]).column("ts").combine_chunks().flatten()
    return ts.cast("int64").to_numpy(zero_copy_only=False) // 1_000_000


def history_data(cfg: EvalConfig, paths: Paths) -> tuple[Sequences, dict]:
    day = parse_date(cfg.date) if cfg.date else latest_partition_before(paths.history, dt.date.max)
    if day is None or not partition(paths.history, day).exists():
        raise FileNotFoundError(f"no history state {cfg.date or ''} under {paths.history} (run tokenize first)")
    path = partition(paths.history, day)
    seqs = Sequences.read(path)
    seqs.values[TS] = history_seconds(path)
    return seqs, {"source": "history", "date": day.isoformat(), "path": str(path)}


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
    seqs.values[TS] = ml.ts
    return seqs, {"source": "movielens", "path": str(M.data_path(cfg.path or None))}


TS = "_ts_s"      # event time (unix seconds) carried beside the token fields, for the overlap check


def _keys(profile: np.ndarray, title: np.ndarray, ts: np.ndarray) -> pd.MultiIndex:
    return pd.MultiIndex.from_arrays([profile.astype(np.int64), title.astype(np.int64), ts.astype(np.int64)])


def trained_events(paths: Paths, entry: dict, held: np.ndarray) -> tuple[pd.MultiIndex, pd.MultiIndex] | None:
    """(events the model trained on, its validation targets) of one ``trained_on`` entry, as
    (profile, title, unix second) keys rebuilt from that history state; None when it is gone."""
    path = partition(paths.history, parse_date(entry["history_state"]))
    if not path.exists():
        return None
    seqs = Sequences.read(path)
    seqs.values[TS] = history_seconds(path)
    if len(held):
        seqs = seqs.keep_tokens(~np.isin(seqs.values["title"], held))
    lengths = seqs.lengths
    row = np.repeat(np.arange(len(seqs)), lengths)
    pos = np.arange(int(seqs.offsets[-1])) - seqs.offsets[row]
    cut = (lengths - int(entry["held_out_back"]))[row]
    key = lambda m: _keys(seqs.profile_id[row[m]], seqs.values["title"][m], seqs.values[TS][m])  # noqa: E731
    return key(pos < cut), key(pos == cut)


def target_overlap(paths: Paths, meta: dict, seqs: Sequences, es: P.EvalSet, held: np.ndarray) -> dict:
    """How many evaluation targets the model trained on, or chose its checkpoint on (same profile,
    title and second), from the ``trained_on`` record of its checkpoint (fine-tunes inherit their
    parent's). ``trained_on_eval_targets`` is true when either count is above zero."""
    entries = meta.get("trained_on")
    if not entries:
        loo = meta.get("evaluation_split") == "leave_one_out"
        return {"trained_on_eval_targets": not loo, "overlap": None,
                "overlap_note": "checkpoint predates the trained_on record: judged by its leave_one_out flag only"}
    at = seqs.offsets[es.rows] + es.ends
    targets = _keys(seqs.profile_id[es.rows], es.targets, seqs.values[TS][at])
    trained = validated = 0
    missing = []
    for entry in entries:
        got = trained_events(paths, entry, held)
        if got is None:
            missing.append(entry["history_state"])
            continue
        trained += int(targets.isin(got[0]).sum())
        validated += int(targets.isin(got[1]).sum())
    out = {"trained_on_eval_targets": bool(trained or validated),
           "overlap": {"targets": len(es), "trained": trained, "validated": validated}}
    if missing:
        out["overlap_note"] = f"history states {missing} are gone: overlap with them was not checked"
        out["trained_on_eval_targets"] = out["trained_on_eval_targets"] or None
    return out


def candidate_scores(model: FoundationModel, candidates: np.ndarray) -> P.ScoreFn:
    """Next-title scores with every title outside the dataset's titles removed (the protocol ranks
    the titles that occur in the data, not the whole catalogue)."""
    return P.among(P.fm_scores(model), candidates, model.cfg.n_titles)


def cold_start(model: FoundationModel, seqs: Sequences, es: P.EvalSet, held: np.ndarray, candidates: np.ndarray,
               batch_size: int) -> dict:
    """Users whose target was held out of training: held-out titles as serving gives a new title
    (``served``, the model's ``cold_titles`` method), with the vectors a ridge map from content
    predicts (``regressed``), through the content projection only (``content``), and with content
    off (``no_content``, the floor)."""
    cold = es.subset(np.isin(es.targets, held))
    out = {"titles_held_out": len(held), "users": len(cold)}
    variants = {"served": lambda: served(model, held), "regressed": lambda: regressed(model, held),
                "content": lambda: content_only(model, held),
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
    model, _, meta = load_grown(directory, ids, cat, paths)           # titles added since training: content only
    seqs, source = history_data(cfg, paths) if cfg.data == "history" else movielens_data(cfg, ids)
    candidates = np.unique(seqs.values["title"])
    candidates = candidates[candidates >= N_SPECIAL]
    seqs = seqs.take(user_rows(seqs, cfg.users, cfg.max_users))
    ts = seqs.values.pop(TS)
    split = P.leave_one_out(seqs)
    es = split.test if cfg.split == "test" else split.valid
    index = {t: i for i, t in enumerate(ids) if t is not None}
    held = np.array(sorted(index[t] for t in (meta.get("holdout_titles") or {}).get("title_ids", []) if t in index), np.int64)
    overlap = target_overlap(paths, meta, Sequences(seqs.profile_id, seqs.offsets, {**seqs.values, TS: ts}), es, held)
    out = {
        "model_version": meta.get("model_version"), "model_path": str(directory), "split": cfg.split,
        "data": {**source, "users": len(seqs), "titles_ranked": len(candidates),
                 "titles_added_since_training": model.cfg.n_titles - N_SPECIAL - meta["vocab_size"]},
        "protocol": "leave-one-out by time; full ranking over the data's titles; input history removed",
        **overlap,
        "metrics": P.evaluate(candidate_scores(model, candidates), seqs, es, model.cfg.max_len, cfg.batch_size),
        "heads": head_accuracy(model, seqs, es.rows, es.ends, batch_size=cfg.batch_size),
        "cold_start": cold_start(model, seqs, es, held, candidates, cfg.batch_size) if len(held) else None,
    }
    if overlap["trained_on_eval_targets"] is not False:
        out["warning"] = ("the model trained on, or chose its checkpoint on, these targets (see overlap); "
                          "train with leave_one_out=true and evaluate split=test for a fair figure")
    out["eval_s"] = round(time.perf_counter() - t0, 2)
    out["config"] = asdict(cfg)
    target = Path(cfg.out) if cfg.out else paths.reports / "evaluate" / f"{out['model_version']}-{cfg.split}.json"
    atomic_write_json(out, target)
    out["written_to"] = str(target)
    return out


def main(argv: list[str] | None = None) -> dict:
    return run_cli(EvalConfig, run, __doc__, argv, lambda out: json.dumps(out, indent=2, sort_keys=True))
