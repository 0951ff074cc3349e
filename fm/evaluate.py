"""Ranking metrics, head accuracy and cold-start variants of a model, for ``fm.protocol``.

Full ranking: every title is scored, titles already in the profile's input history are removed,
and the rank of the held-out title gives HR@k and NDCG@k (one relevant item: NDCG = 1/log2(rank+2)).
"""
from __future__ import annotations

import copy

import numpy as np
import torch

from fm.data import Sequences, length_bucketed
from fm.cold import regress_cold_titles, serve_cold_titles
from fm.model import FoundationModel
from fm.schema import ACTIONS, DEVICES, N_SPECIAL


def rank_of_target(scores: torch.Tensor, targets: torch.Tensor, exclude: list[np.ndarray] | None = None) -> torch.Tensor:
    """0-based rank of each target among all candidates; excluded ids (history) are pushed to -inf.

    Ties count against the target (pessimistic), so a constant scorer never looks good.
    """
    scores = scores.clone().float()
    if exclude is not None:
        for i, ex in enumerate(exclude):
            ex = ex[ex != int(targets[i])]
            scores[i, torch.as_tensor(ex, dtype=torch.long)] = float("-inf")
    target_score = scores.gather(1, targets.view(-1, 1))
    return (scores >= target_score).sum(dim=1) - 1


def metrics_from_ranks(ranks: torch.Tensor, ks: tuple[int, ...] = (10, 50)) -> dict[str, float]:
    r = ranks.double()
    out = {}
    for k in ks:
        hit = r < k
        out[f"hr@{k}"] = float(hit.double().mean())
        out[f"ndcg@{k}"] = float((hit.double() / torch.log2(r + 2)).mean())
    return out


@torch.no_grad()
def head_accuracy(model: FoundationModel, seqs: Sequences, rows: np.ndarray, ends: np.ndarray,
                  heads: tuple[str, ...] = ("action", "duration", "device"), batch_size: int = 256) -> dict[str, dict]:
    """Accuracy and AUC of the next-event heads at the given positions: the state after
    ``[0, ends[i])`` of row ``rows[i]`` predicts the fields of token ``ends[i]``.

    ``majority`` is the accuracy of always answering the most frequent value at these positions, so
    a head that learned nothing is visible. Accuracy alone hides a head that ranks well but never
    out-votes the majority (a purchase after 85% page views): ``auc`` gives, per value present at
    these positions, the one-vs-rest ROC AUC of the head's probability for it (0.5: no signal), and
    ``macro_auc`` their mean. Keys are vocabulary names where the schema has them (actions, devices)."""
    heads = tuple(f for f in heads if f in model.heads)
    probs: dict[str, list[np.ndarray]] = {f: [] for f in heads}
    order = []
    model.eval()
    for sel in length_bucketed(np.minimum(ends, model.cfg.max_len), batch_size):
        b = seqs.batch(rows[sel], model.cfg.max_len, ends=ends[sel])
        h = model.encode(b.tokens)[-1]
        last = h[torch.arange(len(sel)), b.lengths - 1]                                        # (B, D)
        order.append(sel)
        for f in heads:
            probs[f].append(torch.softmax(model.head(f, last).float(), -1).numpy())
    order = np.concatenate(order) if order else np.zeros(0, np.int64)
    out = {}
    for f in heads:
        truth = seqs.values[f][seqs.offsets[rows] + ends][order]
        p = np.concatenate(probs[f]) if probs[f] else np.zeros((0, 1), np.float32)
        majority = np.bincount(truth).max() / len(truth) if len(truth) else 0.0
        aucs = one_vs_rest_auc(p, truth, FIELD_NAMES.get(f))
        out[f] = {"accuracy": float((p.argmax(-1) == truth).mean()) if len(truth) else 0.0, "majority": float(majority),
                  "n": len(rows), "auc": aucs, "macro_auc": float(np.mean(list(aucs.values()))) if aucs else None}
    return out


FIELD_NAMES = {"action": ACTIONS, "device": DEVICES}


def one_vs_rest_auc(scores: np.ndarray, truth: np.ndarray, names: tuple[str, ...] | None = None) -> dict[str, float]:
    """ROC AUC of ``scores[:, v]`` for ``truth == v``, for every value ``v`` with both positives and
    negatives among ``truth`` (keyed by ``names[v - N_SPECIAL]`` when given, else by the id)."""
    from sklearn.metrics import roc_auc_score
    out = {}
    for v in np.unique(truth):
        y = truth == v
        if 0 < y.sum() < len(y) and v < scores.shape[1]:
            key = names[v - N_SPECIAL] if names and N_SPECIAL <= v < N_SPECIAL + len(names) else str(int(v))
            out[key] = float(roc_auc_score(y, scores[:, v]))
    return out


def as_cold(model: FoundationModel, titles: np.ndarray, fill) -> FoundationModel:
    """A copy whose never-trained ``titles`` are filled by ``fill(model, cold, trained_mask)``
    (one of ``fm.model``'s cold-title methods)."""
    m = content_only(model, titles)
    trained = torch.ones(m.cfg.n_titles, dtype=torch.bool)
    trained[:N_SPECIAL] = False
    held = torch.as_tensor(np.asarray(titles, np.int64))
    trained[held] = False
    fill(m, held, trained)
    return m


def regressed(model: FoundationModel, titles: np.ndarray) -> FoundationModel:
    """A copy whose ``titles`` get the vectors (and biases) their content predicts by the ridge map
    fitted on the other, trained titles."""
    return as_cold(model, titles, regress_cold_titles)


def served(model: FoundationModel, titles: np.ndarray) -> FoundationModel:
    """A copy whose ``titles`` are what serving gives a title that arrives after training
    (``fm.cold.add_titles``, by the model's ``cold_titles`` method)."""
    return as_cold(model, titles, serve_cold_titles)


def content_only(model: FoundationModel, titles: np.ndarray, content: bool = True) -> FoundationModel:
    """A copy whose ``titles`` have zero ID embeddings, so they are scored (and read in histories)
    through the content path only, as a title never seen in training is. ``content=False`` also turns
    the content path off: the floor a model without content embeddings has on those titles."""
    m = copy.deepcopy(model).eval()
    with torch.no_grad():
        m.title.id.weight[torch.as_tensor(np.asarray(titles, np.int64))] = 0.0
    if not content:
        m.cfg.use_content = False
    return m
