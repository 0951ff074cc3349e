"""Titles no training has seen: how a title that arrives after training (or is held out of it) is
served, and how its score is made comparable with the trained titles'.

Kept apart from ``fm.model`` because none of it is the network: these functions write the rows of a
trained model's title table (ID row and bias) for titles without a trained ID, by the method the
model's ``cfg.cold_titles`` names -- the content projection alone (scaled, with a calibrated bias;
the path ID dropout trains, the validated default), a ridge map from content to whole title vectors,
or the mean of the nearest trained titles by content. Trained rows are never touched.
"""
from __future__ import annotations

import torch

from fm import schema as S
from fm.model import FoundationModel


@torch.no_grad()
def add_titles(model: FoundationModel, new_content: torch.Tensor, serve: bool = True) -> None:
    """Grow ``model``'s title table by ``new_content`` (one row per new title) and give the new
    titles what ``cfg.cold_titles`` says (``serve=False``: the content projection alone, zero ID
    rows). What embed, fine-tuning and evaluation do with titles that arrived after training."""
    n_old = model.cfg.n_titles
    model.grow_titles(new_content)
    n_new = model.cfg.n_titles - n_old
    if serve and n_new and model.cfg.use_content and n_old > S.N_SPECIAL:
        device = model.title.id.weight.device
        trained = torch.zeros(n_old + n_new, dtype=torch.bool, device=device)
        trained[S.N_SPECIAL:n_old] = True
        serve_cold_titles(model, torch.arange(n_old, n_old + n_new, device=device), trained)


@torch.no_grad()
def content_map(model: FoundationModel, trained: torch.Tensor, ridge: float = 1.0) -> torch.Tensor:
    """(content_dim + 1, d_model [+ 1]) ridge least-squares map from the ``trained`` titles' content
    vectors (plus a constant) to their whole title vectors -- and, with a title bias, to their bias
    as the last output column (float64 solve: the same answer in the driver and every Spark task)."""
    t = model.title
    x = t.content[trained]
    y = t.id_part(trained.nonzero(as_tuple=True)[0]) + (t.proj(x) if model.cfg.use_content else 0.0)  # table(), no dropout
    if model.bias is not None:
        y = torch.cat([y, model.bias[trained].unsqueeze(1)], dim=1)
    x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1).double()
    y = y.double()
    reg = ridge * torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
    reg[-1, -1] = 0.0                                                               # the intercept is free
    return torch.linalg.solve(x.T @ x + reg, x.T @ y).to(t.content.dtype)


@torch.no_grad()
def regress_cold_titles(model: FoundationModel, cold: torch.Tensor, trained: torch.Tensor, ridge: float = 1.0) -> None:
    """Give titles without a trained ID (``cold``: indices) the vector -- and the bias -- their
    content predicts.

    Why: the jointly trained content projection is only a small correction on top of the ID rows,
    so a content-only vector lands far from the trained ones. A ridge regression from content
    vectors to the *whole* title vectors of the ``trained`` titles (bool mask) maps a new title into
    the same space; its ID row is set to the prediction minus its content part, so ``table()``
    returns the prediction. The bias is predicted the same way, so a new title's score is on the
    scale of the titles whose content resembles it (calibration), not of an average title. Trained
    rows are untouched (no cost for the warm titles)."""
    t = model.title
    w = content_map(model, trained, ridge)
    content = t.content[cold]
    pred = torch.cat([content, torch.ones_like(content[:, :1])], dim=1) @ w
    d = t.id.weight.shape[1]
    own = t.proj(content) if model.cfg.use_content else torch.zeros_like(pred[:, :d])
    t.id.weight[cold] = (pred[:, :d] - own) / t.id_scale(cold)
    if model.bias is not None:
        model.bias[cold] = pred[:, d]


@torch.no_grad()
def serve_cold_titles(model: FoundationModel, cold: torch.Tensor, trained: torch.Tensor) -> None:
    """Give never-trained titles (``cold``) what ``model.cfg.cold_titles`` says: the content
    projection alone (times ``cfg.cold_content_scale``, the ID row carrying the difference; bias 0
    or ``cfg.cold_bias_quantile`` of the trained titles' biases), the ridge prediction, or the
    neighbours' mean."""
    method = getattr(model.cfg, "cold_titles", "content")
    if method == "ridge":
        regress_cold_titles(model, cold, trained)
    elif method == "neighbours":
        impute_cold_titles(model, cold, trained)
    else:
        t, scale = model.title, getattr(model.cfg, "cold_content_scale", 1.0)
        t.id.weight[cold] = 0.0
        if scale != 1.0 and model.cfg.use_content:               # table() = scale x the content projection
            t.id.weight[cold] = (scale - 1.0) * t.proj(t.content[cold]) / t.id_scale(cold)
        if model.bias is not None:
            model.bias[cold] = cold_bias(model, trained)


@torch.no_grad()
def cold_bias(model: FoundationModel, trained: torch.Tensor) -> torch.Tensor:
    """The bias a never-trained title gets under ``cold_titles="content"``: the
    ``cfg.cold_bias_quantile`` quantile of the ``trained`` titles' biases (bool mask), or 0."""
    q = getattr(model.cfg, "cold_bias_quantile", None)
    if q is None or not bool(trained.any()):
        return model.bias.new_zeros(())
    return torch.quantile(model.bias[trained].float(), q).to(model.bias.dtype)


@torch.no_grad()
def impute_cold_titles(model: FoundationModel, cold: torch.Tensor, trained: torch.Tensor, k: int = 20,
                       temperature: float = 0.05) -> None:
    """Neighbour imputation, the alternative to :func:`regress_cold_titles`: a cold title takes the
    similarity-weighted mean vector and bias of its ``k`` nearest trained titles by content cosine
    (softmax over cosine / ``temperature``). Local where the ridge map is global: a title whose text
    matches a few specific titles lands next to them rather than on a catalogue-wide average."""
    t = model.title
    idx = trained.nonzero(as_tuple=True)[0]
    unit = lambda x: x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)  # noqa: E731
    sim = unit(t.content[cold]) @ unit(t.content[idx]).T
    top, pos = sim.topk(min(k, len(idx)), dim=1)
    w = torch.softmax(top / temperature, dim=1)
    nb = idx[pos]                                                       # (n_cold, k) neighbour title ids
    table = t.id_part() + (t.proj(t.content) if model.cfg.use_content else 0.0)
    pred = (w.unsqueeze(-1) * table[nb]).sum(1)
    own = t.proj(t.content[cold]) if model.cfg.use_content else torch.zeros_like(pred)
    t.id.weight[cold] = (pred - own) / t.id_scale(cold)
    if model.bias is not None:
        model.bias[cold] = (w * model.bias[nb]).sum(1)
