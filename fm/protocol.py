"""The evaluation protocol (evaluation only: training lives in ``fm.fit``): leave-one-out-by-time
splits, full ranking, HR/NDCG -- for any sequence model, so the foundation model and baselines are
measured in one harness, and ``fmpipe evaluate``, the training job's validation and the benchmark
give the same figure for the same model and data.

Protocol (``shared/data/README.md`` beside the repository): each user's events are already sorted by (timestamp,
line order). The last event is the test target, the second-last the validation target; training
sees everything before them. Validation inputs are the events before the validation target; test
inputs are the events before the test target (the validation event included). Every title of the
vocabulary except PAD/OOV is ranked, all titles of the user's *whole* input history (not only the
model's context window) are removed, and HR@k / NDCG@k are averaged over users.

A model plugs in with a *score function* ``Batch -> (B, n_titles)``: scores of the next title after
the last real token of each row (:func:`fm_scores` for :class:`fm.model.FoundationModel`).

Sweeps choose settings on ``Split.valid`` only; :func:`evaluate` refuses the test targets while a
:func:`selecting` block is open, so a selection can never read test.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

from fm.data import Batch, Sequences, length_bucketed
from fm.evaluate import metrics_from_ranks, rank_of_target
from fm.schema import CANVASES, N_SPECIAL, vocab_index

ScoreFn = Callable[[Batch], torch.Tensor]


# ---------------------------------------------------------------------------------------------
# Split
# ---------------------------------------------------------------------------------------------
@dataclass
class EvalSet:
    """One target per row: the title at position ``ends[i]`` of row ``rows[i]``, predicted from the
    events ``[0, ends[i])`` of that row."""
    rows: np.ndarray
    ends: np.ndarray
    targets: np.ndarray
    role: str = "test"       # "valid" or "test": what a selection may read (see selecting())

    def __len__(self) -> int:
        return len(self.rows)

    def subset(self, mask: np.ndarray) -> "EvalSet":
        return EvalSet(self.rows[mask], self.ends[mask], self.targets[mask], self.role)


@dataclass
class Split:
    seqs: Sequences          # full sequences (input source for validation and test)
    train: Sequences         # every row without its last two events
    valid: EvalSet           # target = second-last event, input = everything before it
    test: EvalSet            # target = last event, input = everything before it (validation included)


def truncate(seqs: Sequences, drop_last: int) -> Sequences:
    """Each row without its last ``drop_last`` tokens (rows never go below zero length)."""
    lens = np.maximum(seqs.lengths - drop_last, 0)
    keep = np.zeros(int(seqs.offsets[-1]), bool)
    for s, n in zip(seqs.offsets[:-1], lens):
        keep[s: s + n] = True
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    return Sequences(seqs.profile_id.copy(), offsets, {f: v[keep] for f, v in seqs.values.items()})


def eval_set(seqs: Sequences, back: int, role: str = "test", target_actions: np.ndarray | None = None) -> EvalSet:
    """Target = the ``back``-th event from the end (1 = last) of every row long enough for it;
    with ``target_actions`` (action ids), only rows whose target event has one of those actions."""
    rows = np.flatnonzero(seqs.lengths > back)
    ends = (seqs.lengths[rows] - back).astype(np.int64)
    at = seqs.offsets[rows] + ends
    if target_actions is not None:
        keep = np.isin(seqs.values["action"][at], target_actions)
        rows, ends, at = rows[keep], ends[keep], at[keep]
    return EvalSet(rows, ends, seqs.values["title"][at].astype(np.int64), role)


def eval_set_where(seqs: Sequences, keep: np.ndarray, back: int = 1, role: str = "test") -> EvalSet:
    """Target = the ``back``-th last token of each row *among the tokens where* ``keep`` (flat bool
    over all tokens) holds, e.g. the last play on the kids canvas; input = every event before it.
    Rows with fewer such tokens, or whose target would have no input, have no target."""
    keep = np.asarray(keep, bool)
    row = np.repeat(np.arange(len(seqs)), seqs.lengths)                     # row of each token
    c = np.cumsum(keep)                                                     # kept tokens up to each token
    c_end = c[np.maximum(seqs.offsets[1:] - 1, 0)] if len(c) else np.zeros(len(seqs), np.int64)  # ... up to each row's end
    at = np.flatnonzero(keep & (c_end[row] - c + 1 == back))               # back-th last kept token of its row
    rows, ends = row[at], at - seqs.offsets[row[at]]
    ok = ends >= 1
    return EvalSet(rows[ok], ends[ok].astype(np.int64), seqs.values["title"][at[ok]].astype(np.int64), role)


def canvas_eval_set(seqs: Sequences, canvas: int, back: int = 1, role: str = "test",
                    target_actions: np.ndarray | None = None) -> EvalSet:
    """Per-surface targets: each row's ``back``-th last event on canvas id ``canvas`` (whose action is
    one of ``target_actions``, when given), predicted from everything before it. ``back=1`` is the
    test target of a canvas, ``back=2`` its validation target (bench/surfaces.py)."""
    keep = seqs.values["canvas"] == canvas
    if target_actions is not None:
        keep &= np.isin(seqs.values["action"], target_actions)
    return eval_set_where(seqs, keep, back, role)


def before_targets(seqs: Sequences, *sets: EvalSet) -> Sequences:
    """Each row without its events from the first target of any of ``sets`` on: what a model may
    train on when every target of those sets (and everything after them) stays unseen."""
    cut = seqs.lengths.copy()
    for es in sets:
        np.minimum.at(cut, es.rows, es.ends)
    pos = np.arange(int(seqs.offsets[-1])) - np.repeat(seqs.offsets[:-1], seqs.lengths)
    return seqs.keep_tokens(pos < np.repeat(cut, seqs.lengths))


def leave_one_out(seqs: Sequences) -> Split:
    return Split(seqs, truncate(seqs, 2), eval_set(seqs, 2, "valid"), eval_set(seqs, 1, "test"))


_SELECTING = [0]


@contextmanager
def selecting() -> Iterator[None]:
    """Inside this block (choosing settings or checkpoints), evaluating test targets is an error."""
    _SELECTING[0] += 1
    try:
        yield
    finally:
        _SELECTING[0] -= 1


class SelectionReadTest(RuntimeError):
    """A selection (sweep, checkpoint choice) tried to read the test targets."""


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------
def fm_scores(model, surface: str | None = None) -> ScoreFn:
    """Score function of a :class:`fm.model.FoundationModel`: next-title logits at the last token;
    with ``surface`` (a configured surface of the model) "what next on this canvas"."""
    canvas = None
    if surface is not None:
        model.surface_vector(surface)                       # refuses a surface the model was not trained for
        canvas = vocab_index(CANVASES)[surface]

    @torch.no_grad()
    def score(b: Batch) -> torch.Tensor:
        dev = next(model.parameters()).device
        h = model.encode({k: v.to(dev) for k, v in b.tokens.items()})[-1]
        last = h[torch.arange(len(b.rows), device=dev), b.lengths.to(dev) - 1]
        s = None if canvas is None else torch.full((len(b.rows), 1), canvas, device=dev)
        return model.title_logits(last.unsqueeze(1), 0, s)[:, 0].cpu()
    return score


@torch.no_grad()
def rank_targets(score_fn: ScoreFn, seqs: Sequences, es: EvalSet, max_len: int, batch_size: int = 256,
                 exclude_history: bool = True) -> np.ndarray:
    """0-based rank of every target of ``es`` (order of ``es``) among all titles >= N_SPECIAL."""
    ranks = np.zeros(len(es), np.int64)
    titles = seqs.values["title"]
    for sel in length_bucketed(np.minimum(es.ends, max_len), batch_size):
        rows, ends = es.rows[sel], es.ends[sel]
        b = seqs.batch(rows, max_len, ends=ends)
        scores = score_fn(b).float().clone()
        scores[:, :N_SPECIAL] = float("-inf")
        exclude = None
        if exclude_history:
            exclude = [np.unique(titles[seqs.offsets[r]: seqs.offsets[r] + e]) for r, e in zip(rows, ends)]
            exclude = [x[x >= N_SPECIAL] for x in exclude]
        ranks[sel] = rank_of_target(scores, torch.as_tensor(es.targets[sel]), exclude).numpy()
    return ranks


@torch.no_grad()
def top_titles(score_fn: ScoreFn, seqs: Sequences, es: EvalSet, max_len: int, n: int,
               batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """The ``n`` best titles of every target of ``es`` and their scores, ``(len(es), n)`` each, best
    first, among exactly the titles :func:`rank_targets` ranks (PAD/OOV and the input history
    removed, the target kept): the candidate pool a re-ranker (``fm.diversity``) reorders, so its
    lists are scored under this protocol. Refused inside :func:`selecting` for test targets."""
    if _SELECTING[0] and es.role != "valid":
        raise SelectionReadTest("a selection read the test targets' lists: choose on Split.valid only")
    titles = seqs.values["title"]
    top = np.zeros((len(es), n), np.int64)
    val = np.zeros((len(es), n), np.float32)
    for sel in length_bucketed(np.minimum(es.ends, max_len), batch_size):
        rows, ends = es.rows[sel], es.ends[sel]
        scores = score_fn(seqs.batch(rows, max_len, ends=ends)).float().clone()
        scores[:, :N_SPECIAL] = float("-inf")
        for i, (r, e) in enumerate(zip(rows, ends)):
            seen = np.unique(titles[seqs.offsets[r]: seqs.offsets[r] + e])
            seen = seen[(seen >= N_SPECIAL) & (seen != es.targets[sel][i])]
            scores[i, torch.as_tensor(seen, dtype=torch.long)] = float("-inf")
        v, t = scores.topk(min(n, scores.shape[1]), dim=1)
        top[sel, : t.shape[1]], val[sel, : t.shape[1]] = t.numpy(), v.numpy()
    return top, val


def evaluate(score_fn: ScoreFn, seqs: Sequences, es: EvalSet, max_len: int, batch_size: int = 256,
             ks: tuple[int, ...] = (10, 50)) -> dict[str, float]:
    """HR@k / NDCG@k averaged over the users of ``es``, full ranking, history removed."""
    if _SELECTING[0] and es.role != "valid":
        raise SelectionReadTest("a selection (sweep or checkpoint choice) evaluated the test targets: "
                                      "choose on Split.valid only")
    if len(es) == 0:
        return {"users": 0}
    ranks = rank_targets(score_fn, seqs, es, max_len, batch_size)
    return {**metrics_from_ranks(torch.as_tensor(ranks), ks), "users": int(len(es))}


def per_task(score_of: Callable[[str], ScoreFn], seqs: Sequences, sets: dict[str, EvalSet], max_len: int,
             ks: tuple[int, ...] = (10, 50)) -> dict[str, dict]:
    """Several tasks' targets (``sets``: task -> EvalSet, e.g. one per canvas) ranked by one model,
    asked per task with ``score_of(task)`` (the surface query of that canvas, or the plain query);
    ``"mean"`` adds the unweighted mean over the tasks (what a multi-task selection maximises)."""
    out = {name: evaluate(score_of(name), seqs, es, max_len, ks=ks) for name, es in sets.items()}
    scored = [m for m in out.values() if m.get("users")]
    out["mean"] = {k: float(np.mean([m[k] for m in scored])) for k in (scored[0] if scored else {}) if k != "users"}
    return out


def among(score_fn: ScoreFn, candidates: np.ndarray, n_titles: int) -> ScoreFn:
    """``score_fn`` with every title outside ``candidates`` removed (the protocol ranks the titles
    that occur in the data, not the whole catalogue)."""
    mask = torch.zeros(n_titles, dtype=torch.bool)
    mask[torch.as_tensor(candidates, dtype=torch.long)] = True
    return lambda b: score_fn(b).masked_fill(~mask, float("-inf"))


def popularity_scores(train: Sequences, n_titles: int) -> ScoreFn:
    """Most-popular baseline (counts on the training part): the sanity floor of the protocol."""
    counts = torch.as_tensor(np.bincount(train.values["title"], minlength=n_titles)[:n_titles], dtype=torch.float32)
    return lambda b: counts.expand(len(b.rows), -1)
