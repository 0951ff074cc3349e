"""Embedding extraction, kept apart from the training ``forward()``.

Profile embeddings come from several transformer layers: the state at the last real position of
each chosen layer, and a mean over real positions. Title embeddings are the model's title table
(ID + content): the same space as the last layer's profile state, so a dot product scores a title
for a profile. Titles added after training have zero ID rows, i.e. content-only vectors.

Inference runs through :class:`ProfileEncoder`, an inference-only view of a
:class:`~fm.model.FoundationModel` (same weights, same math, no copy of the blocks):

* the title table (ID + projected content) is computed **once**, then every field table, the
  title table and the position table are looked up by one ``embedding_bag(sum)`` instead of eleven
  gathers and ten additions;
* each block is evaluated with the residual additions fused into the GEMMs (``addmm_`` with
  ``beta=1``) and only the layers that the requested columns need are run;
* batches are bounded by a **token budget** (default 8192 tokens), not a profile count: every
  activation then stays well below glibc's mmap threshold, so the allocator reuses warm memory
  instead of page-faulting ~50 MB fresh buffers on every GEMM (measured on the 2-core CPU: 256
  profiles x 200 tokens ran at ~45% of the matmul bound, 40 x 200 at ~75%).

The same module is what :mod:`fm.export` exports, so the exported graph is the production math.
Streaming over Arrow (history rows in, vector rows out, both engines) lives in :mod:`fm.stream`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from fm.data import Sequences, length_bucketed
from fm.model import FoundationModel
from fm.schema import HEAD_CLASSES, N_SPECIAL, PAD, TOKEN_FIELDS

DEFAULT_BATCH_TOKENS = 8192
DEFAULT_CHUNK_PROFILES = 4096


@dataclass(frozen=True)
class LayerSpec:
    """One output column: transformer layer (1-based) and pooling ('last' or 'mean')."""
    layer: int
    pool: str

    @property
    def name(self) -> str:
        return f"emb_layer{self.layer}_{self.pool}"

    @classmethod
    def parse(cls, text: str) -> "LayerSpec":
        """'2:last' or '1:mean'."""
        layer, _, pool = text.partition(":")
        if pool not in ("last", "mean") or not layer.isdigit():
            raise ValueError(f"bad layer spec {text!r}: expected '<layer>:last' or '<layer>:mean'")
        return cls(int(layer), pool)


def surface_column(surface: str) -> str:
    """The profile table column of one surface's vector ('kids' -> 'emb_surface_kids')."""
    return f"emb_surface_{surface}"


def head_column(head: str) -> str:
    """The profile table column of one side head's probabilities ('action' -> 'head_action')."""
    return f"head_{head}"


def trained_heads(cfg) -> tuple[str, ...]:
    """The side heads a model was trained with (loss weight > 0): the only ones worth publishing,
    since an untrained head's outputs are its random initialisation."""
    weights = {"action": cfg.w_action, "duration": cfg.w_duration, "device": cfg.w_device}
    return tuple(h for h in HEAD_CLASSES if weights[h] > 0)


def parse_heads(text: str, cfg) -> tuple[str, ...]:
    """'auto' -> :func:`trained_heads`; 'none' or '' -> none; else a comma list of trained heads."""
    text = text.strip()
    if text in ("", "none"):
        return ()
    if text == "auto":
        return trained_heads(cfg)
    heads = tuple(dict.fromkeys(h.strip() for h in text.split(",") if h.strip()))
    unknown = [h for h in heads if h not in HEAD_CLASSES]
    if unknown:
        raise ValueError(f"heads={text!r}: unknown head(s) {unknown}; the heads are {', '.join(HEAD_CLASSES)} "
                         f"(or 'auto', 'none')")
    untrained = [h for h in heads if h not in trained_heads(cfg)]
    if untrained:
        raise ValueError(f"heads={text!r}: {untrained} were not trained by this model (loss weight 0): their "
                         f"outputs would be random; trained heads: {list(trained_heads(cfg)) or 'none'}")
    return heads


