"""Embedding stabilisation across retrains: orthogonal low-rank alignment.

After a retrain the new model's embedding space is an arbitrary rotation (plus genuine change) of
the previous one, so a downstream consumer that stored yesterday's vectors, or trained on them,
sees every vector "drift". Following Zielnicki & Hsiao, *Orthogonal Low Rank Embedding
Stabilization* (Netflix, arXiv:2508.07574), the new vectors are mapped onto the previously
published space by one **orthogonal** matrix ``R`` applied to profile *and* title vectors:

    (p R) . (t R) = p R R^T t = p . t          (scores, norms and cosines are unchanged)

so nothing the model computes changes (the transform is lossless), while the coordinates of the
same profile move as little as possible between versions.

Fitting (:func:`fit_rotation`), with ``B`` the new and ``A`` the old vectors of the same entities
(profiles present in both publications, optionally titles present in both), n x d each:

1. **truncated SVD** of ``B``: the top-``k`` right singular vectors ``W_k`` span the directions
   that carry the signal (``k`` = smallest rank holding ``energy`` of the squared spectrum, or
   given). Directions with little energy are poorly determined by the fit set; they must not
   steer the rotation of the dominant subspace;
2. **orthogonal Procrustes in that subspace**: ``Q = argmin ||B W_k Q - A||`` over k x d matrices
   with orthonormal rows, i.e. ``Q = U V^T`` from ``(B W_k)^T A = U S V^T``;
3. **completion**: the complement ``W_⊥`` is mapped onto the part of the old space that ``Q`` does
   not use (``C``, orthonormal complement of ``V``), again by Procrustes on the residual, so that
   ``R = W_k Q + W_⊥ Z C^T`` is exactly orthogonal (d x d). With ``k = d`` this is plain
   orthogonal Procrustes.

No centering or scaling is applied: a translation or a scale would change dot products. If the new
width is larger than the old one, the old vectors are zero-padded (the published width follows the
new model); a narrower new model cannot be aligned losslessly and is reported as such.

Drift is reported as the mean cosine between old and new vectors of shared profiles before and
after alignment, on profiles held out of the fit when there are enough of them.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


def _orthonormal_complement(basis: np.ndarray) -> np.ndarray:
    """Columns spanning the orthogonal complement of ``basis``'s columns (d x (d - k))."""
    d, k = basis.shape
    if k == d:
        return np.zeros((d, 0))
    q, _ = np.linalg.qr(np.concatenate([basis, np.eye(d)], axis=1))
    return q[:, k:d]


