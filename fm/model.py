"""The foundation model: a causal transformer over event tokens.

Each token is a whole event. Its embedding is the sum of one embedding per field (title, action,
duration bucket, device, canvas, locale, row, hour, day of week, gap) plus a position embedding.
The title part is a learned ID embedding **plus** a projection of a fixed content vector computed
from the catalogue text, so a title never seen in training still gets a useful vector: when the
vocabulary grows, a new title's vector is the one its content predicts (``fm.cold``), until training
gives it an ID.

Heads, all predicting the *next* event from the state at position t:
  * next titles t+1..t+k (multi-token prediction; scores tied to the title table, plus an optional
    learned per-title bias: popularity the dot product need not encode),
  * next action, duration bucket and device.
``encode()`` returns every layer's hidden states; extraction lives in ``fm.extract``; the training
objective (full or sampled softmax, multi-task, multi-token) lives in ``fm.losses``.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from fm import schema as S


COLD_TITLES = ("content", "ridge", "neighbours")
REL_BIAS = ("none", "pos", "time", "pos_time")


@dataclass
class ModelConfig:
    n_titles: int                      # title vocabulary size including PAD and OOV
    content_dim: int = 64              # width of the catalogue content vectors
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 2
    max_len: int = 128
    dropout: float = 0.1
    mtp_k: int = 2                     # predict the next k titles
    use_content: bool = True
    w_title: float = 1.0
    w_mtp: float = 0.5                 # weight of titles t+2..t+k
    w_action: float = 0.2
    w_duration: float = 0.2
    w_device: float = 0.1
    # actions whose titles are prediction targets (impressions and pauses are context only)
    target_actions: tuple[str, ...] = ("play", "complete", "add_to_list", "thumbs_up")
    field_sizes: dict[str, int] = field(default_factory=lambda: {
        "action": S.vocab_size(S.ACTIONS), "duration": S.N_DURATION, "device": S.vocab_size(S.DEVICES),
        "canvas": S.vocab_size(S.CANVASES), "locale": S.vocab_size(S.LOCALES), "row": S.N_ROW,
        "hour": S.N_HOUR, "dow": S.N_DOW, "gap": S.N_GAP,
    })
    # LayerNorm over the summed token embedding before the first block (as SASRec does). Off by
    # default so existing checkpoints load unchanged; on ML-1M it speeds up learning markedly.
    emb_norm: bool = False
    # A learned per-title output bias added to every title score (off: old checkpoints load unchanged).
    title_bias: bool = False
    # Side heads (action / duration / device) read a stop-gradient copy of the state: they are trained
    # and served, but never pull the shared representation away from next-title prediction.
    detach_heads: bool = False
    # Share of title ID embeddings zeroed per training step (inputs per occurrence, the output table
    # per title), so the content path must carry each title on its own: an unseen title has only
    # its content vector. 0 keeps the old behaviour (the ID embedding absorbs everything).
    id_dropout: float = 0.0
    # Mix ID and content by exposure (cold start): a title's ID part is scaled by a learned gate
    # sigmoid(a * log(1 + training interactions) + b), so a rarely seen title leans on its content
    # and a popular one on its ID. Off: the plain sum (old checkpoints load unchanged).
    exposure_gate: bool = False
    # Canvases (``fm.schema.CANVASES``) the model can be asked "what next *on this canvas*" about:
    # a learned surface query added to the state before scoring titles (``FoundationModel.query``).
    # Empty: no surface parameters at all (old checkpoints and configs load unchanged).
    surfaces: tuple[str, ...] = ()
    # How a title that was never trained (new since training) is served: "content" (the content
    # projection alone, the path ID dropout trains; untrained bias), "ridge" (vector and bias a ridge
    # map from content predicts) or "neighbours" (the nearest trained titles by content). Chosen on
    # cold validation users (bench/results/cold_start_before_ema.md, mean of 3 seeds: content at the 75th bias
    # percentile 0.145 HR@50, bias 0 0.136, ridge 0.038, neighbours 0.062; at the current defaults the
    # calibration is the one fm.recipe.COLD_CALIBRATION names per encoder).
    cold_titles: str = "content"
    # Calibration of a never-trained title's score (``cold_titles="content"``): its bias is this
    # quantile of the trained titles' biases, so a new title ranks as a title of that popularity
    # would, not as one of bias 0 (whose rank depends on where 0 falls among trained biases). None:
    # bias 0 (old checkpoints load unchanged). Chosen on cold validation users (bench/cold_start.py).
    cold_bias_quantile: float | None = None
    # ... and its content vector's scale: the title's vector is this times its content projection
    # (the ID row carries the difference), so a strong content encoder's cold titles do not crowd
    # warm ones out of rankings. 1.0: the projection as trained (old checkpoints load unchanged).
    cold_content_scale: float = 1.0
    # Relative attention bias (HSTU-style), learned per layer and head and added to the attention
    # logits: "pos" over log-bucketed distances in events, "time" over log2-bucketed time between
    # the two events (from the ``gap`` field), "pos_time" both. "none": plain causal attention.
    rel_bias: str = "none"
    # Canvases whose next events are next-title targets (a specialist trained for one surface: only
    # what happens next *on that canvas* is predicted; every event stays context). Empty: every
    # canvas (the default; old checkpoints and configs load unchanged).
    target_canvases: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.rel_bias not in REL_BIAS:
            raise ValueError(f"rel_bias={self.rel_bias!r}: expected one of {', '.join(REL_BIAS)}")
        if self.cold_titles not in COLD_TITLES:
            raise ValueError(f"cold_titles={self.cold_titles!r}: expected one of {', '.join(COLD_TITLES)}")
        if not 0.0 < self.cold_content_scale <= 1.0:
            raise ValueError(f"cold_content_scale must be in (0, 1], got {self.cold_content_scale}")
        if self.cold_bias_quantile is not None and not 0.0 <= self.cold_bias_quantile <= 1.0:
            raise ValueError(f"cold_bias_quantile must be in [0, 1] or None, got {self.cold_bias_quantile}")
        if not 0.0 <= self.id_dropout < 1.0:
            raise ValueError(f"id_dropout must be in [0, 1), got {self.id_dropout}")
        self.surfaces = tuple(self.surfaces)
        unknown = [s for s in self.surfaces if s not in S.CANVASES]
        if unknown or len(set(self.surfaces)) != len(self.surfaces):
            raise ValueError(f"surfaces: {list(self.surfaces)} must be distinct canvases of {list(S.CANVASES)}")
        self.target_canvases = tuple(self.target_canvases)
        unknown = [s for s in self.target_canvases if s not in S.CANVASES]
        if unknown or len(set(self.target_canvases)) != len(self.target_canvases):
            raise ValueError(f"target_canvases: {list(self.target_canvases)} must be distinct canvases of {list(S.CANVASES)}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["target_actions"] = list(self.target_actions)
        d["surfaces"] = list(self.surfaces)
        if not self.surfaces:          # a model without surfaces writes the same config as before
            del d["surfaces"]
        if self.rel_bias == "none":
            del d["rel_bias"]
        d["target_canvases"] = list(self.target_canvases)
        if not self.target_canvases:   # likewise: the default writes the config it wrote before
            del d["target_canvases"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        d["target_actions"] = tuple(d.get("target_actions", cls.target_actions))
        d["surfaces"] = tuple(d.get("surfaces", ()))
        d["target_canvases"] = tuple(d.get("target_canvases", ()))
        return cls(**d)


class TitleEmbedding(nn.Module):
    """ID embedding + projected content vector. ``table()`` is the (n_titles, d) title matrix."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.id = nn.Embedding(cfg.n_titles, cfg.d_model, padding_idx=S.PAD)
        nn.init.normal_(self.id.weight, std=0.02)
        self.register_buffer("content", torch.zeros(cfg.n_titles, cfg.content_dim))
        self.proj = nn.Linear(cfg.content_dim, cfg.d_model, bias=False)
        if getattr(cfg, "exposure_gate", False):
            self.register_buffer("exposure", torch.zeros(cfg.n_titles))     # log(1 + training interactions)
            self.gate = nn.Parameter(torch.tensor([1.0, 0.0]))              # slope, offset

    def id_scale(self, idx: torch.Tensor | None = None) -> torch.Tensor | float:
        """The exposure gate of titles ``idx`` (all when None); 1.0 without the gate."""
        if not getattr(self.cfg, "exposure_gate", False):
            return 1.0
        e = self.exposure if idx is None else self.exposure[idx]
        return torch.sigmoid(self.gate[0] * e + self.gate[1]).unsqueeze(-1)

    @torch.no_grad()
    def set_exposure(self, counts) -> None:
        """Interaction counts per title from the training data (a fine-tune never lowers them)."""
        if getattr(self.cfg, "exposure_gate", False):
            c = torch.as_tensor(counts, dtype=self.exposure.dtype, device=self.exposure.device)[: len(self.exposure)]
            self.exposure[: len(c)] = torch.maximum(self.exposure[: len(c)], torch.log1p(c))

    def id_part(self, idx: torch.Tensor | None = None) -> torch.Tensor:
        """The (gated) ID embedding of titles ``idx`` (all when None), without ID dropout."""
        w = self.id.weight if idx is None else self.id.weight[idx]
        return w * self.id_scale(idx)

    def table(self) -> torch.Tensor:
        t = self._drop_ids(self.id.weight, self.id.weight.shape[:1]) * self.id_scale()
        if self.cfg.use_content:
            t = t + self.proj(self.content)
        return t

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        e = self._drop_ids(self.id(idx), idx.shape) * self.id_scale(idx)
        if self.cfg.use_content:
            e = e + self.proj(self.content[idx])
        return e

    def _drop_ids(self, e: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """ID dropout (training only, no rescaling: at serving a title has its whole ID or none)."""
        p = getattr(self.cfg, "id_dropout", 0.0)
        if not (self.training and p > 0 and self.cfg.use_content):
            return e
        keep = torch.rand(shape, device=e.device) >= p
        return e * keep.unsqueeze(-1).to(e.dtype)


class Block(nn.Module):
    """Pre-LN transformer block with causal self-attention."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.dropout = cfg.n_heads, cfg.dropout
        self.ln1, self.ln2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.out = nn.Linear(cfg.d_model, cfg.d_model)
        self.mlp = nn.Sequential(nn.Linear(cfg.d_model, 4 * cfg.d_model), nn.GELU(),
                                 nn.Linear(4 * cfg.d_model, cfg.d_model), nn.Dropout(cfg.dropout))

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``bias``: (B, H, L, L) additive attention logits with the causal mask folded in (or None)."""
        return self.attend(x, bias)[0]

    def attend(self, x: torch.Tensor, bias: torch.Tensor | None = None, kv=None) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """The block over ``x`` (B, L, D). ``kv``: a callable given this step's keys/values
        (B, H, L, Dh) that returns every key/value the queries attend to -- ``fm.incremental``
        stores them in a profile's cache and returns the cache, earlier events included (``bias``
        (B, H, L, K) then carries the mask). Returns the new states and the keys/values used."""
        B, L, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(D, dim=-1)
        q, k, v = (t.view(B, L, self.n_heads, D // self.n_heads).transpose(1, 2) for t in (q, k, v))  # (B,H,L,Dh)
        if kv is not None:
            k, v = kv(k, v)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=bias is None and kv is None,
                                           dropout_p=self.dropout if self.training else 0.0)
        x = x + self.out(a.transpose(1, 2).reshape(B, L, D))                                        # (B,L,D)
        return x + self.mlp(self.ln2(x)), (k, v)


def gap_seconds(gap: torch.Tensor) -> torch.Tensor:
    """Approximate seconds since the previous event from ``gap`` bucket ids (``schema.gap_bucket``:
    bucket k holds [2^k, 2^(k+1)) s, bucket 0 under 2 s; PAD and the first event count 0)."""
    k = (gap - S.N_SPECIAL).clamp_min(0).to(torch.float32)
    return torch.where(gap > S.N_SPECIAL, 1.5 * torch.exp2(k), torch.zeros_like(k))


class RelativeBias(nn.Module):
    """HSTU-style relative attention bias: a learned scalar per layer, head and bucket of the
    distance between query i and key j <= i -- in events (exact up to 7, then log2 buckets) and in
    time (log2 of the seconds between them, summed from the ``gap`` field). Why: attention over a
    history should know *how long ago* an event was, not only how many events ago; HSTU found this
    the largest single gain on ML-1M. Zero-initialised, so a fresh model starts as plain causal
    attention."""

    N_POS, N_TIME = 20, 32

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.use_pos, self.use_time = "pos" in cfg.rel_bias, "time" in cfg.rel_bias
        self.n_layers, self.n_heads = cfg.n_layers, cfg.n_heads
        self.pos = nn.Parameter(torch.zeros(cfg.n_layers, self.N_POS, cfg.n_heads)) if self.use_pos else None
        self.time = nn.Parameter(torch.zeros(cfg.n_layers, self.N_TIME, cfg.n_heads)) if self.use_time else None

    @staticmethod
    def log_bucket(x: torch.Tensor, exact: int, n: int) -> torch.Tensor:
        """0..exact-1 as themselves, then one bucket per doubling, capped at n - 1."""
        lg = torch.log2(x.clamp_min(1).to(torch.float32)).floor().long()
        return torch.where(x < exact, x.long(), (exact + lg - int(math.log2(exact))).clamp_max(n - 1)).clamp_min(0)

    def forward(self, gap: torch.Tensor) -> list[torch.Tensor]:
        """(B, L) gap ids -> per layer (B, H, L, L) additive logits, -inf above the diagonal."""
        i = torch.arange(gap.shape[1], device=gap.device)
        t = torch.cumsum(gap_seconds(gap), dim=1) if self.time is not None else None    # (B, L) seconds
        return self.pairs(i, i, t, t, (i.unsqueeze(1) >= i.unsqueeze(0)).unsqueeze(0))

    def pairs(self, q_pos: torch.Tensor, k_pos: torch.Tensor, q_time: torch.Tensor | None,
              k_time: torch.Tensor | None, allowed: torch.Tensor) -> list[torch.Tensor]:
        """Per layer (B|1, H, Q, K) logits for queries at event positions ``q_pos`` ((Q,) or (B, Q))
        over keys at ``k_pos``, with times (B, Q) / (B, K) in seconds; ``allowed`` (B|1, Q, K) is
        the mask (-inf elsewhere). ``forward`` asks for the whole window, ``fm.incremental`` for the
        new events over cached and new keys: one formula for both, so caching stays exact."""
        d = (q_pos.unsqueeze(-1) - k_pos.unsqueeze(-2)).clamp_min(0)                    # (Q, K) or (B, Q, K)
        d = d if d.dim() == 3 else d.unsqueeze(0)
        mask = torch.zeros(allowed.shape, device=allowed.device).masked_fill(~allowed, float("-inf"))
        parts = mask.unsqueeze(1).unsqueeze(0).expand(self.n_layers, -1, self.n_heads, -1, -1)
        if self.pos is not None:                  # one row gather for all layers and heads
            table = self.pos.permute(1, 0, 2).reshape(self.N_POS, self.n_layers * self.n_heads)
            pb = F.embedding(self.log_bucket(d, 8, self.N_POS), table)                    # (B|1, Q, K, layers*H)
            parts = parts + pb.view(*d.shape, self.n_layers, self.n_heads).permute(3, 0, 4, 1, 2)
        if self.time is not None:
            dt = (q_time.unsqueeze(2) - k_time.unsqueeze(1)).clamp_min(0)              # (B, Q, K)
            tb = torch.where(dt < 1, 0, 1 + torch.log2(dt.clamp_min(1)).floor().long()).clamp_max(self.N_TIME - 1)
            parts = parts + self.time[:, tb].permute(0, 1, 4, 2, 3)                       # (layers, B, H, Q, K)
        return list(parts.unbind(0))


class FoundationModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.title = TitleEmbedding(cfg)
        self.fields = nn.ModuleDict({f: nn.Embedding(n, cfg.d_model, padding_idx=S.PAD)
                                     for f, n in cfg.field_sizes.items()})
        self.pos = nn.Embedding(cfg.max_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.emb_norm = nn.LayerNorm(cfg.d_model) if cfg.emb_norm else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.rel_bias = RelativeBias(cfg) if getattr(cfg, "rel_bias", "none") != "none" else None
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.mtp = nn.ModuleList(nn.Linear(cfg.d_model, cfg.d_model) for _ in range(cfg.mtp_k))
        self.heads = nn.ModuleDict({f: nn.Linear(cfg.d_model, cfg.field_sizes[f])
                                    for f in ("action", "duration", "device")})
        self.bias = nn.Parameter(torch.zeros(cfg.n_titles)) if cfg.title_bias else None
        self.surface = self._surface_query(cfg)
        target = torch.zeros(cfg.field_sizes["action"], dtype=torch.bool)
        for a in cfg.target_actions:
            target[S.vocab_index(S.ACTIONS)[a]] = True
        self.register_buffer("target_action", target, persistent=False)
        canvases = getattr(cfg, "target_canvases", ())
        on = torch.ones(cfg.field_sizes["canvas"], dtype=torch.bool) if not canvases else \
            torch.zeros(cfg.field_sizes["canvas"], dtype=torch.bool)
        for c in canvases:
            on[S.vocab_index(S.CANVASES)[c]] = True
        self.register_buffer("target_canvas", on, persistent=False)

    def _surface_query(self, cfg: ModelConfig) -> nn.Embedding | None:
        """The surface query table over the canvas vocabulary, zero-initialised so a fresh surface
        model starts as the plain model; ``surface_of`` maps a canvas id to its row, PAD (a zero row
        without gradient) for canvases that are not configured surfaces, so the plain state keeps
        meaning "next on any other canvas"."""
        n = cfg.field_sizes["canvas"]
        lookup = torch.zeros(n, dtype=torch.long)
        for name in cfg.surfaces:
            lookup[S.vocab_index(S.CANVASES)[name]] = S.vocab_index(S.CANVASES)[name]
        self.register_buffer("surface_of", lookup, persistent=False)
        if not cfg.surfaces:
            return None
        # built from zeros, never drawn: the random stream (so every other weight) matches the plain model's
        return nn.Embedding.from_pretrained(torch.zeros(n, cfg.d_model), freeze=False, padding_idx=S.PAD)

    def surface_vector(self, name: str) -> torch.Tensor:
        """The (D,) query vector of a configured surface (what embed adds to a profile's state)."""
        if name not in self.cfg.surfaces:
            raise KeyError(f"surface {name!r} is not configured; the model has {list(self.cfg.surfaces)}")
        return self.surface.weight[S.vocab_index(S.CANVASES)[name]]

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def embed(self, tokens: dict[str, torch.Tensor], positions: torch.Tensor | None = None) -> torch.Tensor:
        """Sum of field embeddings + position: (B, L) ints per field -> (B, L, D). ``positions``
        ((B, L) window positions; default 0..L-1): where new events sit after cached ones."""
        L = tokens["title"].shape[1]
        positions = torch.arange(L, device=tokens["title"].device) if positions is None else positions
        x = self.title(tokens["title"]) + self.pos(positions)
        for f in S.TOKEN_FIELDS:             # fixed order: float sums must not depend on dict order
            if f in self.fields:
                x = x + self.fields[f](tokens[f])
        if self.emb_norm is not None:
            x = self.emb_norm(x)
        return self.drop(x)

    def encode(self, tokens: dict[str, torch.Tensor], prefix: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Hidden states after every block, each (B, L, D); the last one is final-LayerNorm'd.
        ``prefix`` (P, D): soft prompt tokens (``fm.prompts``) placed before the events, attended to
        by every event, and cut from the returned states."""
        x, states, gap = self.embed(tokens), [], tokens["gap"]
        if prefix is not None:
            x = torch.cat([prefix.to(x.dtype).expand(x.shape[0], -1, -1), x], dim=1)            # (B, P+L, D)
            gap = F.pad(gap, (prefix.shape[0], 0), value=S.PAD)                              # (B, P+L)
        biases = self.rel_bias(gap) if self.rel_bias is not None else [None] * len(self.blocks)
        for block, bias in zip(self.blocks, biases):
            x = block(x, bias)
            states.append(x)
        states[-1] = self.ln_f(x)
        return states if prefix is None else [s[:, prefix.shape[0]:] for s in states]

    def title_logits(self, h: torch.Tensor, j: int, surface: torch.Tensor | None = None) -> torch.Tensor:
        """Scores of every title as the (j+1)-th next title: (B, L, D) -> (B, L, V); ``surface``:
        canvas ids (broadcastable to (B, L)) of the canvas the title is asked for (see ``query``)."""
        logits = self.query(h, j, surface) @ self.title.table().T
        if self.bias is not None:
            logits = logits + self.bias
        logits[..., : S.N_SPECIAL] = float("-inf")
        return logits

    def query(self, h: torch.Tensor, j: int = 0, surface: torch.Tensor | None = None) -> torch.Tensor:
        """The vector a state matches titles with for the (j+1)-th next title; with ``surface``
        (canvas ids shaped like ``h`` without its last dim) the target canvas's surface query is
        added, so the same state answers "what next on this canvas". Ignored without surfaces."""
        q = h + self.mtp[j](h)
        if surface is not None and self.surface is not None:
            q = q + self.surface(self.surface_of[surface])
        return q

    def head(self, name: str, h: torch.Tensor) -> torch.Tensor:
        """Logits of a side head (action / duration / device) from states ``h``."""
        return self.heads[name](h.detach() if self.cfg.detach_heads else h)

    @torch.no_grad()
    def grow_titles(self, new_content: torch.Tensor) -> None:
        """Append titles with a zero ID row (the content projection alone) and the median trained
        bias; old rows stay bit-identical. Serving gives the new rows what ``cfg.cold_titles``
        says through ``fm.cold.add_titles``, which calls this first."""
        n_new = new_content.shape[0]
        if n_new == 0:
            return
        old = self.title.id.weight.data
        n_old = old.shape[0]
        emb = nn.Embedding(n_old + n_new, old.shape[1], padding_idx=S.PAD).to(old.device)
        emb.weight.data[:n_old] = old
        emb.weight.data[n_old:] = 0.0
        self.title.id = emb
        self.title.content = torch.cat([self.title.content, new_content.to(old.device, old.dtype)])
        if getattr(self.cfg, "exposure_gate", False):          # a new title has had no interactions
            self.title.exposure = torch.cat([self.title.exposure, self.title.exposure.new_zeros(n_new)])
        if self.bias is not None:               # the typical trained title's bias, until regressed below
            fill = self.bias.data[S.N_SPECIAL:].median() if n_old > S.N_SPECIAL else self.bias.new_zeros(())
            self.bias = nn.Parameter(torch.cat([self.bias.data, fill.expand(n_new).clone()]))
        self.cfg.n_titles += n_new


def init_weights(model: FoundationModel, zero_fields: bool = False) -> None:
    """GPT-2 style init: small normal weights, residual projections scaled by depth.

    ``zero_fields`` starts every non-title field embedding (action, time, device, ...) at zero, so
    the title signal dominates the first steps and side features grow only where they help (on
    ML-1M five of the nine fields are constant)."""
    for name, p in model.named_parameters():
        if p.dim() >= 2 and "title.id" not in name and not name.startswith(("surface.", "rel_bias.")):  # these start at 0
            nn.init.normal_(p, std=0.02)
        if name.endswith("out.weight") or name.endswith("mlp.2.weight"):
            nn.init.normal_(p, std=0.02 / math.sqrt(2 * model.cfg.n_layers))
    if zero_fields:
        with torch.no_grad():
            for emb in model.fields.values():
                emb.weight.zero_()
