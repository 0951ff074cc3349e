"""The one training loop: every model trained in this project (``fmpipe train`` from scratch or as a
fine-tune, the training DAG, the benchmark's foundation model and its SASRec baselines) goes
through :func:`fit`.

* **Budget:** training stops at ``budget_s`` seconds of training steps (wall or process CPU time,
  validation not counted), at ``max_epochs``, or by early stopping, whichever comes first. The
  learning rate warms up, then follows a cosine to 5% of its peak over the budget (or over
  ``max_epochs`` when that ends first), so a time-boxed run still anneals; ``schedule="constant"``
  keeps the peak after warm-up (training to convergence by early stopping has no horizon).
* **Validation and the kept checkpoint:** ``validate()`` runs ``n_evals`` times spread over a finite
  budget (after every epoch when the budget is infinite or the schedule constant) and at the end; the weights with the best
  ``select`` metric are the ones kept. ``patience`` validations without a gain stop the run.
* **Weight average:** with ``ema > 0`` an exponential moving average of the parameters (decay
  ``ema`` per step, ``torch.optim.swa_utils``) is validated beside the trained weights at every
  validation, and whichever scores better is a candidate for the kept checkpoint. Why: small
  batches at a high learning rate leave the weights noisy around the optimum; the average is a
  better point of the same run at the cost of one extra validation. Validation decides, per run.
* **Data:** each epoch draws training windows of ``max_len`` events from every row (``window_mode``),
  sorts them by length inside chunks (less padding) and shuffles the batches.
* **Resumable:** with ``state_dir`` a state (weights, optimizer, RNGs, position, the best weights so
  far, the validation history) is saved every ``checkpoint_every_s`` seconds; ``resume=True``
  continues from it. On CPU with a step-bound schedule the result is bit-identical to a run that
  never stopped. A run stopped by its budget saves its state too, so training to convergence
  (``schedule="constant"``, whose steps do not depend on the budget) can go on in sittings, each
  resuming with a larger budget.

Deterministic for a seed on CPU. CUDA with bf16 autocast is used when a GPU is present.
"""
from __future__ import annotations

import copy
import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.optim.swa_utils import get_ema_multi_avg_fn
from tqdm import tqdm

from fm import train_state
from fm.data import Sequences


@dataclass(frozen=True)
class FitConfig:
    budget_s: float = 120.0          # seconds of training steps (math.inf: until max_epochs / early stop)
    clock: str = "wall"              # what the budget counts: "wall" seconds or process "cpu" seconds
    max_epochs: int = 10_000
    batch_size: int = 16
    lr: float = 3e-3
    weight_decay: float = 0.0
    warmup: float = 0.05             # fraction of the schedule (constant: of the first epoch)
    schedule: str = "cosine"         # cosine: to 5% of peak over the budget / max_epochs; constant: peak after warm-up
    n_evals: int = 8                 # validations spread over a finite budget (+ one at the end)
    patience: int = 0                # stop after this many validations without a gain (0: never)
    window_mode: str = "tokens"      # see training_windows
    clip: float = 1.0
    seed: int = 0
    device: str = "auto"             # auto | cpu | cuda
    checkpoint_every_s: float = 0.0  # save a resumable state this often (only with a state dir; 0: never)
    ema: float = 0.0                 # decay of a per-step moving average of the weights, validated beside them (0: off)
    desc: str = "train"

    def __post_init__(self) -> None:
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be 'cosine' or 'constant', not {self.schedule!r}")
        if self.clock not in ("wall", "cpu"):
            raise ValueError(f"clock must be 'wall' or 'cpu', not {self.clock!r}")
        if not 0.0 <= self.ema < 1.0:
            raise ValueError(f"ema must be in [0, 1) (a per-step decay; 0 = off), not {self.ema}")
        if not self.budget_s > 0 or self.max_epochs < 1 or self.batch_size < 1 or not self.lr > 0:
            raise ValueError("budget_s, max_epochs, batch_size and lr must be positive, got "
                             f"{self.budget_s}, {self.max_epochs}, {self.batch_size}, {self.lr}")


