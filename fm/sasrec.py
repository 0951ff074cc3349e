"""SASRec baseline (Kang & McAuley 2018) in plain PyTorch, trained like RecBole's ``CE`` variant.

Causal self-attention over item ids only (no side features), learned positional embeddings,
embedding LayerNorm + dropout, post-LN transformer layers with GELU feed-forward (RecBole's
layout), and the output scores are the dot product with the (tied) item embedding table: full
softmax cross-entropy over every item at every position. Defaults: 2 layers, d=64, 2 heads,
dropout 0.2, max length 200.

It reads the same padded :class:`fm.data.Batch` as the foundation model (only the ``title`` field),
so :func:`fm.fit.fit` trains and :mod:`fm.protocol` evaluates both identically.

Off by default, for a control experiment only: ``n_negatives > 0`` trains with the sampled softmax,
``title_bias`` adds a per-item output bias and ``mask_history`` removes already-seen items from the
training softmax -- the options :class:`fm.losses.Objective` gives our model -- so the benchmark
can separate what the training recipe buys from what the model buys.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from fm.data import Batch
from fm.losses import first_positions, sampled_softmax
from fm.schema import N_SPECIAL, PAD


@dataclass
class SASRecConfig:
    n_items: int                     # vocabulary size including PAD and OOV
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 2
    max_len: int = 200
    dropout: float = 0.2
    ffn_mult: int = 4
    norm_first: bool = False         # RecBole: post-LN
    n_negatives: int = 0             # 0 = full softmax (the baseline); > 0 = sampled softmax (control)
    alpha: float = 1.0               # negatives drawn from (count + 1) ** alpha, logQ-corrected
    title_bias: bool = False         # per-item output bias (control)
    mask_history: bool = False       # drop items seen earlier in the window from the softmax (control)

    def to_dict(self) -> dict:
        return asdict(self)


class SASRec(nn.Module):
    def __init__(self, cfg: SASRecConfig):
        super().__init__()
        self.cfg = cfg
        self.item = nn.Embedding(cfg.n_items, cfg.d_model, padding_idx=PAD)
        self.pos = nn.Embedding(cfg.max_len, cfg.d_model)
        self.ln = nn.LayerNorm(cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        layer = nn.TransformerEncoderLayer(cfg.d_model, cfg.n_heads, cfg.ffn_mult * cfg.d_model, cfg.dropout,
                                           activation="gelu", batch_first=True, norm_first=cfg.norm_first)
        self.encoder = nn.TransformerEncoder(layer, cfg.n_layers, enable_nested_tensor=False)
        self.ln_f = nn.LayerNorm(cfg.d_model) if cfg.norm_first else nn.Identity()
        self.bias = nn.Parameter(torch.zeros(cfg.n_items)) if cfg.title_bias else None
        q = torch.zeros(cfg.n_items)
        q[N_SPECIAL:] = 1.0
        self.register_buffer("q", q / q.sum(), persistent=False)
        self.apply(self._init)

    def set_popularity(self, counts) -> None:
        """Training counts per item: the proposal of the sampled softmax, ``(count + 1) ** alpha``."""
        q = torch.as_tensor(counts, dtype=torch.float32)[: self.cfg.n_items].add(1.0).pow(self.cfg.alpha)
        q[:N_SPECIAL] = 0.0
        self.q = q / q.sum()

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def hidden(self, items: torch.Tensor) -> torch.Tensor:
        """(B, L) item ids, right-padded -> (B, L, D). Causal, so padding never reaches real tokens."""
        L = items.shape[1]
        x = self.drop(self.ln(self.item(items) + self.pos(torch.arange(L, device=items.device))))
        mask = nn.Transformer.generate_square_subsequent_mask(L, device=items.device, dtype=x.dtype)
        return self.ln_f(self.encoder(x, mask=mask, is_causal=True))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        out = h @ self.item.weight.T
        if self.bias is not None:
            out = out + self.bias
        out[..., :N_SPECIAL] = float("-inf")
        return out

    def sampled_loss(self, h: torch.Tensor, tgt: torch.Tensor, seen_neg=None) -> torch.Tensor:
        """The control's sampled softmax: the foundation model's own (:func:`fm.losses.sampled_softmax`)."""
        neg = torch.multinomial(self.q, self.cfg.n_negatives, replacement=True)
        return sampled_softmax(h, self.item.weight, tgt, neg, torch.log(self.q.clamp_min(1e-30)), self.bias, seen_neg)

    def forward(self, tokens: dict[str, torch.Tensor], valid: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Next-item cross-entropy at every position whose next token is real."""
        items = tokens["title"]
        h = self.hidden(items)
        m = valid[:, 1:] & valid[:, :-1]
        tgt = items[:, 1:][m]
        first = b_idx = t_idx = None
        if self.cfg.mask_history:
            first = first_positions(items, valid, self.cfg.n_items)
            b_idx, t_idx = m.nonzero(as_tuple=True)
        if self.cfg.n_negatives > 0:
            seen_neg = None if first is None else (lambda neg: first[:, neg][b_idx] <= t_idx.unsqueeze(1))
            loss = self.sampled_loss(h[:, :-1][m], tgt, seen_neg)
        else:
            logits = self.logits(h[:, :-1][m])
            if first is not None:
                seen = first[b_idx] <= t_idx.unsqueeze(1)
                seen[torch.arange(len(tgt)), tgt] = False
                logits = logits.masked_fill(seen, float("-inf"))
            loss = F.cross_entropy(logits, tgt)
        return loss, {"title_1": float(loss.detach())}

    @torch.no_grad()
    def scores(self, b: Batch) -> torch.Tensor:
        """(B, n_items) next-item scores after the last real token of each row."""
        h = self.hidden(b.tokens["title"])
        return self.logits(h[torch.arange(h.shape[0]), b.lengths - 1])
