"""Benchmark of the embed path: profiles/s against a FLOP bound measured on the same machine.

    python bench/embed.py --quick        # < 2 min on 2 CPU cores
    python bench/embed.py                # fuller: longer timings, job scaling, 1M-profile run
    python bench/embed.py --scale-profiles 200000   # full mode with a smaller big run

What is measured (all in one run, so the bound and the throughput see the same machine state):

* **bound**: achievable float32 matmul FLOP/s (best of several timed large square matmuls,
  measured before and after the model timings, max taken) divided by the encoder FLOPs per
  profile: per layer ``24·L·d²`` (QKV 6, out-proj 2, MLP 16) + ``2·d·L·(L+1)`` (causal QKᵀ and AV)
  — embeddings, LayerNorm, GELU and pooling are not counted. ``ratio = profiles_per_s / bound``.
* **fast**: the production in-process path (:func:`fm.stream.embed_batches`: Arrow history rows
  in, length-bucketed token-budget batches through :class:`fm.extract.ProfileEncoder`, Arrow
  vectors out) on profiles of exactly ``L`` tokens, realistic model (d_model 256, 4 layers,
  4 heads, max_len 512, default 3 layer columns).
* **stock**: the plain eager path (``model.encode`` + ``pool``) with 256-profile batches, i.e.
  what ``jobs/embed.py`` did before; and, for reference, ``torch.nn.TransformerEncoderLayer``
  (norm_first, GELU, causal mask) of the same size.
* **job scaling**: the whole job (``jobs.embed.run``: Parquet history streamed in, Parquet out,
  manifest) in a fresh subprocess per size on a synthetic home; profiles/s and the subprocess's
  peak RSS (VmHWM). Full mode runs the realistic model at 256 and 1024 profiles, a small model
  (d_model 64, 2 layers, ~32 tokens) at 10k and 100k, and a tiny one (d_model 32, 1 layer, ~16
  tokens) at 100k and 1M profiles: the 1M run exercises the streaming I/O and shows that memory
  stays flat in the number of profiles (a d_model-256 model at 1M profiles would take hours here).
* On CUDA (if visible) the same fast path is timed under bf16 autocast against a bf16 matmul bound.

The last line printed is one JSON object (profiles_per_s, bound_profiles_per_s, seq_len,
peak_rss_mb, ratio_to_bound, ...); everything else goes before it.
"""
from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this folder would come first on sys.path and bench/tokenize.py would shadow the
# stdlib `tokenize`: put the repo root there instead.
sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import json
import os
import platform
import subprocess
import tempfile
import time

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

from fm.extract import ProfileEncoder, default_layers  # noqa: E402
from fm.model import FoundationModel, ModelConfig  # noqa: E402
from fm.schema import HISTORY_SCHEMA, N_SPECIAL, TOKEN_FIELDS  # noqa: E402
from fm.stream import embed_batches  # noqa: E402
from bench.common import provenance  # noqa: E402
from bench.embed_timing import (RECIPE_ARCH, REALISTIC, SMALL, TINY, bench_context, encoder_flops,  # noqa: E402
                                history_table, log, make_model, matmul_flops, peak_rss_mb)
from jobs.core.io import atomic_write_json  # noqa: E402


# ------------------------------------------------------------------------------------------------
# whole-job runs in a subprocess (peak RSS of that process only)
# ------------------------------------------------------------------------------------------------
DAY = "2026-01-15"


