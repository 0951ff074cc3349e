"""Timing primitives of the embed benchmarks: the model shapes, the FLOP count and matmul bound, a
synthetic history, and :func:`bench_context`'s interleaved rounds. ``bench/embed.py`` and
``bench/daily.py`` both measure the production shape with them, so both report the same kind of
fraction of the bound.
"""
from __future__ import annotations

import resource
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import torch

from fm.data import Sequences
from fm.extract import ProfileEncoder, default_layers, reference_embeddings
from fm.model import FoundationModel, ModelConfig, init_weights
from fm.recipe import Recipe
from fm.schema import N_SPECIAL, TOKEN_FIELDS
from fm.stream import BATCH_LIMITS, embed_batches

REALISTIC = dict(n_titles=20000, content_dim=64, d_model=256, n_layers=4, n_heads=4, max_len=512)
# The same shape with the recipe's architecture switches (relative position bias, embedding LayerNorm,
# title bias): what `fmpipe train` builds. The position bias makes attention take a mask instead of
# the causal shortcut, so it costs more than the plain shape (reported beside it).
RECIPE_ARCH = {**REALISTIC, "rel_bias": Recipe.rel_bias, "emb_norm": Recipe.emb_norm, "title_bias": Recipe.title_bias}
SMALL = dict(n_titles=5000, content_dim=32, d_model=64, n_layers=2, n_heads=2, max_len=64)
TINY = dict(n_titles=5000, content_dim=16, d_model=32, n_layers=1, n_heads=2, max_len=32)    # the 1M run: I/O + memory


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def peak_rss_mb() -> float:
    """This process's peak RSS. VmHWM, not ru_maxrss: a child started by fork+exec inherits the
    parent's ru_maxrss on Linux, VmHWM belongs to the new address space."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------------------------------------
# bound
# ------------------------------------------------------------------------------------------------
def encoder_flops(cfg: ModelConfig, L: int) -> float:
    d = cfg.d_model
    return cfg.n_layers * (24.0 * L * d * d + 2.0 * d * L * (L + 1))


def matmul_flops(n: int, trials: int, device: torch.device, dtype=torch.float32, seconds: float = 0.4) -> float:
    """Best FLOP/s of ``n x n @ n x n`` over ``trials`` windows of ~``seconds``."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b
    sync()
    best = 0.0
    for _ in range(trials):
        reps, t0 = 0, time.perf_counter()
        while True:
            a @ b
            reps += 1
            sync()
            dt = time.perf_counter() - t0
            if dt >= seconds:
                break
        best = max(best, 2.0 * n ** 3 * reps / dt)
    return best


# ------------------------------------------------------------------------------------------------
# synthetic data
# ------------------------------------------------------------------------------------------------
def make_model(spec: dict, seed: int = 0) -> FoundationModel:
    torch.manual_seed(seed)
    m = FoundationModel(ModelConfig(dropout=0.0, **spec))
    init_weights(m)
    m.title.content.copy_(torch.randn(spec["n_titles"], spec["content_dim"]) / spec["content_dim"] ** 0.5)
    return m.eval()


def history_table(cfg: ModelConfig, n: int, lengths, rng: np.random.Generator, first_id: int = 0, day=None) -> pa.Table:
    """History rows: profile_id + one list<int32> per token field (+ last_dt / n_tokens if ``day``)."""
    lens = np.full(n, lengths) if np.isscalar(lengths) else np.asarray(lengths)
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    total = int(offsets[-1])
    cols = {"profile_id": pa.array(np.arange(first_id, first_id + n, dtype=np.int64))}
    if day is not None:
        cols["last_dt"] = pa.array([day] * n, pa.date32())
        cols["n_tokens"] = pa.array(lens.astype(np.int32))
        cols["ts"] = pa.nulls(n, pa.list_(pa.timestamp("us", tz="UTC")))
    for f in TOKEN_FIELDS:
        hi = cfg.n_titles if f == "title" else cfg.field_sizes[f]
        vals = rng.integers(N_SPECIAL, hi, total, dtype=np.int32)
        cols[f] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(vals))
    return pa.table(cols)


# ------------------------------------------------------------------------------------------------
# in-process timings
# ------------------------------------------------------------------------------------------------
def bench_context(model: FoundationModel, L: int, n: int, rounds: int, device: torch.device, stock: bool,
                  mm_n: int, mm_dtype=torch.float32, others: dict[str, FoundationModel] | None = None) -> dict:
    """Rounds of [matmul window, one pass of each path] so that every path and the bound see the
    same machine state (the 2-core machine is shared). Per path: best profiles/s over the rounds,
    and the median over rounds of (profiles/s x FLOPs/profile) / (that round's matmul FLOP/s)."""
    cfg = model.cfg
    rng = np.random.default_rng(L)
    table = history_table(cfg, n, L, rng)
    specs = default_layers(cfg.n_layers)
    encoder = ProfileEncoder(model, specs).to(device)
    batches = table.to_batches(max_chunksize=1024)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def streamed(enc: ProfileEncoder, **limits) -> Callable[[], None]:
        """One pass of the production streaming path over the table (synchronised on a GPU)."""
        def run():
            for _ in embed_batches(enc, batches, device=device, **limits):
                pass
            sync()
        return run
    paths = {"fast": (streamed(encoder), n)}
    for name, other in (others or {}).items():          # same shape, other switches: timed in the same rounds
        paths[f"{name}_fast"] = (streamed(ProfileEncoder(other, specs).to(device)), n)
    if device.type == "cuda":                # the same path with the CPU's batch limits, for the ratio
        cpu_tokens, cpu_rows = BATCH_LIMITS["cpu"]
        paths["cpu_batches"] = (streamed(encoder, batch_tokens=cpu_tokens, max_batch=cpu_rows), n)
    if stock and device.type == "cpu":
        seqs = Sequences.from_table(table)
        paths["stock"] = (lambda: reference_embeddings(model, seqs, specs, batch_size=256), n)
        layer = torch.nn.TransformerEncoderLayer(cfg.d_model, cfg.n_heads, 4 * cfg.d_model, dropout=0.0,
                                                 activation="gelu", batch_first=True, norm_first=True)
        tenc = torch.nn.TransformerEncoder(layer, cfg.n_layers, enable_nested_tensor=False).eval()
        xb = torch.randn(min(n, max(1, 8192 // L)), L, cfg.d_model)
        mask = torch.nn.Transformer.generate_square_subsequent_mask(L)
        reps = max(1, n // xb.shape[0])

        def torch_layer():
            with torch.inference_mode():
                for _ in range(reps):
                    tenc(xb, mask=mask, is_causal=True)
        paths["torch_encoder_layer"] = (torch_layer, reps * xb.shape[0])
    fl = encoder_flops(cfg, L)
    for fn, _ in paths.values():
        fn()                                                           # warm-up
    pps = {k: [] for k in paths}
    ratios = {k: [] for k in paths}
    mms = []
    for _ in range(rounds):
        mm = matmul_flops(mm_n, 1, device, mm_dtype, seconds=0.3)
        mms.append(mm)
        for k, (fn, count) in paths.items():
            t0 = time.perf_counter()
            fn()
            p = count / (time.perf_counter() - t0)
            pps[k].append(p)
            ratios[k].append(p * fl / mm)
    out = {"seq_len": L, "profiles": n, "flops_per_profile": fl, "matmul_flops_during": max(mms)}
    for k in paths:
        out[f"{k}_profiles_per_s"] = max(pps[k])
        out[f"{k}_ratio_median_of_rounds"] = float(np.median(ratios[k]))
    return out
