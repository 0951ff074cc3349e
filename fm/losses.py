"""The training objective of the foundation model: multi-token next-title prediction (full or
sampled softmax with logQ correction) plus the multi-task side heads (next action, duration bucket,
device). One module, one objective: ``fmpipe train``, fine-tuning and the benchmarks all use
:class:`Objective`.

Why each option exists (evidence: ``bench/results/quality.md``):

* ``n_negatives > 0``: a *sampled* softmax -- the target's logit against ``n_negatives`` titles drawn
  once per batch from ``(count + 1) ** alpha``, logQ-corrected, accidental hits masked. Cheaper than
  the full softmax at large vocabularies and, with the correction, an unbiased estimate of it.
* ``mask_history``: titles the user already had earlier in the window are removed from the softmax
  at each position (never the target itself). Evaluation removes the history from the ranking, so
  the model need not spend capacity on pushing seen titles down.
* ``exclude_titles``: titles removed from every softmax (held out of training for a cold-start test),
  so training learns nothing about them, not even as negatives.

Surfaces: when the model has surface queries (``ModelConfig.surfaces``), the query for the title at
t+j+1 is conditioned on that event's own canvas (for the next title: ``canvas`` shifted by one), so
the model learns "what next on this canvas"; the canvas is never an input of the state itself.

Targets: only tokens whose action is one of the model's ``target_actions`` -- and, when the model has
``target_canvases`` (a per-canvas specialist), whose canvas is one of them -- are next-title targets
(impressions and pauses are context only); the side heads predict every next token.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from fm.schema import N_SPECIAL

HEADS = ("action", "duration", "device")


def first_positions(titles: torch.Tensor, valid: torch.Tensor, n_titles: int) -> torch.Tensor:
    """(B, L) titles -> (B, n_titles): position of each title's first occurrence in the row, ``L`` if
    absent (so ``first[b, v] <= t`` means "title v was seen at or before position t")."""
    B, L = titles.shape
    first = torch.full((B, n_titles), L, dtype=torch.long, device=titles.device)
    pos = torch.arange(L, device=titles.device).expand(B, L)
    pos = torch.where(valid, pos, torch.full_like(pos, L))
    return first.scatter_reduce(1, titles, pos, reduce="amin")


def sampling_distribution(n_titles: int, counts: np.ndarray | None, alpha: float,
                          excluded: np.ndarray) -> np.ndarray:
    """Negative-sampling probabilities ``(count + 1) ** alpha`` over real titles; 0 for excluded."""
    q = np.zeros(n_titles, np.float64)
    c = np.ones(n_titles - N_SPECIAL) if counts is None else np.asarray(counts[N_SPECIAL:n_titles], np.float64)
    q[N_SPECIAL:N_SPECIAL + len(c)] = (c + 1.0) ** alpha
    q[excluded] = 0.0
    return q / q.sum()


def sampled_softmax(query: torch.Tensor, table: torch.Tensor | Callable[[torch.Tensor], torch.Tensor],
                    tgt: torch.Tensor, neg: torch.Tensor, log_q: torch.Tensor, bias: torch.Tensor | None = None,
                    seen=None) -> torch.Tensor:
    """Cross-entropy of each target title against shared negatives ``neg``, logQ-corrected (so it
    estimates the full softmax without its popularity bias), accidental hits masked.

    ``query`` (N, D) states, ``table`` (V, D) title vectors -- or a function from unique title ids to
    their vectors, so only the titles the step touches are computed (the whole catalogue's content
    projection was a third of a Beauty step) --, ``tgt`` (N,) targets, ``log_q`` (V,) the
    log proposal, ``bias`` (V,) optional per-title bias, ``seen(neg) -> (N, K) bool`` optional mask
    of negatives the row already had (history masking). The one sampled softmax of the project:
    the foundation model's objective and the SASRec control use it alike."""
    t_vec, n_vec = title_rows(table, tgt, neg)
    pos = (query * t_vec).sum(-1, keepdim=True) - log_q[tgt].unsqueeze(1)
    negl = query @ n_vec.T - log_q[neg]                                               # (N, K)
    if bias is not None:
        pos, negl = pos + bias[tgt].unsqueeze(1), negl + bias[neg]
    negl = negl.masked_fill(neg.unsqueeze(0) == tgt.unsqueeze(1), float("-inf"))
    if seen is not None:
        negl = negl.masked_fill(seen(neg), float("-inf"))
    logits = torch.cat([pos, negl], dim=1)
    return F.cross_entropy(logits, torch.zeros(len(tgt), dtype=torch.long, device=logits.device))