@dataclass
class FitResult:
    train_s: float                    # wall seconds spent in training steps
    train_cpu_s: float                # process CPU seconds spent in training steps (all threads)
    eval_s: float
    steps: int
    epochs: float
    best: dict                        # validation metrics of the kept checkpoint
    best_step: int
    stopped_by: str                   # budget | max_epochs | early_stopping | interrupted
    resumed: bool = False
    best_weights: str = "trained"     # the kept checkpoint: the trained weights or their moving average ("ema")
    history: list = field(default_factory=list)   # (step, train_s, epoch, valid metrics)
    curve: list = field(default_factory=list)     # (step, loss, parts) every LOG_EVERY steps

    def summary(self) -> dict:
        """JSON-safe figures for checkpoints and reports (no curve)."""
        return {k: v for k, v in asdict(self).items() if k != "curve"}


LOG_EVERY = 10


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def set_lr(opt: torch.optim.Optimizer, peak: float, frac: float, warmup: float = 0.05) -> None:
    """Linear warm-up then cosine decay to 5% of peak."""
    lr = peak * frac / warmup if frac < warmup else peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (frac - warmup) / (1 - warmup))))
    for g in opt.param_groups:
        g["lr"] = lr


def training_windows(lengths: np.ndarray, max_len: int, rng: np.random.Generator, mode: str = "tokens") -> tuple[np.ndarray, np.ndarray]:
    """One epoch of training windows as (rows, ends): each window is the ``max_len`` events before
    ``end``. ``mode="last"``: the last window of every row (one per user, RecBole-style);
    ``"user"``: one window per row with a random end (short rows: the whole row);
    ``"tokens"``: ``ceil(len / max_len)`` random windows per row, so an epoch covers about every token."""
    rows = np.flatnonzero(lengths >= 2)
    lens = lengths[rows]
    if mode == "last":
        return rows, lens.copy()
    if mode == "tokens":
        reps = np.ceil(lens / max_len).astype(np.int64)
        rows, lens = np.repeat(rows, reps), np.repeat(lens, reps)
    elif mode != "user":
        raise ValueError(f"unknown window mode {mode!r} (tokens | user | last)")
    lo = np.minimum(lens, max_len)
    ends = lo + (rng.random(len(lens)) * (lens - lo + 1)).astype(np.int64)
    return rows, np.minimum(ends, lens)


def epoch_batches(rows: np.ndarray, ends: np.ndarray, max_len: int, batch_size: int,
                  rng: np.random.Generator, sort_chunk: int = 32) -> list[tuple[np.ndarray, np.ndarray]]:
    """Shuffle windows, sort by length inside chunks of ``sort_chunk`` batches (less padding), and
    shuffle the batch order."""
    perm = rng.permutation(len(rows))
    rows, ends = rows[perm], ends[perm]
    width = np.minimum(ends, max_len)
    out = []
    chunk = batch_size * sort_chunk
    for c in range(0, len(rows), chunk):
        o = c + np.argsort(width[c: c + chunk], kind="stable")
        out += [(rows[o[i: i + batch_size]], ends[o[i: i + batch_size]]) for i in range(0, len(o), batch_size)]
    return [out[i] for i in rng.permutation(len(out))]


def n_batches_per_epoch(lengths: np.ndarray, max_len: int, batch_size: int, mode: str) -> int:
    """Batches in one epoch (the window count does not depend on the random draw)."""
    rows = lengths[lengths >= 2]
    n = int(np.ceil(rows / max_len).sum()) if mode == "tokens" else len(rows)
    return sum(math.ceil(len(range(c, min(c + batch_size * 32, n))) / batch_size) for c in range(0, n, batch_size * 32))


class WeightAverage:
    """An exponential moving average of a module's trainable parameters (the EMA update of
    ``torch.optim.swa_utils``), and a way to score the average in place of the trained weights."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.avg = [p.detach().clone() for p in self.params]
        self._update = get_ema_multi_avg_fn(decay)

    def update(self) -> None:
        self._update(self.avg, [p.detach() for p in self.params], None)

    @contextmanager
    def applied(self):
        """Inside the block the module's parameters hold the average; the trained weights after."""
        trained = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            torch._foreach_copy_([p.data for p in self.params], self.avg)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_([p.data for p in self.params], trained)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"ema.{i}": a.detach().contiguous().cpu() for i, a in enumerate(self.avg)}

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for i, a in enumerate(self.avg):
                a.copy_(tensors[f"ema.{i}"])


