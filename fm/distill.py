"""Distillation: a small student that reproduces the foundation model's next-title scores, for
consumers with a tight latency budget (issue 15, item 3).

The student is the same :class:`fm.model.FoundationModel` class with a smaller config (default one
layer, ``d_model`` 32, one head, a shorter context), so it is saved, loaded, embedded and served
exactly like any model. It trains through the product's fit loop (``fm.recipe.train`` ->
``fm.fit.fit``) on the same split as the teacher, with the recipe's own objective for the student
(hard next-title targets and side heads) plus a distillation term:

    loss = w_hard * Objective(student) + w_kl * T^2 * KL(softmax(teacher / T) || softmax(student / T))

over the next-title logits (every real title) at every position whose next event is a target, the
teacher seeing the same window as the student (frozen, eval mode: its dropout never fires). With
the recipe's history masking, titles already in the window are removed from both distributions:
the teacher was never trained to rank them, so its scores for them are noise the student must not copy. Why
scores rather than vectors: the student's width differs from the teacher's, and what a consumer
needs from it is the teacher's ranking; its own profile and title vectors are then published like
any model's (``fmpipe embed model_version=<student>``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from fm import protocol as P
from fm.data import Sequences
from fm.fit import FitResult
from fm.losses import first_positions
from fm.model import FoundationModel, ModelConfig, init_weights
from fm.recipe import Recipe, train
from fm.schema import N_SPECIAL


@dataclass(frozen=True)
class StudentShape:
    """What makes the student small; everything else (heads, targets, fields) is the teacher's."""
    d_model: int = 32
    n_layers: int = 1
    n_heads: int = 1
    max_len: int = 50                  # context in events (0: the teacher's)

    def __post_init__(self) -> None:
        if min(self.d_model, self.n_layers, self.n_heads) < 1 or self.max_len < 0 or self.d_model % self.n_heads:
            raise ValueError(f"student: d_model, n_layers, n_heads must be positive and d_model divisible by n_heads, "
                             f"max_len >= 0; got {self}")


def student_config(teacher: ModelConfig, shape: StudentShape) -> ModelConfig:
    """The teacher's config with the student's shape (no surface queries: the student answers the
    plain "what next")."""
    d = teacher.to_dict() | {"d_model": shape.d_model, "n_layers": shape.n_layers, "n_heads": shape.n_heads,
                             "max_len": shape.max_len or teacher.max_len, "surfaces": []}
    return ModelConfig.from_dict(d)


def build_student(teacher: FoundationModel, shape: StudentShape, seed: int = 0, zero_fields: bool = True) -> FoundationModel:
    torch.manual_seed(seed)
    student = FoundationModel(student_config(teacher.cfg, shape))
    init_weights(student, zero_fields=zero_fields)
    student.title.content.copy_(teacher.title.content)
    return student


class DistillObjective(nn.Module):
    """The student's own objective (``base``: :class:`fm.losses.Objective`) plus the KL to the
    frozen teacher's next-title distribution."""

    def __init__(self, base: nn.Module, teacher: FoundationModel, temperature: float = 2.0, w_kl: float = 1.0,
                 w_hard: float = 0.5):
        super().__init__()
        if not temperature > 0 or w_kl < 0 or w_hard < 0 or not (w_kl or w_hard):
            raise ValueError(f"temperature > 0 and non-negative weights (not both 0) expected, got "
                             f"{temperature}, {w_kl}, {w_hard}")
        self.base, self.teacher = base, teacher.eval()
        self.temperature, self.w_kl, self.w_hard = temperature, w_kl, w_hard
        for p in self.teacher.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> "DistillObjective":
        super().train(mode)
        self.teacher.eval()                               # the teacher's targets never see dropout
        return self

    def forward(self, tokens: dict[str, torch.Tensor], valid: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        student = self.base.model
        hard, parts = self.base(tokens, valid) if self.w_hard else (0.0, {})
        m = valid[:, :-1] & valid[:, 1:] & student.target_action[tokens["action"][:, 1:]]    # (B, L-1) state t -> t+1
        if not self.w_kl or not m.any():
            return self.w_hard * hard + 0.0 * student.encode(tokens)[-1].sum(), parts
        T = self.temperature
        seen = None
        if getattr(self.base, "mask_history", False):      # as the objective does: titles already in the window are
            b_idx, t_idx = m.nonzero(as_tuple=True)          # out of both distributions (the teacher never learned them)
            first = first_positions(tokens["title"], valid, student.cfg.n_titles)[:, N_SPECIAL:]
            seen = first[b_idx] <= t_idx.unsqueeze(1)                                         # (N, V - N_SPECIAL)
        with torch.no_grad():
            ht = self.teacher.encode(tokens)[-1][:, :-1][m]                                   # (N, D_teacher)
            t_logits = self.teacher.title_logits(ht.unsqueeze(0), 0)[0, :, N_SPECIAL:].float()
            target = F.log_softmax(_masked(t_logits, seen) / T, -1)
        hs = student.encode(tokens)[-1][:, :-1][m]                                            # (N, D_student)
        logits = _masked(student.title_logits(hs.unsqueeze(0), 0)[0, :, N_SPECIAL:].float(), seen)
        kl = F.kl_div(F.log_softmax(logits / T, -1), target, log_target=True, reduction="batchmean") * T * T
        parts["kl"] = float(kl.detach())
        return self.w_hard * hard + self.w_kl * kl, parts


def _masked(logits: torch.Tensor, seen: torch.Tensor | None) -> torch.Tensor:
    """A large finite negative (not -inf: 0 * inf would poison the KL) where ``seen``."""
    return logits if seen is None else logits.masked_fill(seen, -1e4)


def distill(teacher: FoundationModel, seqs: Sequences, r: Recipe, shape: StudentShape = StudentShape(),
            temperature: float = 2.0, w_kl: float = 1.0, w_hard: float = 0.5, leave_one_out: bool = False,
            desc: str = "distill") -> tuple[FoundationModel, FitResult, P.EvalSet]:
    """A student trained by ``r``'s objective and fit settings (its model fields are ignored: the
    student's shape is ``shape``) on the split ``fm.recipe.train`` makes; returns the student (best
    checkpoint on validation NDCG@10), the fit result and the validation targets."""
    student = build_student(teacher, shape, r.seed, r.zero_fields)
    result, valid = train(r, student, seqs, leave_one_out, desc=desc,
                          wrap=lambda base: DistillObjective(base, teacher, temperature, w_kl, w_hard))
    return student.eval(), result, valid


@torch.inference_mode()
def agreement(teacher: FoundationModel, student: FoundationModel, seqs: Sequences, es: P.EvalSet, k: int = 10) -> float:
    """Mean overlap of the teacher's and the student's top-``k`` titles at the targets' positions."""
    both = [P.top_titles(P.fm_scores(m), seqs, es, m.cfg.max_len, k)[0] for m in (teacher, student)]
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(*both)])) if len(es) else 0.0