def title_rows(table, tgt: torch.Tensor, neg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The vectors of ``tgt`` and ``neg`` from a (V, D) table, or from a function called once on the
    unique ids (so a title drawn twice gets one vector, ID dropout included, as with a whole table)."""
    if isinstance(table, torch.Tensor):
        return table[tgt], table[neg]
    ids, inv = torch.unique(torch.cat([tgt, neg]), return_inverse=True)
    rows = table(ids)
    return rows[inv[: len(tgt)]], rows[inv[len(tgt):]]


class Objective(torch.nn.Module):
    """Multi-task, multi-token loss of a :class:`fm.model.FoundationModel` (head weights from its
    config). With no option set this is the full-softmax cross-entropy over every title."""

    def __init__(self, model, counts: np.ndarray | None = None, n_negatives: int = 0, alpha: float = 0.5,
                 mask_history: bool = False, exclude_titles: np.ndarray | None = None):
        super().__init__()
        self.model, self.n_negatives, self.mask_history = model, n_negatives, mask_history
        n = model.cfg.n_titles
        excl = np.zeros(n, bool) if exclude_titles is None else np.asarray(exclude_titles, bool)
        q = torch.as_tensor(sampling_distribution(n, counts, alpha, excl), dtype=torch.float32)
        self.register_buffer("excluded", torch.as_tensor(excl), persistent=False)
        self.register_buffer("q", q, persistent=False)
        self.register_buffer("log_q", torch.log(q.clamp_min(1e-30)), persistent=False)

    def forward(self, tokens: dict[str, torch.Tensor], valid: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """``tokens``: field -> (B, L) ids; ``valid`` (B, L) marks real tokens. Returns (loss, parts)."""
        m_ = self.model
        c = m_.cfg
        h = m_.encode(tokens)[-1]                                                     # (B, L, D)
        is_target = valid & m_.target_action[tokens["action"]] & m_.target_canvas[tokens["canvas"]]
        first = first_positions(tokens["title"], valid, c.n_titles) if self.mask_history else None
        neg = torch.multinomial(self.q, self.n_negatives, replacement=True) if self.n_negatives > 0 else None
        losses = {}
        for j in range(c.mtp_k):                                                      # state t -> title t+j+1
            m = is_target[:, j + 1:] & valid[:, : -(j + 1)]
            if not m.any():
                continue
            b_idx, t_idx = m.nonzero(as_tuple=True)
            seen = None if first is None else (lambda cols, b=b_idx, t=t_idx: first[:, cols][b] <= t.unsqueeze(1))
            src, tgt = h[:, : -(j + 1)][m], tokens["title"][:, j + 1:][m]
            surface = tokens["canvas"][:, j + 1:][m] if m_.surface is not None else None
            fn = self._full if neg is None else self._sampled
            losses[f"title_{j + 1}"] = fn(src, tgt, j, seen, neg, surface)
        nxt = valid[:, 1:] & valid[:, :-1]
        w = {"title_1": c.w_title, "action": c.w_action, "duration": c.w_duration, "device": c.w_device}
        for f in HEADS:
            if w[f] and nxt.any():
                losses[f] = F.cross_entropy(m_.head(f, h[:, :-1][nxt]), tokens[f][:, 1:][nxt])
        total = sum(w.get(k, c.w_mtp) * v for k, v in losses.items())
        if not losses:                        # no target in the batch: a zero loss that still backprops
            total = h.sum() * 0.0
        return total, {k: float(v.detach()) for k, v in losses.items()}

    def _full(self, src, tgt, j, seen, neg, surface=None) -> torch.Tensor:
        """Cross-entropy over every title (history and excluded titles masked)."""
        surface = None if surface is None else surface.unsqueeze(0)
        logits = self.model.title_logits(src.unsqueeze(0), j, surface)[0]             # (N, V)
        if bool(self.excluded.any()):
            logits = logits.masked_fill(self.excluded, float("-inf"))
        if seen is not None:
            mask = seen(slice(None))
            mask[torch.arange(len(tgt)), tgt] = False
            logits = logits.masked_fill(mask, float("-inf"))
        return F.cross_entropy(logits, tgt)

    def _sampled(self, src, tgt, j, seen, neg, surface=None) -> torch.Tensor:
        """The target against the batch's shared negatives (:func:`sampled_softmax`)."""
        m_ = self.model
        return sampled_softmax(m_.query(src, j, surface), m_.title, tgt, neg, self.log_q, m_.bias, seen)