class _Run:
    """The mutable state of one fit: counters, clocks, the best checkpoint, the RNGs."""

    def __init__(self, cfg: FitConfig):
        self.cfg = cfg
        self.rng = np.random.default_rng(cfg.seed)
        self.step = self.epoch = self.next_batch = self.best_step = 0
        self.train_s = self.train_cpu_s = self.eval_s = 0.0
        self.epoch_f = 0.0
        self.best: dict | None = None
        self.best_state: dict | None = None
        self.best_weights = "trained"
        self.since_best = 0
        self.history: list = []
        self.curve: list = []
        self.epoch_rng: dict = self.rng.bit_generator.state
        self.avg: WeightAverage | None = None

    def spent(self) -> float:
        return self.train_s if self.cfg.clock == "wall" else self.train_cpu_s

    def progress(self, total_steps: int) -> float:
        """Fraction of the schedule done: by steps or by the budget, whichever is further along."""
        by_budget = self.spent() / self.cfg.budget_s if math.isfinite(self.cfg.budget_s) else 0.0
        return min(1.0, max(self.step / max(total_steps, 1), by_budget))


def fit(objective: torch.nn.Module, train: Sequences, max_len: int, cfg: FitConfig,
        validate: Callable[[], dict] | None = None, select: str = "ndcg@10",
        state_dir: Path | None = None, resume: bool = False, interrupt_after: int | None = None) -> FitResult:
    """Train ``objective``'s parameters in place on windows of ``train``; keep the checkpoint with the
    best ``select`` on ``validate()`` (the last weights when there is no validation).

    ``objective(tokens, valid) -> (loss, parts)``; ``interrupt_after``: return after that many steps
    without saving, as a kill would (tests)."""
    torch.manual_seed(cfg.seed)
    device = pick_device(cfg.device)
    objective.to(device).train()
    run = _Run(cfg)
    opt = torch.optim.AdamW(objective.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    run.avg = WeightAverage(objective, cfg.ema) if cfg.ema else None
    per_epoch = n_batches_per_epoch(train.lengths, max_len, cfg.batch_size, cfg.window_mode)
    total_steps = cfg.max_epochs * per_epoch
    # a constant schedule does not depend on the budget, so a later sitting may continue with a larger one
    run_only = ("checkpoint_every_s", "device", "desc") + (("budget_s",) if cfg.schedule == "constant" else ())
    state_cfg = {**{k: v for k, v in asdict(cfg).items() if k not in run_only},
                 "rows": len(train), "tokens": int(train.offsets[-1]), "max_len": max_len,
                 "n_params": sum(p.numel() for p in objective.parameters())}
    resumed = bool(resume and state_dir is not None and train_state.exists(state_dir))
    if resumed:
        train_state.load(state_dir, objective, opt, run, state_cfg)
    # a finite cosine budget: n_evals spread over it; training to convergence: after every epoch
    by_epoch = cfg.schedule == "constant" or not math.isfinite(cfg.budget_s)
    eval_every = math.inf if by_epoch else cfg.budget_s / max(cfg.n_evals, 1)
    next_eval = (math.floor(run.spent() / eval_every) + 1) * eval_every if math.isfinite(eval_every) else math.inf
    bar = tqdm(total=round(cfg.budget_s) if math.isfinite(cfg.budget_s) else None, initial=round(run.spent()),
               desc=cfg.desc, unit="s", leave=False, mininterval=2.0,
               bar_format="{desc}: {n:.0f}/{total_fmt} s " + cfg.clock + " [{elapsed}] {postfix}")
    last_save, stopped = time.perf_counter(), "max_epochs"

    def validation() -> bool:
        """Run validation, keep the best weights; True when early stopping says stop."""
        if validate is None:
            return False
        t = time.perf_counter()
        objective.eval()
        gains = lambda x: run.best is None or x[select] > run.best[select]     # noqa: E731
        m, avg_state = validate(), None
        entry = dict(m)
        if run.avg is not None:
            with run.avg.applied():
                m_avg = validate()
                if m_avg[select] > m[select]:
                    m = m_avg
                    if gains(m):                 # copied only when it becomes the kept checkpoint
                        avg_state = copy.deepcopy(objective.state_dict())
            entry.update({f"ema_{k}": v for k, v in m_avg.items()})
        objective.train()
        run.eval_s += time.perf_counter() - t
        run.history.append((run.step, round(run.train_s, 1), round(run.epoch_f, 3), entry))
        if gains(m):
            run.best, run.best_step, run.since_best = m, run.step, 0
            run.best_state = avg_state or copy.deepcopy(objective.state_dict())
            run.best_weights = "trained" if avg_state is None else "ema"
        else:
            run.since_best += 1
        bar.set_postfix(valid=f"{m[select]:.4f}", best=f"{run.best[select]:.4f}")
        return bool(cfg.patience and run.since_best >= cfg.patience)

    while run.epoch < cfg.max_epochs and stopped == "max_epochs":
        run.rng.bit_generator.state = run.epoch_rng
        batches = epoch_batches(*training_windows(train.lengths, max_len, run.rng, cfg.window_mode), max_len, cfg.batch_size, run.rng)
        for i in range(run.next_batch, len(batches)):
            rows, ends = batches[i]
            before = run.spent()
            loss = _step(objective, opt, train.batch(rows, max_len, ends=ends), device, cfg, run, total_steps)
            run.epoch_f = run.epoch + (i + 1) / len(batches)
            run.next_batch = i + 1
            bar.update(max(0.0, min(run.spent() - before, (bar.total or math.inf) - bar.n)))
            if interrupt_after is not None and run.step >= interrupt_after:
                bar.close()
                return _result(run, "interrupted", resumed)
            if state_dir is not None and cfg.checkpoint_every_s and time.perf_counter() - last_save >= cfg.checkpoint_every_s:
                train_state.save(state_dir, objective, opt, run, state_cfg)
                last_save = time.perf_counter()
            if run.step % LOG_EVERY == 0:
                bar.set_postfix_str(f"loss={loss:.3f} ep={run.epoch_f:.1f}" + (f" best={run.best[select]:.4f}" if run.best else ""))
            if run.spent() >= cfg.budget_s:
                stopped = "budget"
                if state_dir is not None and cfg.checkpoint_every_s:    # before the closing validation,
                    train_state.save(state_dir, objective, opt, run, state_cfg)   # which a longer run would not do
                break
            if run.spent() >= next_eval:
                next_eval += eval_every
                if validation():
                    stopped = "early_stopping"
                    break
        else:
            run.epoch, run.next_batch = run.epoch + 1, 0
            run.epoch_rng = run.rng.bit_generator.state
            if not math.isfinite(eval_every) and validation():
                stopped = "early_stopping"
    if stopped != "early_stopping" and (not run.history or run.history[-1][0] != run.step):
        validation()
    bar.close()
    if run.best_state is not None:
        objective.load_state_dict(run.best_state)
    objective.cpu().eval()
    return _result(run, stopped, resumed)


def _step(objective, opt, b, device, cfg: FitConfig, run: _Run, total_steps: int) -> float:
    """One optimizer step on batch ``b``; advances the run's counters and clocks."""
    t, tc = time.perf_counter(), time.process_time()
    tokens = {k: v.to(device) for k, v in b.tokens.items()}
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        loss, parts = objective(tokens, b.valid.to(device))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.clip:
        torch.nn.utils.clip_grad_norm_(objective.parameters(), cfg.clip)
    run.step += 1
    if cfg.schedule == "constant":          # train until early stopping: no horizon to anneal over
        warm = max(1.0, cfg.warmup * total_steps / cfg.max_epochs)
        for g in opt.param_groups:
            g["lr"] = cfg.lr * min(1.0, run.step / warm)
    else:
        set_lr(opt, cfg.lr, run.progress(total_steps), cfg.warmup)
    opt.step()
    if run.avg is not None:
        run.avg.update()
    value = float(loss.detach())
    run.train_s += time.perf_counter() - t
    run.train_cpu_s += time.process_time() - tc
    if run.step % LOG_EVERY == 0 or run.step == 1:
        run.curve.append((run.step, value, parts))
    return value


def _result(run: _Run, stopped: str, resumed: bool) -> FitResult:
    return FitResult(round(run.train_s, 2), round(run.train_cpu_s, 2), round(run.eval_s, 2), run.step,
                     round(run.epoch_f, 3), run.best or {}, run.best_step, stopped, resumed, run.best_weights,
                     run.history, run.curve)


def plot_curve(curve: list, path: Path, history: list | None = None) -> Path:
    """Loss curves (total and per head) and, when given, the validation metric, as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [c[0] for c in curve]
    ax.plot(steps, [c[1] for c in curve], label="total", lw=1.5)
    for key in curve[0][2] if curve else []:
        ax.plot(steps, [c[2].get(key, np.nan) for c in curve], label=key, lw=0.8, alpha=0.7)
    ax.set_xlabel("step"), ax.set_ylabel("loss"), ax.grid(alpha=0.3)
    if history:
        ax2 = ax.twinx()
        ax2.plot([h[0] for h in history], [h[3].get("ndcg@10", np.nan) for h in history], "k.--", label="valid ndcg@10")
        ax2.set_ylabel("validation NDCG@10")
        ax2.legend(fontsize=7, loc="lower right")
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
