"""Leave-one-out-by-time split, full-ranking evaluation and a budgeted training loop that picks its
checkpoint on validation -- for any sequence model, so the foundation model and baselines are
measured in one harness.

Protocol (``/work/shared/data/README.md``): each user's events are already sorted by (timestamp,
line order). The last event is the test target, the second-last the validation target; training
sees everything before them. Validation inputs are the events before the validation target; test
inputs are the events before the test target (the validation event included). Every title of the
vocabulary except PAD/OOV is ranked, all titles of the user's *whole* input history (not only the
model's context window) are removed, and HR@k / NDCG@k are averaged over users.

A model plugs in with two things: ``model(tokens, valid) -> (loss, parts)`` for training on padded
batches, and a *score function* ``Batch -> (B, n_titles)`` scores of the next title after the last
real token of each row (:func:`fm_scores` for :class:`fm.model.FoundationModel`).
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from fm.data import Batch, Sequences, length_bucketed
from fm.evaluate import metrics_from_ranks, rank_of_target
from fm.schema import N_SPECIAL
from fm.train import set_lr

ScoreFn = Callable[[Batch], torch.Tensor]


# ---------------------------------------------------------------------------------------------
# Split
# ---------------------------------------------------------------------------------------------
@dataclass
class EvalSet:
    """One target per row: the title at position ``ends[i]`` of row ``rows[i]``, predicted from the
    events ``[0, ends[i])`` of that row."""
    rows: np.ndarray
    ends: np.ndarray
    targets: np.ndarray

    def __len__(self) -> int:
        return len(self.rows)

    def subset(self, mask: np.ndarray) -> "EvalSet":
        return EvalSet(self.rows[mask], self.ends[mask], self.targets[mask])


@dataclass
class Split:
    seqs: Sequences          # full sequences (input source for validation and test)
    train: Sequences         # every row without its last two events
    valid: EvalSet           # target = second-last event, input = everything before it
    test: EvalSet            # target = last event, input = everything before it (validation included)


def truncate(seqs: Sequences, drop_last: int) -> Sequences:
    """Each row without its last ``drop_last`` tokens (rows never go below zero length)."""
    lens = np.maximum(seqs.lengths - drop_last, 0)
    keep = np.zeros(int(seqs.offsets[-1]), bool)
    for s, n in zip(seqs.offsets[:-1], lens):
        keep[s: s + n] = True
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    return Sequences(seqs.profile_id.copy(), offsets, {f: v[keep] for f, v in seqs.values.items()})


def eval_set(seqs: Sequences, back: int) -> EvalSet:
    """Target = the ``back``-th event from the end (1 = last) of every row long enough for it."""
    rows = np.flatnonzero(seqs.lengths > back)
    ends = (seqs.lengths[rows] - back).astype(np.int64)
    targets = seqs.values["title"][seqs.offsets[rows] + ends].astype(np.int64)
    return EvalSet(rows, ends, targets)


def leave_one_out(seqs: Sequences) -> Split:
    return Split(seqs, truncate(seqs, 2), eval_set(seqs, 2), eval_set(seqs, 1))


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------
def fm_scores(model, bias: torch.Tensor | None = None) -> ScoreFn:
    """Score function of a :class:`fm.model.FoundationModel`: next-title logits at the last token
    (plus an optional per-title bias, see :class:`FMObjective`)."""
    @torch.no_grad()
    def score(b: Batch) -> torch.Tensor:
        h = model.encode(b.tokens)[-1]
        last = h[torch.arange(len(b.rows)), b.lengths - 1]
        s = model.title_logits(last.unsqueeze(1), 0)[:, 0]
        return s if bias is None else s + bias.detach()
    return score


@torch.no_grad()
def rank_targets(score_fn: ScoreFn, seqs: Sequences, es: EvalSet, max_len: int, batch_size: int = 256,
                 exclude_history: bool = True) -> np.ndarray:
    """0-based rank of every target of ``es`` (order of ``es``) among all titles >= N_SPECIAL."""
    ranks = np.zeros(len(es), np.int64)
    titles = seqs.values["title"]
    for sel in length_bucketed(np.minimum(es.ends, max_len), batch_size):
        rows, ends = es.rows[sel], es.ends[sel]
        b = seqs.batch(rows, max_len, ends=ends)
        scores = score_fn(b).float().clone()
        scores[:, :N_SPECIAL] = float("-inf")
        exclude = None
        if exclude_history:
            exclude = [np.unique(titles[seqs.offsets[r]: seqs.offsets[r] + e]) for r, e in zip(rows, ends)]
            exclude = [x[x >= N_SPECIAL] for x in exclude]
        ranks[sel] = rank_of_target(scores, torch.as_tensor(es.targets[sel]), exclude).numpy()
    return ranks


def evaluate(score_fn: ScoreFn, seqs: Sequences, es: EvalSet, max_len: int, batch_size: int = 256,
             ks: tuple[int, ...] = (10, 50)) -> dict[str, float]:
    """HR@k / NDCG@k averaged over the users of ``es``, full ranking, history removed."""
    if len(es) == 0:
        return {"users": 0}
    ranks = rank_targets(score_fn, seqs, es, max_len, batch_size)
    return {**metrics_from_ranks(torch.as_tensor(ranks), ks), "users": int(len(es))}


def popularity_scores(train: Sequences, n_titles: int) -> ScoreFn:
    """Most-popular baseline (counts on the training part): the sanity floor of the protocol."""
    counts = torch.as_tensor(np.bincount(train.values["title"], minlength=n_titles)[:n_titles], dtype=torch.float32)
    return lambda b: counts.expand(len(b.rows), -1)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------
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
        raise ValueError(f"unknown window mode {mode!r}")
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


@dataclass
class FitConfig:
    budget_s: float = 120.0          # wall-clock training budget (validation time not counted)
    max_epochs: int = 10_000
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup: float = 0.05             # fraction of the budget
    n_evals: int = 8                 # validation checkpoints spread over the budget (+ one at the end)
    window_mode: str = "tokens"
    clip: float = 1.0
    seed: int = 0
    clock: str = "wall"              # what the budget counts: "wall" seconds or process "cpu" seconds
    desc: str = "train"


@dataclass
class FitResult:
    train_s: float                    # wall seconds spent in training steps
    train_cpu_s: float                # process CPU seconds spent in training steps (all threads)
    eval_s: float
    steps: int
    epochs: float
    best: dict                        # validation metrics of the kept checkpoint
    best_step: int
    history: list = field(default_factory=list)   # (step, train_s, epoch, valid metrics)


def fit(model: torch.nn.Module, train: Sequences, max_len: int, cfg: FitConfig,
        validate: Callable[[], dict] | None = None, select: str = "ndcg@10") -> FitResult:
    """Train ``model`` in place under a wall-clock budget (cosine schedule over the budget); evaluate
    ``validate()`` at ``n_evals`` points and at the end, and keep the checkpoint with the best
    ``select`` metric on validation."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    next_eval = cfg.budget_s / max(cfg.n_evals, 1)
    best, best_state, best_step, history = None, None, 0, []
    train_s = train_cpu_s = eval_s = 0.0
    if cfg.clock not in ("wall", "cpu"):
        raise ValueError(f"clock must be 'wall' or 'cpu', not {cfg.clock!r}")
    spent = lambda: train_s if cfg.clock == "wall" else train_cpu_s
    step, epoch, done = 0, 0, False
    bar = tqdm(total=round(cfg.budget_s), desc=cfg.desc, unit="s", leave=False, mininterval=2.0)

    def run_validation():
        nonlocal best, best_state, best_step, eval_s
        if validate is None:
            return
        t = time.perf_counter()
        model.eval()
        m = validate()
        model.train()
        eval_s += time.perf_counter() - t
        history.append((step, round(train_s, 1), round(epoch_f, 3), m))
        if best is None or m[select] > best[select]:
            best, best_state, best_step = m, copy.deepcopy(model.state_dict()), step
        bar.set_postfix(valid=f"{m[select]:.4f}", best=f"{best[select]:.4f}")

    model.train()
    epoch_f = 0.0
    while not done and epoch < cfg.max_epochs:
        batches = epoch_batches(*training_windows(train.lengths, max_len, rng, cfg.window_mode), max_len, cfg.batch_size, rng)
        for i, (rows, ends) in enumerate(batches):
            t, tc = time.perf_counter(), time.process_time()
            b = train.batch(rows, max_len, ends=ends)
            loss, parts = model(b.tokens, b.valid)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
            step += 1
            set_lr(opt, cfg.lr, min(1.0, spent() / cfg.budget_s), cfg.warmup)
            opt.step()
            before = spent()
            train_s += time.perf_counter() - t
            train_cpu_s += time.process_time() - tc
            epoch_f = epoch + (i + 1) / len(batches)
            bar.update(min(spent() - before, max(cfg.budget_s - bar.n, 0)))
            if step % 10 == 0:
                bar.set_postfix_str(f"loss={float(loss):.3f} ep={epoch_f:.1f}" + (f" best={best[select]:.4f}" if best else ""))
            if spent() >= cfg.budget_s:
                done = True
                break
            if spent() >= next_eval:
                next_eval += cfg.budget_s / max(cfg.n_evals, 1)
                run_validation()
        epoch += 1
    if not history or history[-1][0] != step:
        run_validation()
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return FitResult(round(train_s, 2), round(train_cpu_s, 2), round(eval_s, 2), step, round(epoch_f, 3), best or {}, best_step, history)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())