def build_home(home: Path, spec: dict, n: int, mean_len: int, max_len: int, seed: int = 0) -> None:
    """A synthetic FMPIPE_HOME: vocabulary, catalogue, a checkpoint, one history partition (streamed)."""
    import datetime as dt

    from fm import checkpoint
    from fm.content import ContentEncoder, title_text
    from fm.schema import CATALOGUE_SCHEMA, TITLE_VOCAB_SCHEMA
    from jobs.core.settings import Paths

    paths = Paths(home)
    rng = np.random.default_rng(seed)
    model = make_model(spec, seed)
    n_real = spec["n_titles"] - N_SPECIAL
    ids = [f"t{i:07d}" for i in range(n_real)]
    day = dt.date.fromisoformat(DAY)
    cat = pa.table({"title_id": ids, "name": [f"title {i}" for i in range(n_real)], "kind": ["movie"] * n_real,
                    "genres": [["drama", "comedy", "action"][i % 3:i % 3 + 1] for i in range(n_real)],
                    "release_date": [day] * n_real, "synopsis": [f"story number {i % 97}" for i in range(n_real)],
                    "runtime_s": pa.array([5400] * n_real, pa.int32())}, schema=CATALOGUE_SCHEMA)
    paths.catalogue.parent.mkdir(parents=True)
    pq.write_table(cat, paths.catalogue)
    paths.title_vocab.parent.mkdir(parents=True)
    pq.write_table(pa.table({"title_id": ids, "idx": pa.array(range(N_SPECIAL, N_SPECIAL + n_real), pa.int32()),
                             "first_dt": pa.array([day] * n_real, pa.date32())}, schema=TITLE_VOCAB_SCHEMA),
                   paths.title_vocab)
    enc = ContentEncoder.fit(title_text(cat.slice(0, 500)), dim=spec["content_dim"])
    meta = {"model_version": "bench-v1", "vocab_size": n_real,
            "vocab_fingerprint": checkpoint.vocab_fingerprint(ids)}
    checkpoint.save(model, enc, paths.models / "bench-v1", meta)
    atomic_write_json({"version": "bench-v1"}, paths.models / "CURRENT.json")
    part = paths.history / f"dt={DAY}"
    part.mkdir(parents=True)
    schema = pa.schema([HISTORY_SCHEMA.field(c) for c in ("profile_id", "last_dt", "n_tokens", "ts", *TOKEN_FIELDS)])
    with pq.ParquetWriter(part / "part-00000.parquet", schema) as w:
        for start in range(0, n, 20000):
            k = min(20000, n - start)
            lens = np.clip(rng.geometric(1.0 / mean_len, k), 1, max_len)
            w.write_table(history_table(model.cfg, k, lens, rng, first_id=start, day=day).select(schema.names)
                          .cast(schema))


def job_child(home: str, overrides: list[str]) -> None:
    """Run the embed job on ``home``; print its result + this process's peak RSS as JSON."""
    os.environ["FMPIPE_HOME"] = home
    from jobs import embed
    from jobs.core.settings import Paths, parse_overrides
    cfg = parse_overrides(embed.EmbedConfig, [f"date={DAY}", *overrides])
    t0 = time.perf_counter()
    res = embed.run(cfg, Paths.from_env())
    res["wall_s"] = time.perf_counter() - t0
    res["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(res, default=str))


def job_run(spec: dict, n: int, mean_len: int, workdir: Path, overrides: list[str] | None = None) -> dict:
    home = workdir / f"home-{spec['d_model']}-{n}-{mean_len}"
    t0 = time.perf_counter()
    build_home(home, spec, n, mean_len, spec["max_len"])
    built = time.perf_counter() - t0
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, __file__, "--job-child", str(home), *(overrides or [])],
                         capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"job child failed:\n{out.stderr[-4000:]}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    tokens = pq.read_table(home / "history" / f"dt={DAY}", columns=["n_tokens"])["n_tokens"].to_numpy()
    cfg = ModelConfig(dropout=0.0, **spec)
    fl = float(sum(encoder_flops(cfg, int(L)) for L in np.clip(tokens, 1, cfg.max_len)))
    import shutil
    shutil.rmtree(home, ignore_errors=True)
    return {"profiles": res["profiles"], "d_model": spec["d_model"], "n_layers": spec["n_layers"],
            "mean_tokens": float(np.clip(tokens, 1, cfg.max_len).mean()), "job_wall_s": round(res["wall_s"], 2),
            "profiles_per_s": round(res["profiles"] / res["wall_s"], 1), "gflop_per_s": round(fl / res["wall_s"] / 1e9, 2),
            "peak_rss_mb": round(res["peak_rss_mb"], 1), "build_s": round(built, 1)}


def bf16_drift(model: FoundationModel, L: int, n: int, device: torch.device) -> dict:
    """How far the GPU's bf16 embeddings are from the float32 CPU path on the same profiles (the
    embed job's streaming path on both): relative norm error and the lowest cosine, per layer column."""
    table = history_table(model.cfg, n, L, np.random.default_rng(7))
    specs = default_layers(model.cfg.n_layers)
    out = {}
    for dev in (torch.device("cpu"), device):
        enc = ProfileEncoder(model, specs).to(dev)
        out[dev.type] = pa.Table.from_batches(list(embed_batches(enc, table.to_batches(max_chunksize=1024), device=dev)))
        model.cpu()
    drift = {}
    for s in specs:
        ref = np.stack(out["cpu"][s.name].to_numpy(zero_copy_only=False)).astype(np.float64)
        got = np.stack(out[device.type][s.name].to_numpy(zero_copy_only=False)).astype(np.float64)
        cos = (ref * got).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1))
        drift[s.name] = {"rel_error": round(float(np.linalg.norm(got - ref) / np.linalg.norm(ref)), 5),
                         "min_cosine": round(float(cos.min()), 5)}
    return drift


