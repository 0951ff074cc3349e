"""Training loop: AdamW, gradient clipping, a wall-clock budget, held-out next-title metrics.

Deterministic for a seed on CPU. CUDA + bf16 autocast are used when a GPU is present.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from fm.data import Sequences
from fm.evaluate import next_title_eval
from fm.model import FoundationModel


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.01
    epochs: int = 20
    time_budget_s: float = 120.0
    eval_frac: float = 0.1
    seed: int = 0
    device: str = "auto"            # auto | cpu | cuda


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _random_ends(lengths: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Half the time the full sequence, else a random prefix (cheap augmentation over positions)."""
    cut = rng.integers(2, np.maximum(lengths, 2) + 1)
    return np.where(rng.random(len(lengths)) < 0.5, lengths, np.minimum(cut, lengths))


def progress(step: int, total_steps: int, elapsed_s: float, budget_s: float) -> float:
    """Fraction of training done: by steps or by wall clock, whichever is further along."""
    return min(1.0, max(step / max(total_steps, 1), elapsed_s / max(budget_s, 1e-9)))


def set_lr(opt: torch.optim.Optimizer, peak: float, frac: float, warmup: float = 0.05) -> None:
    """Linear warm-up then cosine decay to 5% of peak, so a time-budgeted run still anneals."""
    lr = peak * frac / warmup if frac < warmup else peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (frac - warmup) / (1 - warmup))))
    for g in opt.param_groups:
        g["lr"] = lr


def split_rows(seqs: Sequences, eval_frac: float, seed: int, among: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(train_rows, eval_rows): a seeded split of the profiles with at least two tokens."""
    rows = np.flatnonzero(seqs.lengths >= 2)
    if among is not None:
        rows = np.intersect1d(rows, among)
    np.random.default_rng(seed).shuffle(rows)
    n_eval = int(len(rows) * eval_frac)
    return rows[n_eval:], rows[:n_eval]


def train(model: FoundationModel, seqs: Sequences, cfg: TrainConfig, among: np.ndarray | None = None) -> dict:
    """Train in place (on the profiles ``among``, default all); returns metrics, the held-out rows
    and the loss curve (step, loss) for plotting."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    device = pick_device(cfg.device)
    model.to(device).train()
    train_rows, eval_rows = split_rows(seqs, cfg.eval_frac, cfg.seed, among)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, len(train_rows) // cfg.batch_size)
    curve, t0, step, stopped = [], time.perf_counter(), 0, "epochs"
    bar = tqdm(total=cfg.epochs * steps_per_epoch, desc="train", unit="step")
    for epoch in range(cfg.epochs):
        rng.shuffle(train_rows)
        for i in range(steps_per_epoch):
            sel = train_rows[i * cfg.batch_size: (i + 1) * cfg.batch_size]
            b = seqs.batch(sel, model.cfg.max_len, ends=_random_ends(seqs.lengths[sel], rng))
            tokens = {k: v.to(device) for k, v in b.tokens.items()}
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss, parts = model(tokens, b.valid.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            step += 1
            set_lr(opt, cfg.lr, progress(step, cfg.epochs * steps_per_epoch, time.perf_counter() - t0, cfg.time_budget_s))
            opt.step()
            curve.append((step, float(loss.detach()), parts))
            bar.update(1)
            bar.set_postfix(loss=f"{curve[-1][1]:.3f}", epoch=epoch)
            if time.perf_counter() - t0 > cfg.time_budget_s:
                stopped = "time_budget"
                break
        if stopped == "time_budget":
            break
    bar.close()
    train_s = time.perf_counter() - t0
    model.cpu().eval()
    metrics = next_title_eval(model, seqs, eval_rows) if len(eval_rows) else {}
    return {"steps": step, "epochs_done": epoch + 1, "stopped_by": stopped, "train_s": round(train_s, 2),
            "final_loss": curve[-1][1] if curve else None, "eval": metrics, "curve": curve, "eval_rows": eval_rows}


def plot_curve(curve: list, path: Path) -> Path:
    """Loss curves (total and per head) as a PNG next to the checkpoint."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [c[0] for c in curve]
    ax.plot(steps, [c[1] for c in curve], label="total", lw=1.5)
    for key in curve[0][2] if curve else []:
        ax.plot(steps, [c[2].get(key, np.nan) for c in curve], label=key, lw=0.8, alpha=0.7)
    ax.set_xlabel("step"), ax.set_ylabel("loss"), ax.legend(fontsize=7), ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