# ---------------------------------------------------------------------------------------------
# Training objective for the foundation model (full or sampled softmax, optional title bias)
# ---------------------------------------------------------------------------------------------
def first_positions(titles: torch.Tensor, valid: torch.Tensor, n_titles: int) -> torch.Tensor:
    """(B, L) titles -> (B, n_titles): position of each title's first occurrence in the row, ``L`` if
    absent (so ``first[b, v] <= t`` means "title v was seen at or before position t")."""
    B, L = titles.shape
    first = torch.full((B, n_titles), L, dtype=torch.long, device=titles.device)
    pos = torch.arange(L, device=titles.device).expand(B, L)
    pos = torch.where(valid, pos, torch.full_like(pos, L))
    return first.scatter_reduce(1, titles, pos, reduce="amin")


class FMObjective(torch.nn.Module):
    """Train a :class:`fm.model.FoundationModel` with the multi-task, multi-token objective of its
    ``forward`` (next titles t+1..t+k, next action, duration, device), plus two options:

    * ``title_bias``: a learned per-title output bias (popularity), added to every title head and to
      the scores (:func:`fm_scores` with ``bias=objective.bias``);
    * ``n_negatives > 0``: a *sampled* softmax for the title heads -- the target's logit against
      ``n_negatives`` titles drawn once per batch from ``(count + 1) ** alpha`` (logQ-corrected,
      accidental hits masked) -- instead of the full softmax over every title.

    * ``mask_history``: titles the user already had earlier in the window are removed from the
      softmax at each position (never the target itself). The evaluation removes the history from
      the ranking, so the model need not spend capacity on pushing seen titles down.

    ``exclude_titles`` (bool mask over titles) removes titles from every softmax, e.g. titles held
    out of training for a cold-start test, so training never learns anything about them.
    With no option set this computes exactly ``FoundationModel.forward``'s loss."""

    def __init__(self, model, counts: np.ndarray | None = None, n_negatives: int = 0, alpha: float = 0.5,
                 title_bias: bool = False, exclude_titles: np.ndarray | None = None, mask_history: bool = False):
        super().__init__()
        self.model, self.n_negatives, self.mask_history = model, n_negatives, mask_history
        n = model.cfg.n_titles
        q = np.zeros(n, np.float64)
        c = np.ones(n - N_SPECIAL) if counts is None else np.asarray(counts[N_SPECIAL:n], np.float64)
        q[N_SPECIAL:] = (c + 1.0) ** alpha
        excl = np.zeros(n, bool) if exclude_titles is None else np.asarray(exclude_titles, bool)
        q[excl] = 0.0
        q /= q.sum()
        self.register_buffer("excluded", torch.as_tensor(excl), persistent=False)
        self.register_buffer("q", torch.as_tensor(q, dtype=torch.float32), persistent=False)
        self.register_buffer("log_q", torch.log(torch.as_tensor(q, dtype=torch.float32).clamp_min(1e-30)), persistent=False)
        self.bias = torch.nn.Parameter(torch.zeros(n)) if title_bias else None

    def forward(self, tokens: dict[str, torch.Tensor], valid: torch.Tensor):
        import torch.nn.functional as F
        m_ = self.model
        c = m_.cfg
        h = m_.encode(tokens)[-1]
        is_target = valid & m_.target_action[tokens["action"]]
        exclude = self.excluded if bool(self.excluded.any()) else None
        first = first_positions(tokens["title"], valid, c.n_titles) if self.mask_history else None
        losses = {}
        if self.n_negatives > 0:
            table = m_.title.table()
            neg = torch.multinomial(self.q, self.n_negatives, replacement=True)        # (K,)
            neg_emb, neg_lq = table[neg], self.log_q[neg]
            if self.bias is not None:
                neg_lq = neg_lq - self.bias[neg]
        for j in range(c.mtp_k):
            m = is_target[:, j + 1:] & valid[:, : -(j + 1)]
            if not m.any():
                continue
            src = h[:, : -(j + 1)][m]
            tgt = tokens["title"][:, j + 1:][m]                                          # (N,)
            if first is not None:
                b_idx, t_idx = m.nonzero(as_tuple=True)                                   # source row, position
            if self.n_negatives <= 0:
                logits = m_.title_logits(src.unsqueeze(0), j)[0]
                if self.bias is not None:
                    logits = logits + self.bias
                if exclude is not None:
                    logits = logits.masked_fill(exclude, float("-inf"))
                if first is not None:
                    seen = first[b_idx] <= t_idx.unsqueeze(1)                             # (N, V)
                    seen[torch.arange(len(tgt)), tgt] = False
                    logits = logits.masked_fill(seen, float("-inf"))
                losses[f"title_{j + 1}"] = F.cross_entropy(logits, tgt)
                continue
            q = src + m_.mtp[j](src)                                                   # (N, D)
            pos = (q * table[tgt]).sum(-1, keepdim=True) - self.log_q[tgt].unsqueeze(1)
            if self.bias is not None:
                pos = pos + self.bias[tgt].unsqueeze(1)
            negl = q @ neg_emb.T - neg_lq                                                 # (N, K)
            negl = negl.masked_fill(neg.unsqueeze(0) == tgt.unsqueeze(1), float("-inf"))
            if first is not None:
                negl = negl.masked_fill(first[:, neg][b_idx] <= t_idx.unsqueeze(1), float("-inf"))
            logits = torch.cat([pos, negl], dim=1)
            losses[f"title_{j + 1}"] = F.cross_entropy(logits, torch.zeros(len(tgt), dtype=torch.long, device=logits.device))
        nxt = valid[:, 1:] & valid[:, :-1]
        w = {"title_1": c.w_title, "action": c.w_action, "duration": c.w_duration, "device": c.w_device}
        for f in ("action", "duration", "device"):
            if w[f]:
                losses[f] = F.cross_entropy(m_.heads[f](h[:, :-1][nxt]), tokens[f][:, 1:][nxt])
        total = sum(w.get(k, c.w_mtp) * v for k, v in losses.items())
        return total, {k: float(v.detach()) for k, v in losses.items()}
