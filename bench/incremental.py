"""Incremental inference (issue 16): what a day costs when only its new events are encoded against
each profile's cached keys/values (``fm.incremental``), against re-encoding the whole window with the
product's inference encoder (``fm.extract.ProfileEncoder``), and the drift it introduces.

    .venv/bin/python bench/incremental.py --quick                       # synthetic windows, fresh model
    .venv/bin/python bench/incremental.py --home bench/.work/ml-1m --model bench/.work/ml-1m/models/<v>

Two regimes, each profile's newest ``--new-frac`` of its window being "today's" events:

* **room** -- windows that still fit after today's events (``len <= max_len``): the cache is
  exact; reported: time of today's encode both ways and the largest difference of the vectors;
* **slide** -- profiles with at least ``max_len + new`` events: today's events push the oldest out
  of the window; :func:`fm.incremental.slide` keeps the stale keys/values. Reported: time both ways,
  cosine of the approximate last-layer vector to the re-encoded one, and the overlap of the
  top-10 titles each ranks (the drift a consumer would see).

Yesterday's cache build (``prefill``) is not timed: it is the previous day's work. Times are the
median of ``--rounds`` in one process (same batches, same threads), so the ratio is the figure.
Writes ``<out>/incremental[_quick].md/.json``; last line one JSON object.
"""
from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))

import argparse  # noqa: E402
import datetime as dt  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.common import emit, provenance, write_results  # noqa: E402
from fm import checkpoint  # noqa: E402
from fm import incremental as inc  # noqa: E402
from fm.data import Sequences  # noqa: E402
from fm.extract import ProfileEncoder, default_layers  # noqa: E402
from fm.model import FoundationModel, ModelConfig, init_weights  # noqa: E402
from fm.recipe import Recipe  # noqa: E402
from fm.schema import N_SPECIAL, TOKEN_FIELDS  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="synthetic windows and a fresh default-shape model")
    ap.add_argument("--home", default="", help="an FMPIPE_HOME whose latest history partition gives the windows")
    ap.add_argument("--model", default="", help="a checkpoint directory (default with --home: its newest model)")
    ap.add_argument("--profiles", type=int, default=2000, help="profiles per regime")
    ap.add_argument("--new-frac", type=float, default=0.1, help="share of each window that is today's")
    ap.add_argument("--batch", type=int, default=256, help="profiles per batch")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--out", default=str(Path(_HERE) / "results"))
    a = ap.parse_args(argv)
    if not a.quick and not a.home:
        ap.error("--home DIR (an FMPIPE_HOME with a history table) is needed unless --quick")
    if not 0 < a.new_frac < 1:
        ap.error(f"--new-frac {a.new_frac}: expected a share between 0 and 1")
    return a


def load_model(args) -> FoundationModel:
    """The checkpoint named (or the home's newest), else a fresh model of the recipe's shape."""
    model_dir = Path(args.model) if args.model else None
    if model_dir is None and args.home:
        found = sorted((Path(args.home) / "models").glob("*/config.json"), key=lambda p: p.stat().st_mtime)
        model_dir = found[-1].parent if found else None
    if model_dir is None:
        r = Recipe()
        torch.manual_seed(0)
        model = FoundationModel(ModelConfig(n_titles=5000, d_model=r.d_model, n_layers=r.n_layers, n_heads=r.n_heads,
                                            max_len=r.max_len, rel_bias=r.rel_bias, emb_norm=r.emb_norm,
                                            title_bias=r.title_bias))
        init_weights(model)
        return model.eval()
    model, _, _ = checkpoint.load(model_dir)
    return model.eval()


