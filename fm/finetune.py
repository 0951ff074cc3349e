"""Fine-tuning the foundation model on a downstream task: a label per profile (issue 15, item 3).

A *task* is a table ``(profile_id, label)`` with binary labels (1: the profile did the thing, e.g.
"its next event completes a title", "it purchases"); the input is the profile's history. Two ways
to adapt the FM, both trained through the product's fit loop (``fm.fit.fit``, windows ending at each
profile's last event, the checkpoint kept by validation AUC):

* :class:`TaskHead` here -- a small MLP head on the FM's last-position state, optionally with the
  top ``top_layers`` blocks (and the final LayerNorm) trained too; the rest of the FM frozen, on a
  copy (the FM the pipeline serves is never changed);
* ``fm.prompts.PromptTask`` -- soft prompt tokens with the whole FM frozen.

The label rides along as an extra per-token field ``label`` of the task's :class:`Sequences` (the
fit loop hands every field of a batch to the objective; the model reads only the token fields), so
no second data path exists. Both expose ``forward(tokens, valid) -> (B,) logits`` and are scored by
:func:`predict` and :func:`auc`.
"""
from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from safetensors.torch import save_file

from fm.data import Sequences, length_bucketed
from fm.durable import commit_dir
from fm.fit import FitResult, fit
from fm.model import FoundationModel
from fm.recipe import Recipe, fit_config

LABEL = "label"


def last_state(h: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B, L, D) states -> (B, D) at each row's last real token."""
    return h[torch.arange(h.shape[0], device=h.device), valid.sum(1) - 1]


class TaskHead(nn.Module):
    """FM (a copy) + MLP head on the last state; trains the head and the top ``top_layers`` blocks."""

    def __init__(self, fm: FoundationModel, hidden: int = 64, top_layers: int = 1):
        super().__init__()
        if not 0 <= top_layers <= fm.cfg.n_layers or hidden < 0:
            raise ValueError(f"top_layers must be in [0, {fm.cfg.n_layers}] and hidden >= 0, got {top_layers}, {hidden}")
        self.fm, self.top_layers = copy.deepcopy(fm).eval(), top_layers
        d = fm.cfg.d_model
        self.head = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, 1)) if hidden else nn.Linear(d, 1)
        for p in self.fm.parameters():
            p.requires_grad_(False)
        for m in [*self.fm.blocks[fm.cfg.n_layers - top_layers:], *([self.fm.ln_f] if top_layers else [])]:
            for p in m.parameters():
                p.requires_grad_(True)

    def forward(self, tokens: dict[str, torch.Tensor], valid: torch.Tensor) -> torch.Tensor:
        return self.head(last_state(self.fm.encode(tokens)[-1], valid)).squeeze(-1)

    def trained_state(self) -> dict[str, torch.Tensor]:
        """The tensors this task trained (its checkpoint: the base FM supplies the rest)."""
        names = {n for n, p in self.named_parameters() if p.requires_grad}
        return {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items() if k in names}


def n_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class TaskObjective(nn.Module):
    """Binary cross-entropy of a task model's logits against the batch's ``label`` field. The FM
    inside stays in eval mode (no dropout): only the task's parameters learn."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def train(self, mode: bool = True) -> "TaskObjective":
        super().train(mode)
        self.model.fm.eval()
        return self

    def forward(self, tokens: dict[str, torch.Tensor], valid: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        y = tokens[LABEL][:, 0].float()
        loss = F.binary_cross_entropy_with_logits(self.model(tokens, valid), y)
        return loss, {"bce": float(loss.detach())}


def task_sequences(seqs: Sequences, profile_ids: np.ndarray, labels: np.ndarray) -> Sequences:
    """The rows of ``profile_ids`` (in that order) with their ``labels`` as a per-token field."""
    row_of = {int(p): i for i, p in enumerate(seqs.profile_id)}
    missing = [int(p) for p in profile_ids if int(p) not in row_of]
    if missing:
        raise LookupError(f"{len(missing)} labelled profile(s) have no history, e.g. {missing[:5]}")
    t = seqs.take(np.array([row_of[int(p)] for p in profile_ids], np.int64))
    t.values[LABEL] = np.repeat(np.asarray(labels, np.int32), t.lengths)
    return t


@torch.no_grad()
def predict(model: nn.Module, seqs: Sequences, max_len: int, batch_size: int = 256) -> np.ndarray:
    """Probabilities per row of ``seqs`` (the window of its last ``max_len`` events)."""
    model.eval()
    out = np.zeros(len(seqs), np.float32)
    for sel in length_bucketed(np.minimum(seqs.lengths, max_len), batch_size):
        b = seqs.batch(sel, max_len)
        out[sel] = torch.sigmoid(model(b.tokens, b.valid)).numpy()
    return out


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score
    labels = np.asarray(labels)
    return float(roc_auc_score(labels, scores)) if 0 < labels.sum() < len(labels) else float("nan")


def labels_of(seqs: Sequences) -> np.ndarray:
    return seqs.values[LABEL][seqs.offsets[:-1]] if len(seqs) else np.zeros(0, np.int32)


def fit_task(model: nn.Module, train: Sequences, valid: Sequences, r: Recipe, desc: str = "task") -> FitResult:
    """Train ``model``'s trainable parameters on ``train`` through the product's fit loop (one
    window per profile ending at its last event), keeping the checkpoint best on ``valid`` AUC."""
    if len(np.unique(labels_of(train))) < 2:
        raise ValueError("the task's training labels are all equal: nothing to learn")
    y_valid = labels_of(valid)
    max_len = model.fm.cfg.max_len

    def validate() -> dict:
        return {"auc": auc(y_valid, predict(model, valid, max_len)) if len(valid) else 0.0}

    return fit(TaskObjective(model), train, max_len, replace(fit_config(r, desc), window_mode="last"),
               validate=validate, select="auc")


def write_artefact(directory: Path, tensors: dict[str, torch.Tensor], meta: dict, weights: str, meta_file: str) -> Path:
    """A task's or prompt's artefact (safetensors + JSON sidecar), written aside, then renamed into place."""
    def fill(tmp: Path) -> None:
        save_file(tensors, str(tmp / weights))
        (tmp / meta_file).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
    return commit_dir(directory, fill)
