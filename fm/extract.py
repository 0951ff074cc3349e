"""Embedding extraction, kept apart from the training ``forward()``.

Profile embeddings come from several transformer layers: the state at the last real position of
each chosen layer, and a mean over real positions. Title embeddings are the model's title table
(ID + content): the same space as the last layer's profile state, so a dot product scores a title
for a profile. Titles added after training have zero ID rows, i.e. content-only vectors.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from fm.data import Sequences, length_bucketed
from fm.model import FoundationModel


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


def default_layers(n_layers: int) -> tuple[LayerSpec, ...]:
    """A middle layer and the last layer (last position), plus the last layer mean-pooled."""
    mid = max(1, n_layers // 2)
    specs = [LayerSpec(mid, "last"), LayerSpec(n_layers, "last"), LayerSpec(n_layers, "mean")]
    return tuple(dict.fromkeys(specs))


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


@torch.inference_mode()
def profile_embeddings(model: FoundationModel, seqs: Sequences, specs: tuple[LayerSpec, ...],
                       batch_size: int = 256, device: torch.device | str = "cpu") -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
    """Yield (profile_ids, {column: (b, D) float32}) per length-bucketed batch."""
    check_layers(specs, model.cfg.n_layers)
    device = torch.device(device)
    model.eval().to(device)
    for rows in length_bucketed(seqs.lengths, batch_size):
        b = seqs.batch(rows, model.cfg.max_len)
        tokens = {k: v.to(device) for k, v in b.tokens.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            states = model.encode(tokens)
        vecs = pool(states, b.valid.to(device), b.lengths.to(device), specs)
        yield seqs.profile_id[rows], {k: v.float().cpu().numpy() for k, v in vecs.items()}


@torch.inference_mode()
def title_embeddings(model: FoundationModel) -> np.ndarray:
    """(n_titles, D) float32: row i is the vector of vocabulary id i."""
    return model.title.table().float().cpu().numpy()
