"""Training loop: AdamW, gradient clipping, a wall-clock budget, held-out next-title metrics,
periodic resumable training states (``fm.train_state``).

Deterministic for a seed on CPU. CUDA + bf16 autocast are used when a GPU is present.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from fm import train_state
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
    checkpoint_every: int = 0       # save a resumable state every N steps (0: off) ...
    checkpoint_every_s: float = 60.0  # ... and/or every N seconds (0: off); only when a state dir is given


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


def _objective(model: FoundationModel, exclude_titles: np.ndarray | None) -> torch.nn.Module:
    """The model's own loss, or -- with titles held out of training -- the same loss with those titles
    removed from every softmax, so training learns nothing about them (not even as negatives)."""
    if exclude_titles is None or not np.any(exclude_titles):
        return model
    from fm.protocol import FMObjective  # late: fm.protocol imports this module
    return FMObjective(model, exclude_titles=exclude_titles)


def _state_config(cfg: TrainConfig, n_rows: int, model: FoundationModel) -> dict:
    """What a saved state must agree with to be resumed (checkpoint frequency and device may change)."""
    keep = {k: v for k, v in asdict(cfg).items() if k not in ("checkpoint_every", "checkpoint_every_s", "device")}
    return {**keep, "train_rows": int(n_rows), "n_params": model.n_params()}


def train(model: FoundationModel, seqs: Sequences, cfg: TrainConfig, among: np.ndarray | None = None,
          exclude_titles: np.ndarray | None = None, state_dir: Path | None = None, resume: bool = False,
          interrupt_after: int | None = None) -> dict:
    """Train in place (on the profiles ``among``, default all); returns metrics, the held-out rows
    and the loss curve (step, loss) for plotting.

    ``exclude_titles`` (bool mask over titles): titles removed from every softmax (cold-start holdout).
    ``state_dir``: save a resumable training state there every ``cfg.checkpoint_every`` steps and/or
    ``cfg.checkpoint_every_s`` seconds; ``resume=True`` continues from the state found there (on CPU
    the result is bit-identical to a run that never stopped, when the schedule is step-bound).
    ``interrupt_after``: return after that many steps without saving, as a kill would (tests)."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    device = pick_device(cfg.device)
    objective = _objective(model, exclude_titles).to(device)
    model.to(device).train()
    train_rows, eval_rows = split_rows(seqs, cfg.eval_frac, cfg.seed, among)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, len(train_rows) // cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    state_cfg = _state_config(cfg, len(train_rows), model)
    st = train_state.TrainState(0, 0, 0, 0.0, 0.0, train_rows, {}, [])
    resumed = bool(resume and state_dir is not None and train_state.exists(state_dir))
    if resumed:
        st = train_state.load(state_dir, model, opt, state_cfg)
        rng.bit_generator.state = st.np_rng
        train_rows = st.rows
    t0, stopped, epoch = time.perf_counter() - st.elapsed_s, "epochs", st.epoch
    last_save = time.perf_counter()
    bar = tqdm(total=total_steps, initial=st.step, desc="train", unit="step")
    for epoch in range(st.epoch, cfg.epochs):
        first = 0
        if resumed and epoch == st.epoch:
            first = st.next_batch                       # the epoch's order was restored with the state
        else:
            rng.shuffle(train_rows)
        for i in range(first, steps_per_epoch):
            sel = train_rows[i * cfg.batch_size: (i + 1) * cfg.batch_size]
            b = seqs.batch(sel, model.cfg.max_len, ends=_random_ends(seqs.lengths[sel], rng))
            tokens = {k: v.to(device) for k, v in b.tokens.items()}
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss, parts = objective(tokens, b.valid.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            st.step += 1
            st.progress = progress(st.step, total_steps, time.perf_counter() - t0, cfg.time_budget_s)
            set_lr(opt, cfg.lr, st.progress)
            opt.step()
            st.curve.append((st.step, float(loss.detach()), parts))
            bar.update(1)
            bar.set_postfix(loss=f"{st.curve[-1][1]:.3f}", epoch=epoch)
            if interrupt_after is not None and st.step >= interrupt_after:
                bar.close()
                return {"steps": st.step, "stopped_by": "interrupted", "curve": st.curve, "eval": {}, "eval_rows": eval_rows}
            if state_dir is not None and _due(cfg, st.step, time.perf_counter() - last_save):
                st.epoch, st.next_batch, st.rows = epoch, i + 1, train_rows
                st.elapsed_s, st.np_rng = time.perf_counter() - t0, rng.bit_generator.state
                train_state.save(state_dir, model, opt, st, state_cfg)
                last_save = time.perf_counter()
            if time.perf_counter() - t0 > cfg.time_budget_s:
                stopped = "time_budget"
                break
        if stopped == "time_budget":
            break
    bar.close()
    train_s = time.perf_counter() - t0
    model.cpu().eval()
    metrics = next_title_eval(model, seqs, eval_rows) if len(eval_rows) else {}
    curve = st.curve
    return {"steps": st.step, "epochs_done": epoch + 1, "stopped_by": stopped, "train_s": round(train_s, 2),
            "resumed": resumed, "final_loss": curve[-1][1] if curve else None, "eval": metrics, "curve": curve,
            "eval_rows": eval_rows}


def _due(cfg: TrainConfig, step: int, since_save_s: float) -> bool:
    """Whether a training state is due: every ``checkpoint_every`` steps or ``checkpoint_every_s`` seconds."""
    return bool(cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or \
        bool(cfg.checkpoint_every_s and since_save_s >= cfg.checkpoint_every_s)


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
