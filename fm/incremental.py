"""Incremental inference: encode only a profile's new events, reusing the keys and values its
earlier events left in every layer (a KV cache), instead of re-encoding the whole window.

What is exact and what is not (``bench/incremental.py`` measures both):

* **Exact while the window is not full.** Positions count from the oldest event in the window and
  attention is causal, so an earlier event's keys and values in every layer do not depend on later
  events: appending events to a window that still has room gives the states a full re-encode gives
  (to float rounding; ``tests/test_incremental.py``). Mean pooling stays exact through a running sum.
* **Approximate once the window slides.** When old + new events exceed ``max_len`` the oldest fall
  out; in a re-encode every kept event then sits at a new position with a shorter context, so its
  cached keys/values are stale. :func:`slide` drops the oldest entries and keeps the rest as they
  are: cheap, and a drift that grows with how far the window moved.
* **The price.** The cache holds 2 x layers x events x d_model numbers per profile (the default
  model at a full 200-event window: 51,200 floats, 100 KiB in float16) -- more than the profile's
  embeddings, so it pays where a day touches few events of many long-lived profiles.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fm.model import FoundationModel, gap_seconds
from fm.schema import PAD, TOKEN_FIELDS


@dataclass
class KVCache:
    """Per layer keys/values (B, H, capacity, Dh) of each row's first ``lengths[b]`` events in
    slots 0..lengths[b]-1 (the rest is free), each event's cumulative time in seconds (B, capacity;
    for the time bias), the running sum of every layer's states (B, D; for mean pooling) and each
    row's last states. Slots are window positions, so no row's entries ever move on a plain extend."""
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    times: torch.Tensor
    lengths: torch.Tensor
    sums: list[torch.Tensor]
    last: list[torch.Tensor]

    @classmethod
    def empty(cls, model: FoundationModel, batch: int, capacity: int | None = None) -> "KVCache":
        cfg = model.cfg
        cap, dh, dev = capacity or cfg.max_len, cfg.d_model // cfg.n_heads, next(model.parameters()).device
        kv = [torch.zeros(batch, cfg.n_heads, cap, dh, device=dev) for _ in range(2 * cfg.n_layers)]
        zeros = [torch.zeros(batch, cfg.d_model, device=dev) for _ in range(2 * cfg.n_layers)]
        return cls(kv[::2], kv[1::2], torch.zeros(batch, cap, device=dev), torch.zeros(batch, dtype=torch.long, device=dev),
                   zeros[::2], zeros[1::2])

    @property
    def capacity(self) -> int:
        return self.times.shape[1]

    def clone(self) -> "KVCache":
        c = lambda ts: [t.clone() for t in ts]                                              # noqa: E731
        return KVCache(c(self.keys), c(self.values), self.times.clone(), self.lengths.clone(), c(self.sums), c(self.last))

    def nbytes_per_event(self, dtype: torch.dtype = torch.float16) -> int:
        """What one cached event costs to store: keys and values of every layer."""
        return 2 * len(self.keys) * self.keys[0].shape[1] * self.keys[0].shape[3] * torch.finfo(dtype).bits // 8

    def mean(self, layer: int) -> torch.Tensor:
        """(B, D) mean of ``layer``'s (1-based) states over each row's events."""
        return self.sums[layer - 1] / self.lengths.clamp(min=1).unsqueeze(1).to(self.sums[0].dtype)


@torch.no_grad()
def extend(model: FoundationModel, cache: KVCache, tokens: torch.Tensor, n_new: torch.Tensor) -> KVCache:
    """Encode each row's ``n_new[b]`` new events (``tokens`` (B, N, F) ids in
    :data:`fm.schema.TOKEN_FIELDS` order, right-padded) after its cached ones, **in place**: the
    new keys/values go to slots ``lengths[b]..``, and ``last`` / ``mean()`` become the pooled
    vectors a full re-encode gives. Raises when a row would outgrow the window (re-encode it, or
    :func:`slide` first and accept the drift)."""
    if model.training:
        raise RuntimeError("incremental inference runs the model in eval mode (dropout off)")
    B, N, _ = tokens.shape
    dev, c = tokens.device, cache.lengths
    width = int((c + n_new).max())
    if width > min(model.cfg.max_len, cache.capacity):
        raise ValueError(f"a row would hold {width} events, more than max_len={model.cfg.max_len} "
                         f"(cache capacity {cache.capacity})")
    steps = torch.arange(N, device=dev)
    valid = steps.unsqueeze(0) < n_new.unsqueeze(1)                                     # (B, N)
    pos = (c.unsqueeze(1) + steps).clamp_max(model.cfg.max_len - 1)                     # (B, N) = cache slots
    rows = torch.arange(B, device=dev).unsqueeze(1).expand(B, N)[valid]
    slots = pos[valid]
    x = model.embed({f: tokens[..., i] for i, f in enumerate(TOKEN_FIELDS)}, positions=pos)
    gap = tokens[..., TOKEN_FIELDS.index("gap")]
    end = cache.times.gather(1, (c - 1).clamp_min(0).unsqueeze(1)) * (c > 0).unsqueeze(1)
    # float32 running sum continued from the last cached time: the very additions a full encode makes
    t_new = torch.cumsum(torch.cat([end, gap_seconds(gap)], dim=1), dim=1)[:, 1:]      # (B, N)
    cache.times[rows, slots] = t_new[valid]
    k_pos = torch.arange(width, device=dev)
    allowed = k_pos.view(1, 1, width) <= pos.unsqueeze(2)                               # (B, N, width): causal by slot
    biases = _biases(model, pos, k_pos, t_new, cache.times[:, :width], allowed)
    last_new = (n_new - 1).clamp_min(0)
    for i, (block, bias) in enumerate(zip(model.blocks, biases)):
        x, _ = block.attend(x, bias, _store(cache, i, rows, slots, valid, width))
        h = model.ln_f(x) if i == len(model.blocks) - 1 else x
        cache.sums[i] += (h * valid.unsqueeze(-1)).sum(1)
        cache.last[i] = torch.where((n_new > 0).unsqueeze(1), h[torch.arange(B, device=dev), last_new], cache.last[i])
    cache.lengths = c + n_new
    return cache


def _store(cache: KVCache, layer: int, rows, slots, valid, width: int):
    """The ``kv`` hook of ``Block.attend``: write this step's keys/values into the layer's cache
    slots and attend over the first ``width`` slots (earlier events and the new ones)."""
    def kv(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        K, V = cache.keys[layer], cache.values[layer]
        K[rows, :, slots] = k.transpose(1, 2)[valid]
        V[rows, :, slots] = v.transpose(1, 2)[valid]
        return K[:, :, :width], V[:, :, :width]
    return kv


def _biases(model: FoundationModel, q_pos, k_pos, q_time, k_time, allowed) -> list[torch.Tensor]:
    """Per layer attention logits for the new events: the model's relative bias through the same
    formula a full encode uses (``RelativeBias.pairs``), or the bare mask without one."""
    if model.rel_bias is not None:
        timed = model.rel_bias.time is not None
        return model.rel_bias.pairs(q_pos, k_pos, q_time if timed else None, k_time if timed else None, allowed)
    mask = torch.zeros(allowed.shape, device=allowed.device).masked_fill(~allowed, float("-inf")).unsqueeze(1)
    return [mask] * len(model.blocks)


def prefill(model: FoundationModel, tokens: torch.Tensor, lengths: torch.Tensor) -> KVCache:
    """The cache of whole windows (B, L, F), right-padded: a first :func:`extend` from empty."""
    return extend(model, KVCache.empty(model, tokens.shape[0]), tokens, lengths)


def slide(cache: KVCache, drop: torch.Tensor) -> KVCache:
    """A copy that forgets each row's oldest ``drop[b]`` events so that new ones fit (approximate:
    the kept keys/values were computed at other positions, with the dropped events in their
    context). The running sums cannot forget exactly either, so they are rescaled to the kept share."""
    B, C = cache.times.shape
    idx = (torch.arange(C, device=drop.device).unsqueeze(0) + drop.unsqueeze(1)).clamp_max(C - 1)
    take = lambda t: t.gather(2, idx.view(B, 1, C, 1).expand_as(t))                        # noqa: E731
    kept = (cache.lengths - drop).clamp_min(0)
    share = (kept / cache.lengths.clamp(min=1)).unsqueeze(1).to(cache.sums[0].dtype)
    return KVCache([take(k) for k in cache.keys], [take(v) for v in cache.values], cache.times.gather(1, idx),
                   kept, [s * share for s in cache.sums], [t.clone() for t in cache.last])


def pad_tokens(rows: list[torch.Tensor], n_fields: int = len(TOKEN_FIELDS)) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad a list of (n_b, F) id tensors into (B, N, F) with PAD, and their lengths."""
    n = torch.tensor([r.shape[0] for r in rows], dtype=torch.long)
    out = torch.full((len(rows), max(int(n.max()), 1), n_fields), PAD, dtype=torch.long)
    for b, r in enumerate(rows):
        out[b, : r.shape[0]] = r
    return out, n