def windows(args, model: FoundationModel) -> Sequences:
    """The latest history partition of ``--home``, or synthetic sequences (quick)."""
    if args.home:
        from jobs.core.io import latest_partition_before
        root = Path(args.home) / "history"
        day = latest_partition_before(root, dt.date.max)
        if day is None:
            raise SystemExit(f"--home {args.home}: no history partition under {root}; run fmpipe tokenize first")
        return Sequences.read(root / f"dt={day.isoformat()}")
    rng = np.random.default_rng(0)
    L = model.cfg.max_len
    lens = np.concatenate([rng.integers(20, L + 1, args.profiles), rng.integers(L + L // 5, 2 * L, args.profiles)])
    sizes = {**model.cfg.field_sizes, "title": model.cfg.n_titles}
    values = {f: rng.integers(N_SPECIAL, sizes[f], int(lens.sum())) for f in TOKEN_FIELDS}
    return Sequences(np.arange(len(lens)), np.concatenate([[0], np.cumsum(lens)]), values)


def rows_of(seqs: Sequences, pick: np.ndarray, start: np.ndarray, stop: np.ndarray) -> list[torch.Tensor]:
    stacked = np.stack([seqs.values[f] for f in TOKEN_FIELDS], axis=1)
    base = seqs.offsets[pick]
    return [torch.from_numpy(stacked[b + s: b + e].astype(np.int64)) for b, s, e in zip(base, start, stop)]


def timed(fn, rounds: int, setup=lambda: None) -> tuple[float, object]:
    """Median seconds of ``fn(setup())`` over ``rounds`` (``setup`` untimed: extend works in place,
    so each round starts from a fresh copy of yesterday's caches)."""
    times, out = [], None
    for _ in range(rounds):
        state = setup()
        t = time.perf_counter()
        out = fn(state)
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def regime(model, seqs, pick, old_start, old_stop, stop, args, slide: bool) -> dict:
    """Time today's encode both ways over ``pick``'s windows; compare the vectors."""
    enc = ProfileEncoder(model, default_layers(model.cfg.n_layers))
    batches = [slice(i, i + args.batch) for i in range(0, len(pick), args.batch)]
    new_start = old_stop
    full_start = np.maximum(stop - model.cfg.max_len, 0)
    full = [inc.pad_tokens(rows_of(seqs, pick[b], full_start[b], stop[b])) for b in batches]
    new = [inc.pad_tokens(rows_of(seqs, pick[b], new_start[b], stop[b])) for b in batches]
    with torch.no_grad():
        caches = [inc.prefill(model, *inc.pad_tokens(rows_of(seqs, pick[b], old_start[b], old_stop[b]))) for b in batches]
        if slide:
            caches = [inc.slide(c, torch.from_numpy(full_start[b] - old_start[b])) for c, b in zip(caches, batches)]
        t_full, ref = timed(lambda _: [enc(t, n)[1] for t, n in full], args.rounds)
        t_inc, got = timed(lambda cs: [inc.extend(model, c, t, n).last[-1] for c, (t, n) in zip(cs, new)], args.rounds,
                           setup=lambda: [c.clone() for c in caches])
        ref, got = torch.cat(ref), torch.cat(got)
        cos = torch.nn.functional.cosine_similarity(got, ref)
        table = model.title.table()
        top = lambda h: torch.topk(h @ table.T + (model.bias if model.bias is not None else 0.0), 10).indices  # noqa: E731
        overlap = [len(set(a.tolist()) & set(b.tolist())) / 10 for a, b in zip(top(got), top(ref))]
    return {"profiles": len(pick), "new_events_mean": float(np.mean(stop - new_start)),
            "window_mean": float(np.mean(stop - full_start)), "full_s": round(t_full, 4), "incremental_s": round(t_inc, 4),
            "speedup": round(t_full / t_inc, 2), "max_abs_diff": float((got - ref).abs().max()),
            "cosine_mean": round(float(cos.mean()), 6), "cosine_p5": round(float(cos.quantile(0.05)), 6),
            "top10_overlap": round(float(np.mean(overlap)), 4)}


def plan(seqs: Sequences, model, args) -> dict:
    """Profiles and their (old window, today's events) for each regime."""
    L, lens = model.cfg.max_len, seqs.lengths
    rng = np.random.default_rng(0)
    out = {}
    room = np.flatnonzero((lens >= 20) & (lens <= L))
    if len(room):
        pick = rng.choice(room, min(args.profiles, len(room)), replace=False)
        pick = pick[np.argsort(lens[pick], kind="stable")]     # batches of like lengths, as embed cuts them
        stop = lens[pick]
        new = np.maximum(1, np.ceil(args.new_frac * stop).astype(int))
        out["room"] = (pick, np.zeros_like(stop), stop - new, stop)
    n_new = max(1, int(np.ceil(args.new_frac * L)))
    full = np.flatnonzero(lens >= L + n_new)
    if len(full):
        pick = np.sort(rng.choice(full, min(args.profiles, len(full)), replace=False))
        stop = lens[pick]
        out["slide"] = (pick, stop - n_new - L, stop - n_new, stop)
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    rec = provenance("bench/incremental.py", argv)
    t0 = time.perf_counter()
    model = load_model(args)
    seqs = windows(args, model)
    res = {name: regime(model, seqs, *p, args, slide=name == "slide") for name, p in plan(seqs, model, args).items()}
    cfg = model.cfg
    per_event = inc.KVCache.empty(model, 1).nbytes_per_event()
    res.update({"model": f"d_model {cfg.d_model}, {cfg.n_layers} layers, {cfg.n_heads} heads, max_len {cfg.max_len}, "
                         f"rel_bias {cfg.rel_bias}", "trained": bool(args.model or args.home),
                "cache_bytes_per_event_fp16": per_event, "cache_bytes_full_window_fp16": per_event * cfg.max_len,
                "new_frac": args.new_frac, "threads": args.threads})
    rec.update(res, wall_s=round(time.perf_counter() - t0, 1), loadavg_end=[round(x, 2) for x in os.getloadavg()])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_results(out, f"incremental{'_quick' if args.quick else ''}", report(res, args), rec)
    emit(res)
    return res


def report(res: dict, args) -> list[str]:
    lines = ["# Incremental inference: today's events against a KV cache vs re-encoding the window", "",
             f"Model: {res['model']} ({'trained checkpoint' if res['trained'] else 'fresh weights: drift figures not meaningful'}); "
             f"today = the newest {args.new_frac:.0%} of each window; median of {args.rounds} rounds, {args.threads} threads. "
             f"Cache: {res['cache_bytes_per_event_fp16']} B per event in float16, "
             f"{res['cache_bytes_full_window_fp16'] / 1024:.0f} KiB for a full window.", "",
             "| regime | profiles | window | new events | re-encode s | incremental s | speedup | max abs diff | cosine mean | cosine p5 | top-10 overlap |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name in ("room", "slide"):
        if name in res:
            r = res[name]
            lines.append(f"| {name} | {r['profiles']} | {r['window_mean']:.0f} | {r['new_events_mean']:.1f} | {r['full_s']:.3f} | "
                         f"{r['incremental_s']:.3f} | {r['speedup']:.2f}x | {r['max_abs_diff']:.2e} | {r['cosine_mean']:.5f} | "
                         f"{r['cosine_p5']:.5f} | {r['top10_overlap']:.3f} |")
    lines += ["", "room: the window still has space, the cache is exact (differences are float rounding); slide: the "
              "oldest events leave the window and the kept keys/values are stale (fm.incremental.slide).", ""]
    return lines


if __name__ == "__main__":
    main()