def gpu_section(quick: bool, rounds: int) -> dict:
    """The production shape on the GPU under bf16 autocast: the fast path against a bf16 matmul
    bound measured in the same rounds, its drift from float32, and the whole embed job
    (``jobs.embed.run device=cuda``: Parquet in, Parquet out) on a synthetic home."""
    device = torch.device("cuda")
    gpu_peak = matmul_flops(8192, 5, device, torch.bfloat16)
    gpu = {"name": torch.cuda.get_device_name(0), "matmul_bf16_flops": gpu_peak, "contexts": {}}
    gmodel = make_model(REALISTIC).to(device)
    for L, n in ((200, 8192 if quick else 32768), (512, 2048 if quick else 8192)):
        r = bench_context(gmodel, L, n, rounds, device, False, 8192, torch.bfloat16)
        gpu_peak = max(gpu_peak, r["matmul_flops_during"])
        r["bound_profiles_per_s"] = gpu_peak / r["flops_per_profile"]
        r["fast_ratio_to_bound"] = r["fast_profiles_per_s"] / r["bound_profiles_per_s"]
        gpu["contexts"][L] = r
        r["cpu_batches_ratio_to_bound"] = r["cpu_batches_profiles_per_s"] / r["bound_profiles_per_s"]
        log(f"GPU bf16 L={L}: {r['fast_profiles_per_s']:.0f}/s = {r['fast_ratio_to_bound']:.1%} of the bf16 bound "
            f"(median of rounds {r['fast_ratio_median_of_rounds']:.1%}); with the CPU's batch limits "
            f"{r['cpu_batches_profiles_per_s']:.0f}/s = {r['cpu_batches_ratio_to_bound']:.1%}")
    gpu["matmul_bf16_flops"] = gpu_peak
    gpu["drift_vs_fp32_cpu"] = bf16_drift(make_model(REALISTIC), 200, 256, device)
    log("GPU bf16 drift vs float32 CPU:", gpu["drift_vs_fp32_cpu"])
    with tempfile.TemporaryDirectory(prefix="fmpipe-bench-gpu-") as tmp:
        gpu["job"] = job_run(REALISTIC, 20_000 if quick else 100_000, 200, Path(tmp), ["device=cuda"])
    log(f"GPU job d=256 n={gpu['job']['profiles']}: {gpu['job']['profiles_per_s']}/s, wall {gpu['job']['job_wall_s']}s")
    return gpu