def _procrustes(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """argmin ||x M - y||_F over M with orthonormal rows (x: n x p, y: n x q, p <= q): U V^T."""
    u, _, vt = np.linalg.svd(x.T @ y, full_matrices=False)
    return u @ vt


def choose_rank(singular_values: np.ndarray, energy: float) -> int:
    e = np.cumsum(singular_values ** 2)
    if e[-1] <= 0:
        return len(singular_values)
    return int(min(len(singular_values), np.searchsorted(e / e[-1], energy) + 1))


def fit_rotation(new: np.ndarray, old: np.ndarray, rank: int = 0, energy: float = 0.99) -> tuple[np.ndarray, int]:
    """Orthogonal (d, d) ``R`` with ``new @ R ≈ old`` (rows paired); returns (R, rank used)."""
    new, old = np.asarray(new, np.float64), np.asarray(old, np.float64)
    if new.ndim != 2 or new.shape[0] != old.shape[0]:
        raise ValueError(f"paired rows needed: new {new.shape} vs old {old.shape}")
    d, d_old = new.shape[1], old.shape[1]
    if d_old > d:
        raise ValueError(f"cannot align a {d}-d space onto a wider {d_old}-d one without losing information")
    if d_old < d:
        old = np.concatenate([old, np.zeros((old.shape[0], d - d_old))], axis=1)
    # SVD of the new vectors through their d x d Gram matrix (n >> d): right singular vectors W,
    # singular values sqrt(eigenvalues); always a full orthonormal basis of the d-space.
    evals, w = np.linalg.eigh(new.T @ new)
    order = np.argsort(evals)[::-1]
    s, w = np.sqrt(np.clip(evals[order], 0, None)), w[:, order]
    k = rank if 0 < rank <= d else choose_rank(s, energy)
    k = max(1, min(k, d, new.shape[0]))
    w_k, w_perp = w[:, :k], w[:, k:]                                    # d x k, d x (d-k)
    q = _procrustes(new @ w_k, old)                                     # k x d, orthonormal rows
    r = w_k @ q
    if k < d:
        c = _orthonormal_complement(q.T)                                # d x (d-k), ⊥ to range(Q^T)
        z = _procrustes(new @ w_perp, old @ c)                          # (d-k) x (d-k) orthogonal
        r = r + w_perp @ z @ c.T
    return r, k


def mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape[1] < b.shape[1]:
        a = np.concatenate([a, np.zeros((a.shape[0], b.shape[1] - a.shape[1]))], axis=1)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    ok = (na > 0) & (nb > 0)
    if not ok.any():
        return float("nan")
    return float(np.mean((a[ok] * b[ok]).sum(1) / (na[ok] * nb[ok])))


def is_orthogonal(r: np.ndarray, tol: float = 1e-5) -> bool:
    return bool(np.abs(r.T @ r - np.eye(r.shape[0])).max() < tol)


@dataclass
class AlignmentReport:
    rank: int
    dim: int
    n_fit: int                  # paired rows the rotation was fitted on (profiles + titles)
    n_fit_profiles: int
    n_fit_titles: int
    n_eval: int                 # shared profiles the drift figures are measured on
    eval_held_out: bool         # False: too few shared profiles, measured on the fit set
    cos_before: float           # mean cosine(old, new) of shared profiles, raw new space
    cos_after: float            # ... after applying R
    drift_before: float         # 1 - cos_before
    drift_after: float
    drift_reduction: float      # 1 - drift_after / drift_before
    orthogonality_error: float  # max |R^T R - I|

    def to_dict(self) -> dict:
        return asdict(self)


def held_out_mask(ids: np.ndarray, frac: float = 0.2, min_eval: int = 20) -> np.ndarray:
    """Deterministic hold-out by a hash of the entity id (``True`` = evaluation row)."""
    h = splitmix64(np.asarray(ids, np.int64))
    mask = (h % np.uint64(1000)) < np.uint64(int(frac * 1000))
    if mask.sum() < min_eval or (~mask).sum() < min_eval:
        return np.zeros(len(ids), bool)
    return mask


def splitmix64(x: np.ndarray) -> np.ndarray:
    """A fast, well-mixed 64-bit hash of int64 ids (deterministic across runs and machines)."""
    z = np.asarray(x).astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def align(new_profiles: np.ndarray, old_profiles: np.ndarray, profile_ids: np.ndarray,
          new_titles: np.ndarray | None = None, old_titles: np.ndarray | None = None,
          rank: int = 0, energy: float = 0.99, eval_frac: float = 0.2) -> tuple[np.ndarray, AlignmentReport]:
    """Fit ``R`` on shared profiles (minus a held-out share) plus shared titles; report drift on the
    held-out profiles. Rows of ``new_*``/``old_*`` are paired."""
    held = held_out_mask(profile_ids, eval_frac)
    fit_new, fit_old = [new_profiles[~held]], [old_profiles[~held]]
    n_titles = 0
    if new_titles is not None and old_titles is not None and len(new_titles):
        fit_new.append(new_titles)
        fit_old.append(old_titles)
        n_titles = len(new_titles)
    r, k = fit_rotation(np.concatenate(fit_new), np.concatenate(fit_old), rank=rank, energy=energy)
    r = r.astype(np.float32)                                            # what is applied and stored
    ev = held if held.any() else np.ones(len(profile_ids), bool)
    before = mean_cosine(old_profiles[ev], new_profiles[ev])
    after = mean_cosine(old_profiles[ev], new_profiles[ev] @ r)
    d_before, d_after = 1.0 - before, 1.0 - after
    rep = AlignmentReport(
        rank=k, dim=r.shape[0], n_fit=int((~held).sum()) + n_titles, n_fit_profiles=int((~held).sum()),
        n_fit_titles=n_titles, n_eval=int(ev.sum()), eval_held_out=bool(held.any()),
        cos_before=before, cos_after=after, drift_before=d_before, drift_after=d_after,
        drift_reduction=float(1.0 - d_after / d_before) if d_before > 0 else 0.0,
        orthogonality_error=float(np.abs(r.astype(np.float64).T @ r - np.eye(r.shape[0])).max()))
    return r, rep