def default_layers(n_layers: int) -> tuple[LayerSpec, ...]:
    """A middle layer and the last layer (last position), plus the last layer mean-pooled."""
    mid = max(1, n_layers // 2)
    specs = [LayerSpec(mid, "last"), LayerSpec(n_layers, "last"), LayerSpec(n_layers, "mean")]
    return tuple(dict.fromkeys(specs))


def parse_layers(text: str, n_layers: int) -> tuple[LayerSpec, ...]:
    """'1:last,2:mean' -> specs; '' -> :func:`default_layers`."""
    specs = tuple(dict.fromkeys(LayerSpec.parse(x.strip()) for x in text.split(",") if x.strip()))
    specs = specs or default_layers(n_layers)
    check_layers(specs, n_layers)
    return specs


def check_layers(specs: tuple[LayerSpec, ...], n_layers: int) -> None:
    for s in specs:
        if not 1 <= s.layer <= n_layers:
            raise ValueError(f"layer {s.layer} requested but the model has layers 1..{n_layers}")


def pool(states: list[torch.Tensor], valid: torch.Tensor, lengths: torch.Tensor, specs: tuple[LayerSpec, ...]) -> dict[str, torch.Tensor]:
    """Pick (B, D) vectors from per-layer (B, L, D) states."""
    out, rows = {}, torch.arange(valid.shape[0], device=valid.device)
    w = valid.unsqueeze(-1).to(states[0].dtype)
    for s in specs:
        h = states[s.layer - 1]
        out[s.name] = h[rows, lengths - 1] if s.pool == "last" else (h * w).sum(1) / w.sum(1).clamp(min=1)
    return out


# ------------------------------------------------------------------------------------------------
# The inference encoder
# ------------------------------------------------------------------------------------------------
class ProfileEncoder(nn.Module):
    """Token ids -> pooled profile vectors, one tensor per :class:`LayerSpec` (inference only).

    ``forward(tokens, lengths)``: ``tokens`` (B, L, F) integer ids in :data:`fm.schema.TOKEN_FIELDS`
    order, right-padded with PAD; ``lengths`` (B,) real tokens per row (>= 1). Returns a tuple of
    (B, D) tensors in ``specs`` order, then one per ``surfaces`` entry: the last layer's
    last-position state plus that surface's query vector (:meth:`FoundationModel.query`), so a
    dot product with a title vector is the model's "next on this canvas" score, then one per
    ``heads`` entry: that side head's class probabilities at the last event (softmax over the real
    classes, :data:`fm.schema.HEAD_CLASSES` order; ``dims`` gives each output's width). Shares the
    blocks' parameters with ``model``; the fused embedding table is a snapshot, so build the
    encoder after ``fm.cold.add_titles``. ``prompt`` (P, D): a task's soft prompt (``fm.prompts``) placed
    before every row's events, the model's weights unchanged (the vectors of that task's view).
    """

    def __init__(self, model: FoundationModel, specs: tuple[LayerSpec, ...], surfaces: tuple[str, ...] = (),
                 prompt: torch.Tensor | None = None, heads: tuple[str, ...] = ()):
        super().__init__()
        cfg = model.cfg
        # soft prompt tokens (fm.prompts) placed before the events, as FoundationModel.encode(prefix=...)
        self.register_buffer("prompt", torch.zeros(0, cfg.d_model) if prompt is None else prompt.detach().clone(),
                             persistent=False)
        check_layers(specs, cfg.n_layers)
        self.specs = tuple(specs)
        self.names = [s.name for s in specs] + [surface_column(s) for s in surfaces] + [head_column(h) for h in heads]
        self.dims = [cfg.d_model] * (len(specs) + len(surfaces)) + [len(HEAD_CLASSES[h]) for h in heads]
        self.heads = nn.ModuleList(model.heads[h] for h in heads)       # shared with the model, not copied
        with torch.no_grad():
            sq = [model.surface_vector(s).detach() for s in surfaces]
        self.register_buffer("surface_queries", torch.stack(sq).clone() if sq else torch.zeros(0, cfg.d_model),
                             persistent=False)
        self.n_heads, self.d_model, self.max_len = cfg.n_heads, cfg.d_model, cfg.max_len
        with torch.no_grad():
            tables = [model.title.table().detach()] + [model.fields[f].weight.detach() for f in TOKEN_FIELDS[1:]]
        sizes = [t.shape[0] for t in tables]
        self.register_buffer("table", torch.cat(tables).contiguous().clone())
        self.register_buffer("offsets", torch.tensor(np.cumsum([0] + sizes[:-1]), dtype=torch.long))
        self.register_buffer("pos", model.pos.weight.detach().clone())
        self.emb_norm = model.emb_norm                      # the embedding LayerNorm, when the model has one
        self.depth = cfg.n_layers if surfaces or heads else max(s.layer for s in specs)
        self.blocks = nn.ModuleList(list(model.blocks)[: self.depth])
        self.ln_f = model.ln_f if self.depth == cfg.n_layers else None
        self.n_layers = cfg.n_layers
        self.rel_bias = model.rel_bias                      # relative attention bias, when the model has one
        self.gap_field = TOKEN_FIELDS.index("gap")
        self.eval()

    def _block_autocast(self, blk: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``Block.forward`` in eval mode, op for op (mixed precision: the residual stream stays
        float32 as in training, GEMMs run in the autocast dtype)."""
        B, L, D = x.shape
        H = self.n_heads
        q, k, v = blk.qkv(blk.ln1(x)).split(D, dim=-1)
        q, k, v = (t.view(B, L, H, D // H).transpose(1, 2) for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=bias is None)
        x = x + blk.out(a.transpose(1, 2).reshape(B, L, D))
        return x + blk.mlp(blk.ln2(x))

    def _block(self, blk: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``Block.forward`` in eval mode, with the residual adds fused into the GEMMs (float32)."""
        if x.dtype != torch.float32 or torch.is_autocast_enabled(x.device.type):
            return self._block_autocast(blk, x, bias)
        B, L, D = x.shape
        H = self.n_heads
        x2 = x.view(B * L, D)
        h = F.layer_norm(x2, (D,), blk.ln1.weight, blk.ln1.bias, blk.ln1.eps)
        qkv = torch.addmm(blk.qkv.bias, h, blk.qkv.weight.t()).view(B, L, 3, H, D // H)
        q, k, v = qkv.unbind(2)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=bias, is_causal=bias is None)
        a = a.transpose(1, 2).reshape(B * L, D)
        x2 = torch.addmm(x2, a, blk.out.weight.t()).add_(blk.out.bias)     # new tensor: x stays intact
        fc, proj = blk.mlp[0], blk.mlp[2]
        h = F.layer_norm(x2, (D,), blk.ln2.weight, blk.ln2.bias, blk.ln2.eps)
        g = torch.addmm(fc.bias, h, fc.weight.t())
        torch.ops.aten.gelu_(g)                                             # exact (erf) GELU, in place
        x2.addmm_(g, proj.weight.t()).add_(proj.bias)
        return x2.view(B, L, D)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, ...]:
        B, L, nf = tokens.shape
        idx = (tokens + self.offsets).reshape(B * L, nf)
        x = F.embedding_bag(idx, self.table, mode="sum").view(B, L, self.d_model).add_(self.pos[:L])
        if self.emb_norm is not None:
            x = self.emb_norm(x)
        n_prompt, gap = self.prompt.shape[0], tokens[:, :, self.gap_field]
        if n_prompt:
            x = torch.cat([self.prompt.to(x.dtype).expand(B, -1, -1), x], dim=1)               # (B, P+L, D)
            gap = F.pad(gap, (n_prompt, 0), value=PAD)
        states: list[torch.Tensor] = []
        biases = self.rel_bias(gap) if self.rel_bias is not None else [None] * len(self.blocks)
        for blk, bias in zip(self.blocks, biases):
            x = self._block(blk, x, bias)
            states.append(x)
        if self.ln_f is not None:
            states[-1] = self.ln_f(states[-1])
        if n_prompt:
            states = [h[:, n_prompt:] for h in states]                                        # (B, L, D) each
        rows = torch.arange(B, device=tokens.device)
        valid = (torch.arange(L, device=tokens.device).unsqueeze(0) < lengths.unsqueeze(1)).unsqueeze(1)  # (B,1,L)
        out = []
        for s in self.specs:
            h = states[s.layer - 1]
            if s.pool == "last":
                out.append(h[rows, lengths - 1])
            else:                                               # masked mean as one batched GEMV
                w = valid.to(h.dtype) / lengths.clamp(min=1).view(B, 1, 1).to(h.dtype)
                out.append(torch.bmm(w, h).squeeze(1))
        last = states[-1][rows, lengths - 1]
        for i in range(self.surface_queries.shape[0]):
            out.append(last + self.surface_queries[i].to(last.dtype))
        for head in self.heads:                                 # real classes only: PAD/OOV are never targets
            out.append(torch.softmax(head(last).float()[:, N_SPECIAL:], dim=-1).to(last.dtype))
        return tuple(out)


def row_windows(offsets: np.ndarray, rows: np.ndarray, max_len: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Where each row's last ``max_len`` tokens start in the flat token arrays, how many there are
    (int64), and the padded width of the batch; shared by :func:`batch_ids` and its on-device twin
    :func:`fm.stream.gather_batch`."""
    ends = offsets[rows + 1]
    starts = np.maximum(offsets[rows], ends - max_len).astype(np.int64)
    lens = (ends - starts).astype(np.int64)
    return starts, lens, int(max(lens.max(initial=1), 1))


def batch_ids(seqs: Sequences, rows: np.ndarray, max_len: int, stacked: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L, F) int32 ids (last ``max_len`` tokens per row, right-padded) and (B,) int64 lengths."""
    if stacked is None:
        stacked = np.stack([seqs.values[f] for f in TOKEN_FIELDS], axis=1)
    starts, lens, L = row_windows(seqs.offsets, rows, max_len)
    pos = np.arange(L)[None, :]
    valid = pos < lens[:, None]
    ids = stacked[np.where(valid, starts[:, None] + pos, 0)]
    ids[~valid] = PAD
    return torch.from_numpy(ids), torch.from_numpy(lens)


def token_batches(lengths: np.ndarray, max_len: int, batch_tokens: int = DEFAULT_BATCH_TOKENS,
                  max_batch: int = 1024) -> Iterator[np.ndarray]:
    """Rows sorted by length, cut so that each batch holds at most ``batch_tokens`` padded tokens."""
    lens = np.clip(lengths, 1, max_len)
    order = np.argsort(lens, kind="stable")
    i, n = 0, len(order)
    while i < n:
        j = i + 1
        while j < n and j - i < max_batch and (j - i + 1) * lens[order[j]] <= batch_tokens:
            j += 1
        yield order[i:j]
        i = j


def autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.inference_mode()
def profile_embeddings(model: FoundationModel, seqs: Sequences, specs: tuple[LayerSpec, ...],
                       batch_size: int = 256, device: torch.device | str = "cpu",
                       batch_tokens: int = DEFAULT_BATCH_TOKENS) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
    """Yield (profile_ids, {column: (b, D) float32}) per length-bucketed batch (at most
    ``batch_size`` profiles and ``batch_tokens`` padded tokens per batch)."""
    check_layers(specs, model.cfg.n_layers)
    device = torch.device(device)
    model.eval().to(device)
    encoder = ProfileEncoder(model, specs).to(device)
    stacked = np.stack([seqs.values[f] for f in TOKEN_FIELDS], axis=1) if len(seqs) else None
    for rows in token_batches(seqs.lengths, model.cfg.max_len, batch_tokens, batch_size):
        ids, lens = batch_ids(seqs, rows, model.cfg.max_len, stacked)
        with autocast(device):
            vecs = encoder(ids.to(device), lens.to(device))
        yield seqs.profile_id[rows], {n: v.float().cpu().numpy() for n, v in zip(encoder.names, vecs)}


@torch.inference_mode()
def reference_embeddings(model: FoundationModel, seqs: Sequences, specs: tuple[LayerSpec, ...],
                         batch_size: int = 64, prompt: torch.Tensor | None = None) -> dict[str, np.ndarray]:
    """The plain eager path (``model.encode`` + :func:`pool`), row order: what the fast path must equal."""
    check_layers(specs, model.cfg.n_layers)
    model.eval()
    out = {s.name: np.empty((len(seqs), model.cfg.d_model), np.float32) for s in specs}
    for rows in length_bucketed(seqs.lengths, batch_size):
        b = seqs.batch(rows, model.cfg.max_len)
        vecs = pool(model.encode(b.tokens, prefix=prompt), b.valid, b.lengths, specs)
        for k, v in vecs.items():
            out[k][rows] = v.float().numpy()
    return out


@torch.inference_mode()
def title_embeddings(model: FoundationModel) -> np.ndarray:
    """(n_titles, D) float32: row i is the vector of vocabulary id i."""
    return model.title.table().float().cpu().numpy()
