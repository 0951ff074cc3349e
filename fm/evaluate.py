"""Ranking metrics and the next-title evaluation used for checkpoints and gates.

Full ranking: every title is scored, titles already in the profile's input history are removed,
and the rank of the held-out title gives HR@k and NDCG@k (one relevant item: NDCG = 1/log2(rank+2)).
"""
from __future__ import annotations

import copy

import numpy as np
import torch

from fm.data import Sequences, length_bucketed
from fm.model import FoundationModel, regress_cold_titles
from fm.schema import ACTIONS, N_SPECIAL, vocab_index


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
def next_title_eval(model: FoundationModel, seqs: Sequences, rows: np.ndarray, batch_size: int = 256) -> dict[str, float]:
    """Hold out each profile's last target-action token on a title it had not seen before, and rank it
    against every title given everything before it, with the history's titles removed (the same
    "history removed" protocol as the MovieLens benchmark; repeats would make the task trivial)."""
    target_ids = np.array([vocab_index(ACTIONS)[a] for a in model.cfg.target_actions])
    ends, keep = [], []
    for r in rows:
        s, e = seqs.offsets[r], seqs.offsets[r + 1]
        titles = seqs.values["title"][s:e]
        first_seen = np.zeros(len(titles), bool)
        first_seen[np.unique(titles, return_index=True)[1]] = True
        pos = np.flatnonzero(np.isin(seqs.values["action"][s:e], target_ids) & first_seen)
        pos = pos[pos >= 1]
        if len(pos):
            keep.append(r)
            ends.append(pos[-1])
    if not keep:
        return {}
    keep, ends = np.array(keep), np.array(ends)
    model.eval()
    ranks = []
    for sel in length_bucketed(ends, batch_size):
        b = seqs.batch(keep[sel], model.cfg.max_len, ends=ends[sel])
        h = model.encode(b.tokens)[-1]
        last = h[torch.arange(len(sel)), b.lengths - 1]
        scores = model.title_logits(last.unsqueeze(1), 0)[:, 0]
        targets = torch.as_tensor(seqs.values["title"][seqs.offsets[keep[sel]] + ends[sel]], dtype=torch.long)
        history = [seqs.values["title"][seqs.offsets[r]: seqs.offsets[r] + e] for r, e in zip(keep[sel], ends[sel])]
        ranks.append(rank_of_target(scores, targets, [h[h >= N_SPECIAL] for h in history]))
    return {**metrics_from_ranks(torch.cat(ranks)), "users": len(keep)}


@torch.no_grad()
def head_accuracy(model: FoundationModel, seqs: Sequences, rows: np.ndarray, ends: np.ndarray,
                  heads: tuple[str, ...] = ("action", "duration", "device"), batch_size: int = 256) -> dict[str, dict]:
    """Accuracy of the next-event heads at the given positions: the state after ``[0, ends[i])`` of row
    ``rows[i]`` predicts the fields of token ``ends[i]``. ``majority`` is the accuracy of always
    answering the most frequent value at these positions, so a head that learned nothing is visible."""
    heads = tuple(f for f in heads if f in model.heads)
    hits = {f: 0 for f in heads}
    model.eval()
    for sel in length_bucketed(np.minimum(ends, model.cfg.max_len), batch_size):
        b = seqs.batch(rows[sel], model.cfg.max_len, ends=ends[sel])
        h = model.encode(b.tokens)[-1]
        last = h[torch.arange(len(sel)), b.lengths - 1]                                        # (B, D)
        at = seqs.offsets[rows[sel]] + ends[sel]
        for f in heads:
            pred = model.heads[f](last).argmax(-1).numpy()
            hits[f] += int((pred == seqs.values[f][at]).sum())
    out = {}
    for f in heads:
        truth = seqs.values[f][seqs.offsets[rows] + ends]
        majority = np.bincount(truth).max() / len(truth) if len(truth) else 0.0
        out[f] = {"accuracy": hits[f] / max(len(rows), 1), "majority": float(majority), "n": len(rows)}
    return out


def regressed(model: FoundationModel, titles: np.ndarray) -> FoundationModel:
    """A copy whose ``titles`` get the vectors their content predicts from the other trained titles
    (what ``grow_titles`` gives a title that arrives after training, i.e. what is served)."""
    m = content_only(model, titles)
    trained = torch.ones(m.cfg.n_titles, dtype=torch.bool)
    trained[:N_SPECIAL] = False
    held = torch.as_tensor(np.asarray(titles, np.int64))
    trained[held] = False
    regress_cold_titles(m, held, trained)
    return m


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
