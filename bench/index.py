"""Benchmark: the profile ("similar profiles") index at scale — recall@10 and qps vs exact search.

Vectors are *realistic*, not uniform: when ``var/embeddings/profile/dt=*`` exists (the project's
trained model, ``make demo``), a Gaussian mixture (k-means centres + per-cluster diagonal spread,
cluster weights from the data) is fitted to its normalised ``emb_layer2_mean`` vectors and N vectors
are sampled from it (the real table has only a few thousand rows); otherwise a synthetic clustered
mixture of the same width is used. The output says which. Queries are 1,000 *fresh* draws from the
same mixture (not indexed vectors). The index is built by ``jobs.index.build`` exactly as the daily
job does (type by size, IVF trained on a sample, nprobe raised until the build-time recall@10
reaches the target), then measured independently: recall@10 against exact ``IndexFlatIP`` on the
fresh queries, batch qps of both, build time. On the real vectors themselves (small) the recall of
the same settings is reported too.

    .venv/bin/python bench/index.py --quick          # 100k vectors, < 3 min
    .venv/bin/python bench/index.py                  # 1M vectors

Last output line: one JSON object (vectors, recall_at_10, qps, exact_qps, build_s, ...).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402

import faiss  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from bench.common import PeakRSS, emit, machine  # noqa: E402
from jobs import index as ix  # noqa: E402
from jobs.core.settings import REPO_ROOT  # noqa: E402


def real_vectors(layer: str) -> tuple[np.ndarray | None, str]:
    parts = sorted((REPO_ROOT / "var" / "embeddings" / "profile").glob("dt=*"))
    if not parts:
        return None, ""
    t = pq.read_table(parts[-1], columns=[layer])
    col = t[layer].combine_chunks()
    x = col.values.to_numpy(zero_copy_only=False).reshape(len(col), -1).astype(np.float32)
    return ix.normalise(x), str(parts[-1].relative_to(REPO_ROOT))


class Mixture:
    """Diagonal Gaussian mixture: k-means centres, per-cluster per-dimension spread, data weights."""

    def __init__(self, x: np.ndarray, k: int, seed: int = 0):
        km = faiss.Kmeans(x.shape[1], k, niter=25, seed=seed, spherical=True, verbose=False)
        km.train(x)
        _, assign = km.index.search(x, 1)
        assign = assign[:, 0]
        self.centres = km.centroids.copy()
        self.weights = np.bincount(assign, minlength=k).astype(np.float64)
        self.weights /= self.weights.sum()
        global_std = x.std(axis=0)
        self.std = np.stack([x[assign == c].std(axis=0) if (assign == c).sum() > 2 else global_std for c in range(k)])
        # each draw: a member's offset from its centre, kept at the member spread observed in the data
        self.k = k

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        which = rng.choice(self.k, size=n, p=self.weights)
        out = np.empty((n, self.centres.shape[1]), np.float32)
        for s in range(0, n, 200_000):
            w = which[s:s + 200_000]
            out[s:s + len(w)] = self.centres[w] + rng.standard_normal((len(w), self.centres.shape[1])).astype(np.float32) * self.std[w]
        return ix.normalise(out)


def synthetic_seed(d: int, rng: np.random.Generator) -> np.ndarray:
    """Stand-in for real embeddings when none exist: anisotropic, clustered, uneven cluster sizes."""
    k = 50
    centres = rng.standard_normal((k, d)).astype(np.float32) * np.linspace(2.0, 0.2, d, dtype=np.float32)
    which = rng.choice(k, size=5000, p=rng.dirichlet(np.full(k, 0.7)))
    return ix.normalise(centres[which] + rng.standard_normal((5000, d)).astype(np.float32) * 0.6)


def qps(index: faiss.Index, q: np.ndarray, k: int = 10) -> tuple[float, np.ndarray]:
    index.search(q[:50], k)                            # warm
    t0 = time.perf_counter()
    _, got = index.search(q, k)
    return len(q) / (time.perf_counter() - t0), got


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--vectors", type=int, default=0, help="default 100k quick, 1M full")
    ap.add_argument("--layer", default="emb_layer2_mean")
    ap.add_argument("--nlist", type=int, default=0)
    ap.add_argument("--nprobe", type=int, default=32)
    ap.add_argument("--target-recall", type=float, default=0.95)
    ap.add_argument("--kind", default="auto")
    ap.add_argument("--source", choices=("auto", "synthetic"), default="auto")
    args = ap.parse_args()
    n = args.vectors or (100_000 if args.quick else 1_000_000)
    rng = np.random.default_rng(0)
    t_start = time.perf_counter()
    real, where = real_vectors(args.layer) if args.source == "auto" else (None, "")
    seed_x = real if real is not None else synthetic_seed(64, rng)
    k = int(min(64, max(8, len(seed_x) // 40)))
    mix = Mixture(seed_x, k)
    data = (f"diagonal GMM (k={k}) fitted to {len(seed_x)} real {args.layer} vectors of {where}" if real is not None
            else f"diagonal GMM (k={k}) fitted to a synthetic clustered set (no var/embeddings here)")
    x = mix.sample(n, rng)
    q = mix.sample(1000, np.random.default_rng(1))
    cfg = ix.IndexConfig(kind=args.kind, nlist=args.nlist, nprobe=args.nprobe, target_recall=args.target_recall,
                         use_gpu="no")
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        index, meta = ix.build(x, cfg)
        build_s = time.perf_counter() - t0
        got_qps, got = qps(index, q)
        exact = faiss.IndexFlatIP(x.shape[1])
        exact.add(x)
        exact_qps, truth = qps(exact, q)
        rec = ix.recall(got, truth)
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)                   # OpenMP on a shared 2-core box is noisy: 1 thread too
        qps_1, _ = qps(index, q)
        exact_qps_1, _ = qps(exact, q)
        faiss.omp_set_num_threads(threads)
    out = {"vectors": n, "dim": int(x.shape[1]), "recall_at_10": round(rec, 4), "qps": round(got_qps, 1),
           "exact_qps": round(exact_qps, 1), "speedup_vs_exact": round(got_qps / exact_qps, 2),
           "qps_1thread": round(qps_1, 1), "exact_qps_1thread": round(exact_qps_1, 1),
           "speedup_vs_exact_1thread": round(qps_1 / exact_qps_1, 2), "build_s": round(build_s, 2),
           "index_type": meta["type"], "nprobe": meta.get("nprobe"), "build_time_recall_at_10": meta["recall_at_10"],
           "nprobe_curve": meta.get("nprobe_curve"), "queries": len(q), "query_kind": "fresh draws from the mixture, batch of 1000",
           "data": data, "threads": threads, "load_avg_1m": round(os.getloadavg()[0], 2), "faiss": faiss.__version__, "gpu": ix.has_gpu()}
    if real is not None and len(real) >= 1000:
        small_cfg = ix.IndexConfig(kind="ivf", nprobe=args.nprobe, target_recall=args.target_recall, use_gpu="no")
        _, rmeta = ix.build(real, small_cfg)
        out["real_vectors"] = {"n": len(real), "index_type": rmeta["type"], "nprobe": rmeta.get("nprobe"),
                               "recall_at_10": rmeta["recall_at_10"], "note": "IVF forced on the small real set (Flat is used in production below exact_below)"}
    out.update({"quick": args.quick, "peak_rss_mb": rss.mb, "bench_s": round(time.perf_counter() - t_start, 1), "machine": machine()})
    emit(out)


if __name__ == "__main__":
    main()