# ------------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short timings, no big run (< 2 min on 2 cores)")
    ap.add_argument("--device", default="auto", help="cpu | cuda | auto")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores)")
    ap.add_argument("--scale-profiles", type=int, default=1_000_000, help="full mode: profiles in the big job run")
    ap.add_argument("--no-scale", action="store_true", help="full mode without the big job run")
    ap.add_argument("--gpu-only", action="store_true", help="only the GPU section (needs CUDA; the JSON's figures are the GPU's)")
    ap.add_argument("--out", type=Path, help="also write the result JSON here (with commit, command, machine, load)")
    ap.add_argument("--job-child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.job_child:
        return job_child(args.job_child[0], args.job_child[1:])

    t_start = time.perf_counter()
    prov = provenance("bench/embed.py", None)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    quick = args.quick
    mm_n, mm_trials = 2048, (3 if quick else 6)
    rounds = 2 if quick else 6
    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
               "torch": torch.__version__, "threads": torch.get_num_threads(), "device": str(device),
               "load_avg_start": os.getloadavg()[0]}
    log("machine", machine)
    if args.gpu_only:
        if device.type != "cuda":
            raise SystemExit("--gpu-only needs a visible CUDA device (torch.cuda.is_available() is False)")
        return print(json.dumps(gpu_only_result(gpu_section(quick, rounds), quick, machine, t_start)))

    cpu = torch.device("cpu")
    peak = matmul_flops(mm_n, mm_trials, cpu)
    log(f"matmul fp32 {mm_n}^3: {peak / 1e9:.1f} GFLOP/s")
    model = make_model(REALISTIC)
    contexts = {}
    for L, n in ((200, 48 if quick else 256), (512, 16 if quick else 96)):
        r = bench_context(model, L, n, rounds, cpu, True, mm_n, others={"recipe_arch": make_model(RECIPE_ARCH)} if L == 200 else None)
        contexts[L] = r
        log(f"L={L}: fast {r['fast_profiles_per_s']:.1f}/s, stock(model.encode, 256/batch) "
            f"{r.get('stock_profiles_per_s', 0):.1f}/s, nn.TransformerEncoderLayer {r.get('torch_encoder_layer_profiles_per_s', 0):.1f}/s")
    peak = max([peak, matmul_flops(mm_n, mm_trials, cpu)] + [r["matmul_flops_during"] for r in contexts.values()])
    for L, r in contexts.items():
        r["bound_profiles_per_s"] = peak / r["flops_per_profile"]
        for k in ("fast", "stock", "torch_encoder_layer", "recipe_arch_fast"):
            if f"{k}_profiles_per_s" in r:
                r[f"{k}_ratio_to_bound"] = r[f"{k}_profiles_per_s"] / r["bound_profiles_per_s"]
        log(f"L={L}: bound {r['bound_profiles_per_s']:.1f}/s (matmul {peak / 1e9:.0f} GFLOP/s) -> best-of ratio: fast "
            f"{r['fast_ratio_to_bound']:.0%}, stock {r.get('stock_ratio_to_bound', 0):.0%}, TransformerEncoderLayer "
            f"{r.get('torch_encoder_layer_ratio_to_bound', 0):.0%}; median per-round ratio: fast "
            f"{r['fast_ratio_median_of_rounds']:.0%}, stock {r.get('stock_ratio_median_of_rounds', 0):.0%}, "
            f"TransformerEncoderLayer {r.get('torch_encoder_layer_ratio_median_of_rounds', 0):.0%}")

    gpu = gpu_section(quick, rounds) if device.type == "cuda" else None

    jobs = []
    with tempfile.TemporaryDirectory(prefix="fmpipe-bench-") as tmp:
        work = Path(tmp)
        sizes = [(REALISTIC, 32, 200), (SMALL, 2_000, 32), (SMALL, 8_000, 32)] if quick else \
            [(REALISTIC, 256, 200), (REALISTIC, 1024, 200), (SMALL, 10_000, 32), (SMALL, 100_000, 32),
             (TINY, 100_000, 16)]
        if not quick and not args.no_scale and args.scale_profiles > 100_000:
            sizes.append((TINY, args.scale_profiles, 16))
        for spec, n, mean_len in sizes:
            r = job_run(spec, n, mean_len, work, [f"device={device.type}", f"threads={torch.get_num_threads()}"])
            jobs.append(r)
            log(f"job d={spec['d_model']} n={n}: {r['profiles_per_s']}/s ({r['gflop_per_s']} GFLOP/s), "
                f"peak RSS {r['peak_rss_mb']} MB, wall {r['job_wall_s']}s")

    head = contexts[200]
    result = {
        "bench": "embed", "mode": "quick" if quick else "full", "seq_len": 200,
        "profiles_per_s": round(head["fast_profiles_per_s"], 2),
        "bound_profiles_per_s": round(head["bound_profiles_per_s"], 2),
        "ratio_to_bound": round(head["fast_ratio_to_bound"], 3),
        "stock_ratio_to_bound": round(head.get("stock_ratio_to_bound", float("nan")), 3),
        "ratio_median_of_rounds": round(head["fast_ratio_median_of_rounds"], 3),
        "ratio_to_bound_512": round(contexts[512]["fast_ratio_to_bound"], 3),
        "ratio_to_bound_recipe_arch": round(head["recipe_arch_fast_ratio_to_bound"], 3),
        "ratio_median_of_rounds_recipe_arch": round(head["recipe_arch_fast_ratio_median_of_rounds"], 3),
        "recipe_arch": {k: RECIPE_ARCH[k] for k in ("rel_bias", "emb_norm", "title_bias")},
        "peak_rss_mb": max(j["peak_rss_mb"] for j in jobs),          # the embed job processes
        "bench_process_peak_rss_mb": round(peak_rss_mb(), 1),
        "matmul_gflop_s": round(peak / 1e9, 1),
        "model": REALISTIC,
        "contexts": {str(L): {k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()} for L, r in contexts.items()},
        "jobs": jobs, "gpu": gpu, "machine": {**machine, "load_avg_end": os.getloadavg()[0]},
        "wall_s": round(time.perf_counter() - t_start, 1),
        "provenance": prov,
    }
    if args.out:
        atomic_write_json(result, args.out)
    print(json.dumps(result))


def gpu_only_result(gpu: dict, quick: bool, machine: dict, t_start: float) -> dict:
    head = gpu["contexts"][200]
    return {"bench": "embed", "mode": ("quick" if quick else "full") + "-gpu-only", "seq_len": 200,
            "device": gpu["name"], "profiles_per_s": round(head["fast_profiles_per_s"], 1),
            "bound_profiles_per_s": round(head["bound_profiles_per_s"], 1),
            "ratio_to_bound": round(head["fast_ratio_to_bound"], 4),
            "ratio_median_of_rounds": round(head["fast_ratio_median_of_rounds"], 4),
            "ratio_to_bound_512": round(gpu["contexts"][512]["fast_ratio_to_bound"], 4),
            "cpu_batch_limits_ratio_to_bound": round(head["cpu_batches_ratio_to_bound"], 4),
            "job_profiles_per_s": gpu["job"]["profiles_per_s"], "model": REALISTIC, "gpu": gpu,
            "machine": {**machine, "load_avg_end": os.getloadavg()[0]}, "wall_s": round(time.perf_counter() - t_start, 1)}


if __name__ == "__main__":
    main()
